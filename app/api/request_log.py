"""Request ids and the request's log context (app.core.logs).

Every response carries X-Request-Id: the client's own when it sent a usable one (up to 128 visible
ASCII characters), else a fresh one. The id is bound for every line logged while the request is
served; the /v1 dependency bind_log_context adds the team and the path's job or evaluation id once
the key is known. Each request ends with one line on the `tuneforge.api.requests` logger (method,
route template, status, duration, and the ids), at INFO: in JSON logs it is the access log.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.audit import UNMATCHED
from app.api.deps import PrincipalDep
from app.api.routing import template
from app.core import logs

log = logging.getLogger("tuneforge.api.requests")

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode()
_USABLE = re.compile(r"[\x21-\x7e]{1,128}")


def request_id(scope: Scope) -> str:
    """The client's X-Request-Id when usable, else a new one."""
    for name, value in scope.get("headers") or ():
        if name == _HEADER_KEY:
            sent = value.decode("latin-1")
            if _USABLE.fullmatch(sent):
                return sent
            break
    return "req_" + uuid.uuid4().hex


class RequestIdMiddleware:
    """Binds the request id, echoes it in the response, and logs the request's line at its end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_HEADER_KEY, rid.encode("latin-1"))]
            await send(message)

        with logs.bound(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                principal = (scope.get("state") or {}).get("principal")
                params = scope.get("path_params") or {}
                route = template(scope) or UNMATCHED
                log.info("%s %s %d", scope["method"], route, status, extra={
                    "method": scope["method"], "route": route, "path": scope["path"], "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "team_id": getattr(principal, "team_id", None), "job_id": params.get("job_id"),
                    "evaluation_id": params.get("evaluation_id")})


async def bind_log_context(request: Request, principal: PrincipalDep) -> None:
    """For the rest of the request: the team, and the job or evaluation its path names. Async on
    purpose: a sync dependency runs on a thread whose context changes are lost when it returns."""
    logs.bind(team_id=principal.team_id, job_id=request.path_params.get("job_id"),
              evaluation_id=request.path_params.get("evaluation_id"))
