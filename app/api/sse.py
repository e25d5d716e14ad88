"""Server-sent events (the text/event-stream format) for live lists: each message carries the
object's id as `id:`, so a client that reconnects sends it back as Last-Event-ID and resumes after
it, and its JSON as `data:`. Comments (lines starting with ':') keep idle connections open through
proxies that close silent ones."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from fastapi.responses import StreamingResponse

log = logging.getLogger("tuneforge.api")

# How often a stream asks the database for what is new: each poll is one short session (no
# connection is held between polls), so an event reaches the client at most this late.
POLL_SECONDS = 0.5
# A comment is sent after this long without a message.
KEEPALIVE_SECONDS = 15.0
# Events read per poll; a backlog is read in pages of this many without waiting between them.
PAGE = 500
RESPONSES: dict[int | str, dict] = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                          "description": "With stream=true: the events as server-sent events."}}


def message(event_id: str, data: str) -> bytes:
    """One SSE message. `data` is one line of JSON (which never holds a raw newline)."""
    return f"id: {event_id}\ndata: {data}\n\n".encode()


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


class Streamed(Protocol):
    """An object a stream sends: its id, and its JSON (a pydantic model)."""

    @property
    def id(self) -> str: ...

    def model_dump_json(self) -> str: ...


# fetch(after, limit) -> (up to limit objects after the id `after`, oldest first; whether the source ended)
Fetch = Callable[[str | None, int], Awaitable[tuple[Sequence[Streamed], bool]]]


def stream(fetch: Fetch, *, after: str | None, poll_seconds: float = POLL_SECONDS,
           keepalive_seconds: float = KEEPALIVE_SECONDS) -> StreamingResponse:
    """A text/event-stream response of the objects fetch(after, limit) returns (oldest first, each
    with an `id`), polled until fetch says the source has ended and nothing newer is left. A fetch
    that raises ends the stream (the client resumes with Last-Event-ID)."""

    async def events() -> AsyncIterator[bytes]:
        last, quiet_since = after, time.monotonic()
        yield comment("stream open")
        while True:
            try:
                batch, ended = await fetch(last, PAGE)
            except Exception:
                log.exception("event stream ended by a failed read")
                return
            for item in batch:
                yield message(item.id, item.model_dump_json())
                last = item.id
            if batch:
                quiet_since = time.monotonic()
            if len(batch) == PAGE:
                continue
            if ended:
                return
            if time.monotonic() - quiet_since >= keepalive_seconds:
                yield comment("keep-alive")
                quiet_since = time.monotonic()
            await asyncio.sleep(poll_seconds)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
