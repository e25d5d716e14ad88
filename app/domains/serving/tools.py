"""Tool calls in a model's answer: the tagged calls (Hermes/Qwen's convention, {"name": ..., "arguments":
{...}} in JSON between `<tool_call>` and `</tool_call>`) taken out of its text, whole or as it streams,
into OpenAI's tool_calls. How tools and earlier calls are written into a prompt is training's and
serving's one rendering, formats.render_chat; this module reads the same form back.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from app.domains.files.formats import TOOL_CALL_CLOSE as CALL_CLOSE
from app.domains.files.formats import TOOL_CALL_OPEN as CALL_OPEN


def call_id() -> str:
    """A tool call's id, in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


def _parse_call(body: str) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ParsedCall(name=value["name"], arguments=json.dumps(arguments))


def parse(text: str) -> tuple[str | None, list[ParsedCall]]:
    """The content and the tool calls of an answer: each well-formed tagged call is taken out of the text;
    what remains, stripped, is the content (None when empty and there were calls). A call that is not
    closed or not JSON stays in the content."""
    parser = CallParser()
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ParsedCall)]
    if calls:
        return (content.strip() or None), calls
    return content, calls


class CallParser:
    """Text as it streams in, split into content pieces (str) and finished calls (ParsedCall): text that
    may still become an opening tag is held back, and a call's text is held until its closing tag."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> list[str | ParsedCall]:
        self._buffer += text
        out: list[str | ParsedCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end == -1:
                    return out
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(CALL_CLOSE):]
                self._in_call = False
                call = _parse_call(body)
                out.append(call if call is not None else CALL_OPEN + body + CALL_CLOSE)
                continue
            start = self._buffer.find(CALL_OPEN)
            if start != -1:
                if start:
                    out.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(CALL_OPEN):]
                self._in_call = True
                continue
            keep = _partial_tag(self._buffer)
            if len(self._buffer) > keep:
                out.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
            return out

    def finish(self) -> list[str | ParsedCall]:
        """What is left at the end of the text: held-back text, or an unclosed call, as content."""
        rest = (CALL_OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return [rest] if rest else []


def _partial_tag(text: str) -> int:
    """The length of the longest end of `text` that begins CALL_OPEN."""
    for size in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
