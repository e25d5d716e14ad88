"""Request body caps on the raw ASGI stream, for every route.

An upload (POST /v1/files) may carry `upload_max_bytes` plus room for the multipart envelope, a part
of a multipart upload (POST /v1/uploads/{id}/parts) `uploads.part_max_bytes` plus the same room; every
other body `request_max_bytes`. The cap holds whatever the client declares: a Content-Length over the
cap answers 413 before a byte of the body is read, and a chunked body (no Content-Length) is counted
as it arrives and cut off as soon as it crosses the cap. A body longer than its Content-Length never
reaches the app: uvicorn's HTTP parser hands over exactly the declared bytes and parses the surplus as
the next request, which it refuses as malformed.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import send_error
from app.core.config import get_settings
from app.core.errors import TooLarge

UPLOAD_ROUTES = frozenset({("POST", "/v1/files")})
PART_ROUTE = re.compile(r"/v1/uploads/[^/]+/parts")
# Room for the multipart envelope and the small form fields around an uploaded file.
ENVELOPE_BYTES = 64 * 1024


class BodyLimitMiddleware:
    """Answers 413 in the one error shape once a body crosses its route's cap. Past the cap the
    app's receive() raises TooLarge, so an upload in progress removes its temporary file; whatever
    the app then answers (a parse error, most often) is replaced by the 413."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        path = scope["path"].rstrip("/")
        if (scope["method"], path) in UPLOAD_ROUTES:
            limit = settings.upload_max_bytes + ENVELOPE_BYTES
            error = TooLarge(f"The upload exceeds the limit of {settings.upload_max_bytes} bytes.", param="file",
                             code="file_too_large")
        elif scope["method"] == "POST" and PART_ROUTE.fullmatch(path):
            part_max = settings.uploads.part_max_bytes
            limit = part_max + ENVELOPE_BYTES
            error = TooLarge(f"An upload part may hold at most {part_max} bytes; send the file in smaller parts.",
                             param="data", code="part_too_large")
        else:
            limit = settings.request_max_bytes
            error = TooLarge(f"The request body exceeds the limit of {limit} bytes; send less per request.",
                             code="request_too_large")
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, error, close=True)
            return

        received = 0
        refused = False
        answered: str | None = None  # "app" once the app's response started, "ours" once the 413 did

        async def capped_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise error
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if answered == "ours":
                return
            if message["type"] == "http.response.start" and answered is None:
                if refused:
                    answered = "ours"
                    await send_error(send, error, close=True)
                    return
                answered = "app"
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not refused or answered is not None:
                raise
            await send_error(send, error, close=True)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            # The HTTP parser has already refused a malformed value.
            return int(value) if value.isdigit() else None
    return None
