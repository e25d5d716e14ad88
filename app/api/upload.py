"""Streaming multipart upload: bytes go from the socket to a temporary file in
storage while being hashed, counted and validated as JSONL, in one pass. A part
of a multipart upload (/v1/uploads) is read the same way, unvalidated: its lines
may continue in the next part.

Memory stays flat whatever the size: nothing is buffered beyond one chunk and
the validator's one-line window. A file over the limit is refused with 413 as
soon as the limit is crossed, and the temporary file is removed: nothing
half-written survives a refused upload. The raw body (envelope included) is
capped before it gets here, by app/api/limits.py.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.core.errors import InvalidRequest, TooLarge
from app.core.storage import Storage
from app.domains.files.validation import JsonlValidator, ValidationReport

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_MAX_FIELDS = 16
_MAX_FIELD_BYTES = 4096


@dataclass
class ReceivedFile:
    fields: dict[str, str]
    filename: str
    temp_path: str
    bytes: int
    sha256: str

    def discard(self) -> None:
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


@dataclass
class ReceivedUpload(ReceivedFile):
    report: ValidationReport


@dataclass
class _State:
    storage: Storage
    max_bytes: int
    validator: JsonlValidator | None
    file_field: str  # the multipart field that carries the file
    fields: dict[str, str] = field(default_factory=dict)
    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    part_name: str | None = None
    part_filename: str | None = None
    field_value: bytearray = field(default_factory=bytearray)
    file = None
    filename: str | None = None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0
    complete: bool = False  # the closing boundary was read: a body cut short never sets it

    # -- python-multipart callbacks --
    def on_part_begin(self) -> None:
        self.headers, self.part_name, self.part_filename = {}, None, None
        self.field_value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest("A multipart part has no name.", param="file", code="invalid_multipart")
        self.part_name = name.decode("utf-8", "replace")
        if b"filename" in options:
            if self.part_name != self.file_field:
                raise InvalidRequest(f"Unexpected file field {self.part_name!r}; send the "
                                     f"{'dataset' if self.file_field == 'file' else 'bytes'} as {self.file_field!r}.",
                                     param=self.part_name, code="invalid_multipart")
            if self.file is not None:
                raise InvalidRequest(f"Send exactly one {self.file_field!r} per request.", param=self.file_field,
                                     code="invalid_multipart")
            self.part_filename = options[b"filename"].decode("utf-8", "replace")
            if "\x00" in self.part_filename:
                raise InvalidRequest("The file name contains a NUL (\\u0000) character; rename the file.",
                                     param=self.file_field, code="invalid_filename")
            self.filename = self.part_filename
            self.file = self.storage.temp_file()
        elif len(self.fields) >= _MAX_FIELDS:
            raise InvalidRequest("Too many form fields.", param=self.part_name, code="invalid_multipart")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part_filename is None:
            self.field_value += chunk
            if len(self.field_value) > _MAX_FIELD_BYTES:
                raise InvalidRequest(f"Form field {self.part_name!r} is too long.", param=self.part_name,
                                     code="invalid_multipart")
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise TooLarge(f"The {'file' if self.file_field == 'file' else 'part'} exceeds the limit of "
                           f"{self.max_bytes} bytes.", param=self.file_field,
                           code="file_too_large" if self.file_field == "file" else "part_too_large")
        assert self.file is not None  # on_headers_finished opened it for this file part
        self.file.write(chunk)
        self.digest.update(chunk)
        if self.validator is not None:
            self.validator.feed(chunk)

    def on_part_end(self) -> None:
        if self.part_filename is None and self.part_name is not None:
            value = self.field_value.decode("utf-8", "replace")
            if "\x00" in self.part_name or "\x00" in value:
                name = self.part_name.replace("\x00", "\\u0000")
                raise InvalidRequest(f"Form field {name!r} contains a NUL (\\u0000) character; remove it.",
                                     param=name, code="invalid_value")
            self.fields[self.part_name] = value

    def on_end(self) -> None:
        self.complete = True

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished", "on_end")}


async def receive_upload(request: Request, *, storage: Storage, max_bytes: int,
                         validator: JsonlValidator) -> ReceivedUpload:
    """Read a multipart body with one 'file' part. Raises TooLarge (413) or InvalidRequest (400);
    on any error the temporary file is gone. The caller owns the returned temp file."""
    state = _State(storage=storage, max_bytes=max_bytes, validator=validator, file_field="file")
    received = await _receive(request, state, fields="fields 'purpose' and 'file'", what="the dataset")
    return ReceivedUpload(**vars(received), report=validator.finish())


async def receive_part(request: Request, *, storage: Storage, max_bytes: int) -> ReceivedFile:
    """Read a multipart body with one 'data' part (a part of a /v1/uploads upload), unvalidated.
    Raises as receive_upload does; the caller owns the returned temp file."""
    state = _State(storage=storage, max_bytes=max_bytes, validator=None, file_field="data")
    return await _receive(request, state, fields="the field 'data'", what="the part's bytes")


async def _receive(request: Request, state: _State, *, fields: str, what: str) -> ReceivedFile:
    name = state.file_field
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidRequest(f"Upload with Content-Type multipart/form-data, {fields}.",
                             param=name, code="invalid_content_type")
    parser = MultipartParser(params[b"boundary"], cast("MultipartCallbacks", state.callbacks()))
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        _close(state, delete=True)
        raise InvalidRequest("The client disconnected before the upload finished.", param=name,
                             code="upload_incomplete") from None
    except MultipartParseError as exc:
        _close(state, delete=True)
        raise InvalidRequest(f"The multipart body is malformed ({exc}); send {fields} as "
                             "multipart/form-data.", param=name, code="invalid_multipart") from None
    except BaseException:
        _close(state, delete=True)
        raise
    if not state.complete:
        _close(state, delete=True)
        raise InvalidRequest("The multipart body ends before its closing boundary: the upload was cut short. "
                             "Send it again, complete.", param=name, code="upload_incomplete")
    if state.file is None:
        raise InvalidRequest(f"No file in the upload: send {what} in a multipart field named {name!r}.",
                             param=name, code="missing_file")
    _close(state, delete=False)
    return ReceivedFile(fields=state.fields, filename=state.filename or "upload.jsonl",
                        temp_path=state.file.name, bytes=state.size, sha256=state.digest.hexdigest())


def _close(state: _State, *, delete: bool) -> None:
    if state.file is None:
        return
    state.file.close()
    if delete:
        try:
            os.unlink(state.file.name)
        except FileNotFoundError:
            pass
