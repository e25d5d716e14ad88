"""Every error rendered in one shape: {"error": {"message", "type", "param", "code"}}.

Domain errors carry their own status/code/param. Request validation errors
(the body does not match the schema) answer 422 with the offending field as
param. Database or broker outages answer 503; a value the database cannot
hold (NUL in text) answers 400; a constraint a concurrent request got to first
answers 409; any other database error is a 500 like every unexpected one (it
is logged, and retrying would not help, so it is not reported as an outage).
Nothing leaks a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import TuneforgeError
from app.domains.quotas.errors import RateLimited

log = logging.getLogger("tuneforge.api")

_HTTP_TYPES = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


class ErrorDetail(BaseModel):
    # Some errors add fields (a refused file lists its line errors).
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Documented on every /v1 route, so clients (and schema checks) know the error shape of each status.
RESPONSES: dict = {
    "4XX": {"model": ErrorResponse, "description": "Refused: 400 invalid, 401 no or bad key, 404 not found or "
                                                  "another team's, 409 conflict, 413 too large, 422 schema, "
                                                  "429 quota or rate limit."},
    503: {"model": ErrorResponse, "description": "The database or the broker is unavailable; retry later."},
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def _headers(exc: TuneforgeError) -> dict[str, str] | None:
    if exc.status_code == 401:
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after)}
    return None


async def _tuneforge_error(_: Request, exc: TuneforgeError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code, **exc.extra),
                        status_code=exc.status_code, headers=_headers(exc))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid request")
    message = f"Invalid value for '{param}': {msg}" if param else f"Invalid request: {msg}"
    if len(errors) > 1:
        others = "; ".join(f"{_loc_to_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[1:5])
        message += f" (also: {others})"
    code = "invalid_" + ("value" if param else "request")
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=422)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and detail == "Not Found":
        detail = "Unknown route. See /docs for the API."
    return JSONResponse(error_body(detail, type_, None, None), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _database_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return JSONResponse(error_body("The database is unavailable; retry shortly.", "server_error", None, "unavailable"),
                        status_code=503, headers={"Retry-After": "5"})


async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    # A dropped connection surfaces as a plain DBAPIError with connection_invalidated set.
    if exc.connection_invalidated:
        return await _database_down(request, exc)
    return await _unexpected(request, exc)


async def _constraint_violation(_: Request, exc: IntegrityError) -> JSONResponse:
    # The checks before each write passed, so a concurrent request wrote a conflicting row first.
    log.warning("constraint violation: %s", exc.orig)
    return JSONResponse(error_body("The request conflicts with a change made at the same time; retry it.",
                                   "invalid_request_error", None, "conflict"), status_code=409)


async def _unstorable_value(_: Request, exc: DataError) -> JSONResponse:
    # The database refused a value the schema allowed: Postgres text cannot hold NUL, and numbers
    # have ranges. That is the request's fault, whichever route it reached.
    log.info("value refused by the database: %s", exc.orig)
    return JSONResponse(error_body("A value in the request cannot be stored or searched for: text must not contain "
                                   "NUL (\\u0000) characters and numbers must be in range.",
                                   "invalid_request_error", None, "invalid_value"), status_code=400)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("Internal error; it has been logged.", "server_error", None, "internal_error"),
                        status_code=500)


def install(app: FastAPI) -> None:
    # Starlette types a handler as taking any Exception; each of these takes the class it is registered for.
    handlers: list[tuple[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]]] = [
        (TuneforgeError, _tuneforge_error),
        (RequestValidationError, _validation_error),
        (StarletteHTTPException, _http_error),
        (OperationalError, _database_down),
        (InterfaceError, _database_down),
        (IntegrityError, _constraint_violation),
        (DBAPIError, _database_error),
        (PoolTimeout, _database_down),  # every pooled connection busy: overloaded
        (DataError, _unstorable_value),
        (Exception, _unexpected),
    ]
    for exc_class, handler in handlers:
        app.add_exception_handler(exc_class, handler)
