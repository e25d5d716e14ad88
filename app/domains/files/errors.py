from app.core.errors import Conflict, InvalidRequest, NotFound


class FileNotFound(NotFound):
    code = "file_not_found"


class FileInvalid(InvalidRequest):
    code = "invalid_file"


class FileInUse(Conflict):
    code = "file_in_use"
