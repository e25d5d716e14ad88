"""Streaming validation of uploaded JSONL datasets.

Pure: no I/O, no web framework. The upload handler feeds bytes as they arrive and reads one
ValidationReport at the end; memory stays bounded by `max_line_bytes` whatever the file's size,
because a line longer than that is reported and its bytes dropped, never buffered.

Each line must be one valid record of one format (app/domains/files/formats.py), the same format
for the whole file, fixed by its first valid record. Lines are read as strict JSON
(app/core/strict_json.py): NaN, Infinity and a key twice in one object are errors of their line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.core import strict_json
from app.domains.files import formats
from app.domains.files.formats import FORMATS, TASK_FORMATS, TRAINABLE_FORMATS  # noqa: F401 (re-exported)

DEFAULT_MAX_LINE_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class LineError:
    """One problem in the file. `line` is 1-based; 0 means the file as a whole (the empty file).
    `message` says what is wrong and how to fix it, without the "line N: " prefix (see __str__)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class ValidationReport:
    """`format` is fixed by the first valid record (None when there is none); `examples` counts valid
    records; `errors` holds the first max_errors problems, in line order, while `error_count` counts
    them all; `lines` counts every line, blank and invalid ones included (a last line without "\\n"
    counts, an empty tail after the last "\\n" does not)."""

    format: str | None
    examples: int
    errors: list[LineError]
    lines: int
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and self.examples > 0


class JsonlValidator:
    """Feed the file's bytes in chunks of any size (a line may span chunks), then call finish() once.

    The validator keeps at most max_line_bytes + 1 bytes of the current line (the +1 is room for the
    "\\r" of a CRLF line): a longer line is reported with its number and skipped to its newline.
    Raises ValueError for a non-positive limit and RuntimeError for feed() after finish().
    """

    def __init__(self, *, max_errors: int = 10, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_errors < 1:
            raise ValueError(f"max_errors must be at least 1; got {max_errors}")
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be at least 1; got {max_line_bytes}")
        self.max_errors = max_errors
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()  # the current line's bytes so far, never more than max_line_bytes + 1
        self._skipping = False  # inside an over-long line: drop bytes up to the next newline
        self._line = 1  # number of the line being read
        self._line_start = 0  # file offset of its first byte
        self._offset = 0  # bytes fed so far
        self._format: str | None = None
        self._format_line = 0
        self._examples = 0
        self._nonblank = 0
        self._errors: list[LineError] = []
        self._error_count = 0
        self._report: ValidationReport | None = None

    @property
    def buffered(self) -> int:
        """Bytes of the current, unfinished line held in memory."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> None:
        if self._report is not None:
            raise RuntimeError("feed() called after finish(); use a new JsonlValidator per file")
        if not isinstance(chunk, (bytes, bytearray)):
            chunk = bytes(chunk)
        pos, size = 0, len(chunk)
        while pos < size:
            newline = chunk.find(b"\n", pos)
            end = size if newline == -1 else newline
            if self._skipping:
                pass
            elif len(self._buffer) + (end - pos) > self.max_line_bytes + 1:
                self._buffer.clear()
                self._skipping = True
                self._too_long()
            elif newline != -1 and not self._buffer:
                self._check_line(chunk[pos:end])  # the whole line is in this chunk: no buffering
            else:
                self._buffer += memoryview(chunk)[pos:end]
                if newline != -1:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    self._check_line(line)
            if newline == -1:
                break
            self._skipping = False
            self._line += 1
            self._line_start = self._offset + newline + 1
            pos = newline + 1
        self._offset += size

    def finish(self) -> ValidationReport:
        """The report; the last line need not end with a newline. Calling it again returns the same report."""
        if self._report is not None:
            return self._report
        lines = self._line - 1
        if self._skipping or self._buffer:
            lines = self._line
            if self._buffer:
                line = bytes(self._buffer)
                self._buffer.clear()
                self._check_line(line)
        if self._nonblank == 0:
            self._error(0, "the file is empty: it has no JSON lines; upload one JSON object per line, "
                           'e.g. {"messages": [{"role": "user", "content": "Hi"}, '
                           '{"role": "assistant", "content": "Hello!"}]}')
        self._report = ValidationReport(format=self._format, examples=self._examples, errors=self._errors,
                                        lines=lines, error_count=self._error_count)
        return self._report

    # --- one line -----------------------------------------------------------------------------

    def _error(self, line: int, message: str) -> None:
        self._error_count += 1
        if len(self._errors) < self.max_errors:
            self._errors.append(LineError(line, message))

    def _too_long(self) -> None:
        self._nonblank += 1
        self._error(self._line, f"the line is longer than the limit of {self.max_line_bytes} bytes; "
                                "shorten this example or split it into several, one JSON object per line")

    def _check_line(self, line: bytes) -> None:
        number = self._line
        skipped = 0  # bytes removed from the line's start, to report offsets in the raw line
        if number == 1 and line.startswith(_BOM):
            line, skipped = line[len(_BOM):], len(_BOM)
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line_bytes:
            self._too_long()
            return
        if not line.strip():
            return
        self._nonblank += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            at = exc.start + skipped
            self._error(number, f"not valid UTF-8: byte 0x{line[exc.start]:02x} at byte offset {at} of the line "
                                f"(offset {self._line_start + at} in the file); save the file as UTF-8")
            return
        record = self._parse(number, text)
        if record is None:
            return
        fmt = formats.detect(record)
        if fmt is None:
            self._error(number, formats.unknown_format(record))
            return
        if self._format is not None and fmt != self._format:
            self._error(number, f"this record is {fmt} but the file's format is {self._format}, fixed by its "
                                f"first valid record on line {self._format_line}; a file holds one format: "
                                f"move the {fmt} records to a file of their own")
            return
        problems = formats.problems(record, fmt)
        for problem in problems:
            self._error(number, problem)
        if problems:
            return
        if self._format is None:
            self._format, self._format_line = fmt.value, number
        self._examples += 1

    def _parse(self, number: int, text: str) -> dict[str, Any] | None:
        try:
            record = strict_json.loads(text)
        except strict_json.StrictJsonError as exc:
            self._error(number, f"invalid JSON: {exc}")
            return None
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("\ufeff"):
                self._error(number, "a UTF-8 byte-order mark (BOM) in the middle of the file, probably from "
                                    "joining files; remove it")
            else:
                self._error(number, f"invalid JSON: {exc.msg} at column {exc.colno}; each line must be one "
                                    "complete JSON object")
            return None
        except RecursionError:
            self._error(number, "invalid JSON: nested too deeply to read; flatten the record")
            return None
        except ValueError as exc:  # e.g. an integer beyond Python's digit limit
            self._error(number, f"invalid JSON: {exc}")
            return None
        if not isinstance(record, dict):
            self._error(number, f'each line must be a JSON object ({{"key": value, ...}}); got {formats.shown(record)}')
            return None
        return record


def validate_bytes_iter(chunks: Iterable[bytes], **kw: Any) -> ValidationReport:
    """Validate a whole file given as chunks; keywords go to JsonlValidator."""
    validator = JsonlValidator(**kw)
    for chunk in chunks:
        validator.feed(chunk)
    return validator.finish()
