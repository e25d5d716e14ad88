from app.core.errors import Conflict, InvalidRequest, NotFound


class UploadNotFound(NotFound):
    code = "upload_not_found"


class UploadInvalid(InvalidRequest):
    code = "invalid_upload"


class UploadNotPending(Conflict):
    """Parts, complete and cancel need a pending upload; a completed, cancelled or expired one answers this."""

    code = "upload_not_pending"
