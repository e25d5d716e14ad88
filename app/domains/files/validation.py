"""Streaming validation of uploaded JSONL datasets.

Pure: no I/O, no web framework. The upload handler feeds bytes as they arrive and reads one
ValidationReport at the end; memory stays bounded by `max_line_bytes` whatever the file's size,
because a line longer than that is reported and its bytes dropped, never buffered.

A file holds one JSON object per line, all of one format (FORMATS), told apart by their keys:

    chat               {"messages": [{"role": ..., "content": ...}, ...]}
    humaneval          {"prompt", "canonical_solution", "test", "entry_point"}   ("prompt" + any of the others)
    mbpp               {"text", "code", "test_list"}                            ("text" + "code" or "test_list")
    prompt_completion  {"prompt", "completion"}
    completions        {"task_id", "completion"}       (a model's outputs on code tasks, to be scored)
    text               {"text"}

checked in that order. Other keys are allowed and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FORMATS = ("chat", "prompt_completion", "text", "mbpp", "humaneval", "completions")
# Formats a fine-tuning job can learn from; "completions" is only scored by evaluations.
TRAINABLE_FORMATS = ("chat", "prompt_completion", "text", "mbpp", "humaneval")
# Formats an evaluation can take its code tasks from.
TASK_FORMATS = ("mbpp", "humaneval")
CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_LINE_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"
_HUMANEVAL_FIELDS = ("prompt", "canonical_solution", "test", "entry_point")
_NEEDS = {
    "humaneval": 'a humaneval record needs "prompt", "canonical_solution", "test" and "entry_point", '
                 "all non-empty strings",
    "mbpp": 'an mbpp record needs "text" and "code" (non-empty strings) and "test_list" '
            "(a non-empty array of assert statements as strings)",
    "prompt_completion": 'a prompt_completion record needs "prompt" (a string) and "completion" '
                         "(a non-empty string)",
    "text": 'a text record needs "text" (a non-empty string)',
    "completions": 'a completions record needs "task_id" (a string or integer) and "completion" (a string)',
}
_SHAPES = ('{"messages": [{"role": ..., "content": ...}, ...]} (chat), '
           '{"prompt": ..., "completion": ...} (prompt_completion), '
           '{"task_id": ..., "completion": ...} (completions), '
           '{"text": ...} (text), '
           '{"text": ..., "code": ..., "test_list": [...]} (mbpp), '
           '{"prompt": ..., "canonical_solution": ..., "test": ..., "entry_point": ...} (humaneval)')


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
        fmt = _detect(record)
        if fmt is None:
            self._error(number, f"no dataset format matches this record's keys ({_keys(record)}); "
                                f"write each line in one of these shapes: {_SHAPES}")
            return
        if self._format is not None and fmt != self._format:
            self._error(number, f"this record is {fmt} but the file's format is {self._format}, fixed by its "
                                f"first valid record on line {self._format_line}; a file holds one format: "
                                f"move the {fmt} records to a file of their own")
            return
        problems = _CHECKS[fmt](record)
        for problem in problems:
            self._error(number, problem)
        if problems:
            return
        if self._format is None:
            self._format, self._format_line = fmt, number
        self._examples += 1

    def _parse(self, number: int, text: str) -> dict[str, Any] | None:
        try:
            record = json.loads(text)
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
            self._error(number, f'each line must be a JSON object ({{"key": value, ...}}); got {_show(record)}')
            return None
        return record


def validate_bytes_iter(chunks: Iterable[bytes], **kw: Any) -> ValidationReport:
    """Validate a whole file given as chunks; keywords go to JsonlValidator."""
    validator = JsonlValidator(**kw)
    for chunk in chunks:
        validator.feed(chunk)
    return validator.finish()


# --- formats -----------------------------------------------------------------------------------


def _detect(record: dict[str, Any]) -> str | None:
    # Only the distinguishing keys decide, so an mbpp or humaneval record missing a field is reported
    # as such instead of passing as plain text or failing as an unknown shape.
    if "messages" in record:
        return "chat"
    if "prompt" in record and any(key in record for key in _HUMANEVAL_FIELDS[1:]):
        return "humaneval"
    if "text" in record and ("code" in record or "test_list" in record):
        return "mbpp"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "task_id" in record and "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    return None


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "an object" if value else "{}"
    if isinstance(value, list):
        return "an array" if value else "[]"
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 60 else shown[:56] + "...\""


def _keys(record: dict[str, Any]) -> str:
    if not record:
        return "none"
    keys = [json.dumps(key, ensure_ascii=False) for key in list(record)[:8]]
    return ", ".join(keys) + (", ..." if len(record) > 8 else "")


def _string(record: dict[str, Any], key: str, fmt: str, problems: list[str], *, non_empty: bool = True) -> None:
    if key not in record:
        problems.append(f'"{key}" is missing; {_NEEDS[fmt]}')
        return
    value = record[key]
    if not isinstance(value, str) or (non_empty and not value):
        kind = "a non-empty string" if non_empty else "a string"
        problems.append(f'"{key}" must be {kind}; got {_show(value)}')


def _check_chat(record: dict[str, Any]) -> list[str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return ['"messages" must be a non-empty array of {"role": ..., "content": ...} objects; '
                f"got {_show(messages)}"]
    problems: list[str] = []
    learnable = weighted_out = False
    for i, message in enumerate(messages):
        path = f'"messages"[{i}]'
        if not isinstance(message, dict):
            problems.append(f'{path} must be an object like {{"role": "user", "content": "..."}}; '
                            f"got {_show(message)}")
            continue
        role = message.get("role")
        if "role" not in message:
            problems.append(f'{path}["role"] is missing; set it to one of {", ".join(CHAT_ROLES)}')
        elif not isinstance(role, str) or role not in CHAT_ROLES:
            problems.append(f'{path}["role"] must be one of {", ".join(CHAT_ROLES)}; got {_show(role)}')
        content = message.get("content")
        calls_tools = role == "assistant" and isinstance(message.get("tool_calls"), list) and bool(
            message["tool_calls"])
        if content is None:
            if not calls_tools:
                state = "null" if "content" in message else "missing"
                problems.append(f'{path}["content"] is {state}; give it a string (only an assistant message '
                                'with "tool_calls" may leave it null)')
        elif not isinstance(content, str):
            problems.append(f'{path}["content"] must be a string; got {_show(content)}')
        weight = message.get("weight", 1)
        if "weight" in message:
            if role != "assistant":
                problems.append(f'{path}["weight"] is allowed only on assistant messages; remove it')
            elif type(weight) is not int or weight not in (0, 1):
                problems.append(f'{path}["weight"] must be 0 or 1 (1 = learn from this message); '
                                f"got {_show(weight)}")
        if role == "assistant" and isinstance(content, str) and content:
            if weight == 0:
                weighted_out = True
            else:
                learnable = True
    if not problems and not learnable:
        hint = ' or set "weight": 1 on one' if weighted_out else ""
        problems.append('"messages" has no assistant message with non-empty content to learn from; add one '
                        f'like {{"role": "assistant", "content": "..."}}{hint}')
    return problems


def _check_prompt_completion(record: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    _string(record, "prompt", "prompt_completion", problems, non_empty=False)
    _string(record, "completion", "prompt_completion", problems)
    return problems


def _check_text(record: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    _string(record, "text", "text", problems)
    return problems


def _check_mbpp(record: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    _string(record, "text", "mbpp", problems)
    _string(record, "code", "mbpp", problems)
    tests = record.get("test_list")
    if "test_list" not in record:
        problems.append(f'"test_list" is missing; {_NEEDS["mbpp"]}')
    elif not isinstance(tests, list) or not tests:
        problems.append('"test_list" must be a non-empty array of assert statements as strings; '
                        f"got {_show(tests)}")
    else:
        for i, test in enumerate(tests):
            if not isinstance(test, str) or not test:
                problems.append(f'"test_list"[{i}] must be a non-empty string (an assert statement); '
                                f"got {_show(test)}")
    task_id = record.get("task_id")
    if "task_id" in record and (type(task_id) is not int and not isinstance(task_id, str)):
        problems.append(f'"task_id" must be an integer or a string; got {_show(task_id)}')
    return problems


def _check_humaneval(record: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for key in _HUMANEVAL_FIELDS:
        _string(record, key, "humaneval", problems)
    if "task_id" in record and not isinstance(record["task_id"], str):
        problems.append(f'"task_id" must be a string like "HumanEval/0"; got {_show(record["task_id"])}')
    return problems


def _check_completions(record: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    task_id = record.get("task_id")
    if type(task_id) is not int and not isinstance(task_id, str):
        problems.append(f'"task_id" must be a string like "HumanEval/0" or an integer; got {_show(task_id)}')
    if not isinstance(record.get("completion"), str):
        problems.append(f'"completion" must be a string (the code the model wrote); got {_show(record.get("completion"))}')
    return problems


_CHECKS = {
    "completions": _check_completions,
    "chat": _check_chat,
    "prompt_completion": _check_prompt_completion,
    "text": _check_text,
    "mbpp": _check_mbpp,
    "humaneval": _check_humaneval,
}
