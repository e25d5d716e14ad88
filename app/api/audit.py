"""The audit log's writer: an ASGI middleware around every /v1 route.

AuditMiddleware records every POST/PUT/PATCH/DELETE under /v1, whatever its outcome: who (team and
key, from the principal the auth dependency leaves in the request state; none for a 401), the action
(method + route template), the object (the path's id, else the id in the JSON response) and the
status. The row is written before the last byte of the response is sent, so a client that got its
answer can read the row at once. A failure to write it is logged and does not change the answer.
"""

from __future__ import annotations

import json
import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.db import session_scope
from app.domains.audit import service as audit

log = logging.getLogger("tuneforge.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_CAPTURE = 64 * 1024  # a response's id is only looked for in small JSON bodies


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500
        captured: bytearray | None = None
        recorded = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, captured, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                captured = bytearray() if content_type.startswith(b"application/json") else None
            elif message["type"] == "http.response.body":
                if captured is not None:
                    captured += message.get("body", b"")
                    if len(captured) > _MAX_CAPTURE:
                        captured = None
                if not message.get("more_body", False) and not recorded:
                    recorded = True
                    await _record(scope, status, bytes(captured) if captured is not None else None)
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            if not recorded:
                recorded = True
                await _record(scope, 500, None)
            raise
        if not recorded:  # the response never finished (the client went away)
            await _record(scope, status, None)


def _object_id(scope: Scope, body: bytes | None) -> str | None:
    params = scope.get("path_params") or {}
    if params:
        return str(list(params.values())[-1])
    if body:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return value["id"]
    return None


def _template(scope: Scope) -> str | None:
    """The matched route's full template ("/v1/files/{file_id}"). The route in the scope knows only its
    path below the routers' prefixes; the prefix is what precedes it in the request's path."""
    relative = getattr(scope.get("route"), "path_format", None)
    if relative is None:
        return None
    rendered = relative
    for name, value in (scope.get("path_params") or {}).items():
        rendered = rendered.replace("{" + name + "}", str(value))
    path = scope["path"]
    return path[: len(path) - len(rendered)] + relative if path.endswith(rendered) else None


async def _record(scope: Scope, status: int, body: bytes | None) -> None:
    route = _template(scope)
    template = route or scope["path"]
    principal = (scope.get("state") or {}).get("principal")
    team_id, key_id = getattr(principal, "team_id", None), getattr(principal, "key_id", None)
    action, object_id = f"{scope['method']} {template}", _object_id(scope, body) if route else None

    def write() -> None:
        try:
            with session_scope() as session:
                audit.record(session, team_id=team_id, key_id=key_id, action=action, object_id=object_id,
                             status_code=status)
        except Exception:  # the answer stands; the gap is logged
            log.exception("could not write the audit row %s", {"team_id": team_id, "key_id": key_id, "action": action,
                                                                "object_id": object_id, "status_code": status})

    await anyio.to_thread.run_sync(write)
