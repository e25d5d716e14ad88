"""Core error type. Domains subclass it; app/api/errors.py renders it.

Every error carries the HTTP status, OpenAI's error type, a stable code and the
offending parameter, so one handler can render {"error": {...}} everywhere.
"""

from __future__ import annotations


class TuneforgeError(Exception):
    status_code: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 extra: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.extra = extra or {}


class InvalidRequest(TuneforgeError):
    status_code = 400


class Unauthorized(TuneforgeError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(TuneforgeError):
    status_code = 404
    code = "not_found"


class Conflict(TuneforgeError):
    status_code = 409
    code = "conflict"


class TooLarge(TuneforgeError):
    status_code = 413
    code = "too_large"


class Unavailable(TuneforgeError):
    status_code = 503
    type = "server_error"
    code = "unavailable"
