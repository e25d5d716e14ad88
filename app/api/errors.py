"""Every error rendered in one shape: {"error": {"message", "type", "param", "code"}}.

Domain errors carry their own status/code/param. Request validation errors
(the body does not match the schema) answer 422 with the offending field as
param. Database or broker outages answer 503. Nothing else leaks a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import TuneforgeError

log = logging.getLogger("tuneforge.api")

_HTTP_TYPES = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


async def _tuneforge_error(_: Request, exc: TuneforgeError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code, **exc.extra),
                        status_code=exc.status_code, headers=headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid request")
    message = f"Invalid value for '{param}': {msg}" if param else f"Invalid request: {msg}"
    if len(errors) > 1:
        others = "; ".join(f"{_loc_to_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[1:5])
        message += f" (also: {others})"
    return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_" + ("value" if param else "request")),
                        status_code=422)


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


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("Internal error; it has been logged.", "server_error", None, "internal_error"),
                        status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(TuneforgeError, _tuneforge_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(DBAPIError, _database_down)
    app.add_exception_handler(Exception, _unexpected)
