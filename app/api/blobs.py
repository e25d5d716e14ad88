"""Responses that stream a stored blob: a file's content, an adapter's archive, an evaluation's results."""

from __future__ import annotations

import os

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from app.core.errors import TuneforgeError
from app.core.storage import get_storage


def stream_blob(key: str, *, missing: TuneforgeError, media_type: str,
                headers: dict[str, str] | None = None) -> StreamingResponse:
    """Open the blob before any header is sent, then stream from the open handle. A delete that
    commits meanwhile removes the name, not the open file (POSIX), so the body still arrives whole;
    a blob already gone raises `missing` (the route's 404) rather than a 200 cut short.
    Content-Length is the size of the file that was opened."""
    try:
        handle = get_storage().open(key)
    except FileNotFoundError:
        raise missing from None
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)

    def chunks():
        with handle:
            yield from iter(lambda: handle.read(1 << 20), b"")

    # The background close covers a client that leaves before the body is read to its end.
    return StreamingResponse(chunks(), media_type=media_type, background=BackgroundTask(handle.close),
                             headers={**(headers or {}), "Content-Length": str(size)})
