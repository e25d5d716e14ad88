"""Responses that send a stored blob: a file's content, an adapter's archive, an evaluation's results."""

from __future__ import annotations

import os
from typing import Any

from fastapi.responses import RedirectResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from app.core.config import get_settings
from app.core.errors import TuneforgeError
from app.core.storage import get_storage

# How the download routes document the redirect they answer with TUNEFORGE_STORAGE__PRESIGNED_DOWNLOADS.
REDIRECT_RESPONSE: dict[int | str, dict[str, Any]] = {302: {"description": (
    "With S3 storage and TUNEFORGE_STORAGE__PRESIGNED_DOWNLOADS=true: Location is a presigned URL of the "
    "object, valid for TUNEFORGE_STORAGE__PRESIGN_SECONDS; fetch it without the API key.")}}


def stream_blob(key: str, *, missing: TuneforgeError, media_type: str, filename: str | None = None,
                headers: dict[str, str] | None = None) -> Response:
    """Open the blob before any header is sent, then stream from the open handle. A delete that
    commits meanwhile removes the name, not the open file (POSIX; an S3 GET already answering), so
    the body still arrives whole; a blob already gone raises `missing` (the route's 404) rather than
    a 200 cut short. Content-Length is the size of the blob that was opened.

    Where the backend can presign and the settings ask for it, answers 302 to a short-lived URL of
    the blob instead (after checking it exists, so a missing blob is still the route's 404)."""
    storage = get_storage()
    headers = dict(headers or {})
    if filename is not None:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if get_settings().storage.presigned_downloads:
        url = storage.download_url(key, filename=filename)
        if url is not None:
            if not storage.exists(key):
                raise missing
            return RedirectResponse(url, status_code=302, headers={
                k: v for k, v in headers.items() if k != "Content-Disposition"})
    try:
        handle = storage.open(key)
    except FileNotFoundError:
        raise missing from None
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)

    def chunks():
        with handle:
            yield from iter(lambda: handle.read(1 << 20), b"")

    # The background close covers a client that leaves before the body is read to its end.
    return StreamingResponse(chunks(), media_type=media_type, background=BackgroundTask(handle.close),
                             headers={**headers, "Content-Length": str(size)})
