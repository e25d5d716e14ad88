"""JSON as Tuneforge accepts it, in request bodies and in uploaded JSONL alike.

Python's json module reads more than RFC 8259 allows: the literals NaN, Infinity and -Infinity
(and numbers like 1e999 overflow to infinity), and objects with the same key twice, where the
last one silently wins. Other parsers disagree on both, Postgres's jsonb cannot hold a non-finite
number, and a value that answers back as null is not the value sent. So both are refused, with
the path of the offending value, so that the error can name it.
"""

from __future__ import annotations

import json
import math
from typing import Any

Path = tuple[str | int, ...]


class StrictJsonError(ValueError):
    """The text is JSON to Python but not to Tuneforge. `path` leads to the offending value
    (keys and list indexes from the top; empty for the top level itself)."""

    def __init__(self, problem: str, path: Path) -> None:
        super().__init__(f"{problem} (at {dotted(path)})" if path else problem)
        self.problem = problem
        self.path = path


class _NonFinite:
    """Stands in for a non-finite number while parsing, so that the walk can tell where it was."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


class _Duplicated(dict):
    """An object that had `key` more than once."""

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


def _constant(literal: str) -> _NonFinite:
    return _NonFinite(literal)


def _float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _Duplicated(pairs, key)
        seen.add(key)
    return dict(pairs)


def loads(text: str | bytes) -> Any:
    """json.loads, refusing non-finite numbers and duplicate keys with StrictJsonError (a ValueError).
    Malformed JSON raises json.JSONDecodeError, as json.loads does."""
    value = json.loads(text, parse_constant=_constant, parse_float=_float, object_pairs_hook=_pairs)
    _check(value, ())
    return value


def _check(value: Any, path: Path) -> None:
    # Iterative, so that a deeply nested document cannot exhaust the stack here after json read it.
    stack: list[tuple[Any, Path]] = [(value, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, _NonFinite):
            raise StrictJsonError(f"{item.literal} is not a finite number (JSON has no NaN or Infinity); "
                                  "send a finite number", at)
        if isinstance(item, _Duplicated):
            raise StrictJsonError(f'the key "{item.key}" appears more than once in one object; keep one',
                                  (*at, item.key))
        if isinstance(item, dict):
            stack.extend((v, (*at, k)) for k, v in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend((v, (*at, i)) for i, v in reversed(list(enumerate(item))))


# Text without a NUL, as a JSON Schema pattern: for the OpenAPI document of a parameter or field whose
# NUL is refused before the object it names is looked up, so that the refusal is the schema's.
NUL_FREE_PATTERN = r"^[^\x00]*$"


def first_nul(value: Any) -> Path | None:
    """The path of the first string, key or value, that holds a NUL (\\u0000), which Postgres text
    cannot store; None when there is none. A key's path ends with that key."""
    stack: list[tuple[Any, Path]] = [(value, ())]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return at
        elif isinstance(item, dict):
            for k in item:
                if "\x00" in k:
                    return (*at, k)
            stack.extend((v, (*at, k)) for k, v in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend((v, (*at, i)) for i, v in reversed(list(enumerate(item))))
    return None


def dotted(path: Path) -> str:
    """OpenAI's param style: messages.1.content. A NUL in a key is shown escaped, as \\u0000."""
    return ".".join(str(p).replace("\x00", "\\u0000") for p in path)
