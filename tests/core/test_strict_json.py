"""Strict JSON: what Python's json reads but Tuneforge refuses, with the path to the value."""

from __future__ import annotations

import json

import pytest

from app.core import strict_json


@pytest.mark.parametrize(("text", "path"), [
    ('{"a": [1, NaN]}', ("a", 1)),
    ('{"a": {"b": Infinity}}', ("a", "b")),
    ("-Infinity", ()),
    ('{"x": 1e999}', ("x",)),
    ('{"x": [{"k": 1, "k": 2}]}', ("x", 0, "k")),
])
def test_non_finite_numbers_and_duplicate_keys_are_refused_with_their_path(text: str, path: tuple) -> None:
    with pytest.raises(strict_json.StrictJsonError) as caught:
        strict_json.loads(text)
    assert caught.value.path == path


def test_ordinary_json_reads_as_json_loads_does() -> None:
    text = '{"a": [1, 2.5, -1e300, null, true, "s"], "b": {"c": {}}, "d": []}'
    value = strict_json.loads(text)
    assert value == json.loads(text) and type(value["b"]) is dict


def test_malformed_json_still_raises_json_decode_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        strict_json.loads('{"a": ')


def test_first_nul_finds_keys_and_values_and_dotted_escapes_it() -> None:
    assert strict_json.first_nul({"a": ["x", "y\x00"]}) == ("a", 1)
    assert strict_json.first_nul({"ok": {"k\x00": 1}}) == ("ok", "k\x00")
    assert strict_json.first_nul({"a": ["x"], "b": 1.5}) is None
    assert strict_json.dotted(("metadata", "k\x00", 0)) == "metadata.k\\u0000.0"
