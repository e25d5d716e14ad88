"""The audit log's writer for the HTTP layer: which row a mutating /v1 request gets, and when.

Every POST/PUT/PATCH/DELETE under /v1 is recorded, whatever its outcome:

- A request made with a valid key whose transaction writes: its row (team, key, action = method +
  route template, object = the path's id, else the first row the transaction inserted, status = the
  route's) is added to that transaction just before it commits (a before_commit hook on every session
  used while the request runs), so the mutation and its row are committed together or not at all.
- A request made with a valid key that committed nothing (refused: 4xx/5xx; or a no-op, such as an
  idempotent replay): its row, with the status answered and the id in the JSON response, goes to the
  audit writer (app.domains.audit.writer: its own connection, a bounded queue, retried), which writes
  it before the last byte of the response is sent, waiting at most WAIT_SECONDS.
- A request with no key, a bad key, or a path no route serves: counted per minute, route template
  ("unmatched" for junk paths), status and client address prefix in audit_unauthenticated, never a
  row each.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.routing import template as _template
from app.core.db import utcnow
from app.domains.audit import service as audit
from app.domains.audit import writer

log = logging.getLogger("tuneforge.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_CAPTURE = 64 * 1024  # a response's id is only looked for in small JSON bodies
WAIT_SECONDS = 5.0  # how long a refused request's answer waits for its row (it is written later if need be)
UNMATCHED = "unmatched"


@dataclass(eq=False)
class _Audited:
    """The mutating request in progress; shared by the threads its dependencies and route run in."""

    scope: Scope
    committed_status: int | None = None  # the status in the row committed with the mutation


_current: ContextVar[_Audited | None] = ContextVar("tuneforge_audited_request", default=None)
_WRITES, _FIRST_ID, _ROW = "audit.writes", "audit.first_id", "audit.row"


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        request = _Audited(scope)
        token = _current.set(request)
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
                    await _record(request, status, bytes(captured) if captured is not None else None)
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            if not recorded:
                recorded = True
                await _record(request, 500, None)
            raise
        finally:
            _current.reset(token)
        if not recorded:  # the response never finished (the client went away)
            await _record(request, status, None)


def _object_id(scope: Scope, body: bytes | None) -> str | None:
    """The path's id, else the "id" of a JSON response."""
    if (path_id := _path_id(scope)) is not None:
        return path_id
    if body:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return value["id"]
    return None


def _principal(scope: Scope) -> Any:
    return (scope.get("state") or {}).get("principal")


def _path_id(scope: Scope) -> str | None:
    params = scope.get("path_params") or {}
    return str(list(params.values())[-1]) if params else None


def _client_prefix(scope: Scope) -> str:
    """The client's network, not its address: IPv4 /24, IPv6 /48 (what one client can easily vary)."""
    host = (scope.get("client") or (None,))[0]
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    bits = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


async def _record(request: _Audited, status: int, body: bytes | None) -> None:
    scope = request.scope
    if request.committed_status is not None:  # written with the mutation
        if status != request.committed_status:
            log.warning("%s %s committed (audit row status %d) but answered %d", scope["method"], scope["path"],
                        request.committed_status, status)
        return
    route = _template(scope)
    principal = _principal(scope)
    if principal is None:
        minute = utcnow().replace(second=0, microsecond=0)
        writer.count((minute, scope["method"], route or UNMATCHED, status, _client_prefix(scope)))
        return
    row = {"team_id": principal.team_id, "key_id": principal.key_id,
           "action": f"{scope['method']} {route or UNMATCHED}",
           "object_id": _object_id(scope, body) if route else None, "status_code": status, "created_at": utcnow()}
    loop = asyncio.get_running_loop()
    written = loop.create_future()

    def settle() -> None:
        if not written.done():
            written.set_result(None)

    def done() -> None:
        loop.call_soon_threadsafe(settle)

    writer.submit(row, done)
    try:
        await asyncio.wait_for(written, WAIT_SECONDS)
    except TimeoutError:  # the writer is retrying; the answer need not wait for it
        log.warning("the audit row of %s %s is not written yet; answering anyway", scope["method"], scope["path"])


# The row of a mutation, in the mutation's transaction. These hooks see every session; they act only
# in the context of a mutating request (the middleware's _current), and only once per request.

def _note_writes(session: Session) -> None:
    if session.new or session.deleted or any(session.is_modified(o) for o in session.dirty):
        session.info[_WRITES] = True
    if _FIRST_ID not in session.info:
        for obj in session.new:
            object_id = getattr(obj, "id", None)
            if isinstance(object_id, str):
                session.info[_FIRST_ID] = object_id
                break


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _flush_context: object) -> None:
    if _current.get() is not None:
        _note_writes(session)


@event.listens_for(Session, "do_orm_execute")
def _on_execute(state: ORMExecuteState) -> None:
    if _current.get() is not None and (state.is_insert or state.is_update or state.is_delete):
        state.session.info[_WRITES] = True


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    request = _current.get()
    if request is None or request.committed_status is not None or _ROW in session.info:
        return
    principal = _principal(request.scope)
    _note_writes(session)
    if principal is None or not session.info.get(_WRITES):
        return
    scope = request.scope
    status = getattr(scope.get("route"), "status_code", None) or 200
    audit.record(session, team_id=principal.team_id, key_id=principal.key_id,
                 action=f"{scope['method']} {_template(scope) or scope['path']}",
                 object_id=_path_id(scope) or session.info.get(_FIRST_ID), status_code=status)
    session.info[_ROW] = (request, status)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    entry = session.info.pop(_ROW, None)
    if entry is not None:
        request, status = entry
        request.committed_status = status
    session.info.pop(_WRITES, None)
    session.info.pop(_FIRST_ID, None)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    for key in (_ROW, _WRITES, _FIRST_ID):
        session.info.pop(key, None)
