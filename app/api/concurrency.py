"""In-flight limits: how many requests of one key, and of one team, this API process serves at once.

A request over either limit answers 429 `concurrency_limit_exceeded` with Retry-After at once: it
never waits for a thread or a connection, so one team's flood is answered with 429s while the
others' requests find the threads and the pool free (settings.concurrency; settings.database sizes
the pool to the threads).

The key's limit is checked here, in the middleware, before anything touches the database: the key
is the bearer secret's hash (a wrong secret only counts against itself, and fails authentication).
The team's is checked by the auth dependency once it knows the team (admit_team). Both slots are
held until the response's last byte is sent, streamed bodies included, and given back however the
request ends. Counts are per process: with several API processes, each holds its own.
"""

from __future__ import annotations

import hashlib
import threading

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import send_error
from app.core.config import get_settings
from app.domains.quotas.errors import TooManyInFlight

_HELD = "tuneforge.in_flight"  # scope["state"] entry: the slots this request holds
RETRY_AFTER = 1


class InFlight:
    """Counters of requests in flight by name ("key:…", "team:…"), shared by the event loop and the
    threadpool (the auth dependency runs on a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def enter(self, name: str, limit: int) -> bool:
        with self._lock:
            count = self._counts.get(name, 0)
            if count >= limit:
                return False
            self._counts[name] = count + 1
            return True

    def leave(self, name: str) -> None:
        with self._lock:
            count = self._counts.get(name, 0) - 1
            if count > 0:
                self._counts[name] = count
            else:
                self._counts.pop(name, None)


in_flight = InFlight()


class InFlightMiddleware:
    """Takes the key's slot for every /v1 request with a bearer key, and gives back every slot the
    request took (the key's, and the team's from admit_team) once it has ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        held: list[str] = []
        secret = _bearer(scope)
        if secret:
            name = "key:" + hashlib.sha256(secret).hexdigest()
            limit = get_settings().concurrency.per_key
            if not in_flight.enter(name, limit):
                await send_error(send, TooManyInFlight(
                    f"Too many requests in flight for this key: at most {limit} at once. Retry after "
                    f"{RETRY_AFTER} s, or send fewer requests in parallel.", retry_after=RETRY_AFTER),
                    close=_has_body(scope))
                return
            held.append(name)
        scope.setdefault("state", {})[_HELD] = held
        body_pending = _has_body(scope)

        async def receive_and_note() -> Message:
            nonlocal body_pending
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_pending = False
            return message

        async def send_closing_if_unread(message: Message) -> None:
            # An answer (a refusal, most often) sent before its body was read closes the connection:
            # a client still sending (a slow upload) learns of it, and the rest is never read.
            if message["type"] == "http.response.start" and body_pending:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive_and_note, send_closing_if_unread)
        finally:
            for name in held:
                in_flight.leave(name)


def admit_team(state: dict, team_id: str) -> None:
    """Take the team's slot for this request (given back by the middleware when it ends). Raises
    TooManyInFlight (429) when the team already has its limit of requests in flight. Does nothing
    outside the middleware (no slots are tracked there)."""
    held = state.get(_HELD)
    if held is None:
        return
    name = "team:" + team_id
    limit = get_settings().concurrency.per_team
    if not in_flight.enter(name, limit):
        raise TooManyInFlight(f"Too many requests in flight for this team: at most {limit} at once, all its keys "
                              f"together. Retry after {RETRY_AFTER} s, or send fewer requests in parallel.",
                              retry_after=RETRY_AFTER)
    held.append(name)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, secret = value.partition(b" ")
            return secret.strip() or None if scheme.lower() == b"bearer" else None
    return None
