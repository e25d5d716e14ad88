from app.core.errors import Conflict, InvalidRequest, NotFound


class JobNotFound(NotFound):
    code = "job_not_found"


class JobInvalid(InvalidRequest):
    code = "invalid_job"


class ModelNotFound(InvalidRequest):
    code = "model_not_found"


class IllegalTransition(Conflict):
    code = "invalid_state"
