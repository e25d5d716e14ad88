from app.core.errors import Conflict, InvalidRequest, NotFound


class ModelNotFound(NotFound):
    code = "model_not_found"


class InvalidModelDirectory(InvalidRequest):
    code = "invalid_model_directory"


class InvalidModelName(InvalidRequest):
    code = "invalid_model_name"


class ModelExists(Conflict):
    code = "model_exists"
