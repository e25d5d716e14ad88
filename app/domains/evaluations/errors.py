from app.core.errors import Conflict, InvalidRequest, NotFound


class EvaluationNotFound(NotFound):
    code = "evaluation_not_found"


class EvaluationInvalid(InvalidRequest):
    code = "invalid_evaluation"


class EvaluationNotCancellable(Conflict):
    code = "invalid_state"
