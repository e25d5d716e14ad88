from app.core.errors import InvalidRequest, NotFound


class EvaluationNotFound(NotFound):
    code = "evaluation_not_found"


class EvaluationInvalid(InvalidRequest):
    code = "invalid_evaluation"
