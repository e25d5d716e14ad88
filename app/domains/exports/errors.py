from app.core.errors import InvalidRequest, NotFound


class ExportNotFound(NotFound):
    code = "export_not_found"


class ExportInvalid(InvalidRequest):
    code = "invalid_export"
