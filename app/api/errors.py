"""Every error rendered in one shape: {"error": {"message", "type", "param", "code"}}.

Domain errors carry their own status/code/param. Request validation errors
(the body does not match the schema, the body is not JSON, a path or query
parameter is invalid) answer 400 invalid_request_error, as OpenAI does, with
the offending field as param in OpenAI's dotted style ("messages.1.content");
422 is never used. Database or broker outages answer 503; a value the database cannot
hold (NUL in text) answers 400; a constraint a concurrent request got to first
answers 409; any other database error is a 500 like every unexpected one (it
is logged, and retrying would not help, so it is not reported as an outage).
Nothing leaks a stack trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

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
    400: {"model": ErrorResponse, "description": "Invalid request: a value breaks a rule of the schema or of the "
                                                 "domain, or the body is not JSON. `param` names the field in "
                                                 "dotted form, e.g. `messages.1.content`."},
    "4XX": {"model": ErrorResponse, "description": "Refused: 401 no or bad key, 403 role, 404 not found or another "
                                                  "team's, 409 conflict, 413 too large, 429 quota or rate limit."},
    503: {"model": ErrorResponse, "description": "The database or the broker is unavailable; retry later."},
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


_MISSING = object()


def _loc_to_param(loc: tuple, body: Any = _MISSING, *, missing: bool = False) -> str | None:
    """OpenAI's dotted name of the field an error's loc points at: ("body", "messages", 1, "content",
    "str") -> "messages.1.content". pydantic puts the member of a union it tried into loc ("str",
    "list[int]", "function-after[...]", a discriminator's value); such a part names no key of the
    input at that point, so the input (the body) tells field names from union tags. The last part of
    a `missing` error is the absent field. A path, query or header error is named by its parameter."""
    if not loc:
        return None
    if loc[0] in ("query", "path", "header", "cookie"):
        return str(loc[1]) if len(loc) > 1 else None
    parts = list(loc[1:] if loc[0] == "body" else loc)
    node = body
    names: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            names.append(str(part))
            node = node[part]
        elif isinstance(part, str) and isinstance(node, Mapping) and part in node:
            names.append(part)
            node = node[part]
        elif isinstance(part, str) and (node is _MISSING or (last and missing and isinstance(node, Mapping))):
            names.append(part)  # a required field that is absent, or a loc with no body to read it against
            node = _MISSING
        # anything else is the union member pydantic tried: not a field
    return ".".join(names) or None


def _headers(exc: TuneforgeError) -> dict[str, str] | None:
    if exc.status_code == 401:
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after)}
    return None


async def send_error(send: Send, exc: TuneforgeError, *, close: bool) -> None:
    """Answer exc in the one shape straight on the ASGI channel, for middleware that refuses a request
    before any route runs. close: the request's body is left unread, so the connection cannot carry
    another request."""
    body = json.dumps(error_body(exc.message, exc.type, exc.param, exc.code, **exc.extra)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in (_headers(exc) or {}).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _tuneforge_error(_: Request, exc: TuneforgeError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code, **exc.extra),
                        status_code=exc.status_code, headers=_headers(exc))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors() or [{"loc": (), "msg": "invalid request"}]
    if errors[0].get("type") == "json_invalid":
        reason = (errors[0].get("ctx") or {}).get("error", "not JSON")
        message = (f"The request body could not be parsed as JSON: {reason} at character {errors[0]['loc'][-1]}. "
                   "Send one JSON object with Content-Type: application/json.")
        return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_json"), status_code=400)
    body = exc.body if exc.body is not None else _MISSING
    # OpenAI's answer to a top-level field its API does not have, whatever else is wrong. A nested one may be
    # pydantic trying the wrong member of a union, so it is reported as any other error is.
    unknown = [e for e in errors if e.get("type") == "extra_forbidden" and len(e.get("loc", ())) == 2
               and e["loc"][0] == "body"]
    if unknown:
        param = _loc_to_param(tuple(unknown[0].get("loc", ())), body)
        return JSONResponse(error_body(f"Unrecognized request argument supplied: {param}", "invalid_request_error",
                                       param, "unknown_parameter"), status_code=400)
    named = [(_loc_to_param(tuple(e.get("loc", ())), body, missing=e.get("type") == "missing"), e.get("msg"))
             for e in errors]
    # A value that fits no member of a union fails once per member; the member that matched the input
    # furthest (the deepest param) is the one the client meant: [{"type": "text"}] as content is
    # reported at messages.0.content.0.text, not as "not a string" at messages.0.content.
    param, msg = max(named, key=lambda pm: len(pm[0].split(".")) if pm[0] else 0)
    if param:
        message = f"Invalid value for '{param}': {msg}"
    elif isinstance(exc.body, bytes | str):
        message = f"Invalid request: {msg}. Send the body as JSON with Content-Type: application/json."
    else:
        message = f"Invalid request: {msg}"
    others = list(dict.fromkeys(f"{p or 'body'}: {m}" for p, m in named if (p, m) != (param, msg)))
    if others:
        message += f" (also: {'; '.join(others[:4])})"
    code = "invalid_" + ("value" if param else "request")
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)


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
