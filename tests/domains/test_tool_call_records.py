"""Chat records in OpenAI's tool-call format, and per-message weights, as upload validation reads them."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from app.domains.files import formats
from app.domains.files.validation import LineError, validate_bytes_iter

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
RECORD = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "content": "Sunny.", "weight": 1},
]}


def broken(path: list[Any], value: Any = None, *, delete: bool = False) -> dict:
    """RECORD with the value at `path` replaced (or deleted)."""
    record = copy.deepcopy(RECORD)
    target: Any = record
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


def line_errors(*records: dict) -> list[LineError]:
    return validate_bytes_iter([b"".join(json.dumps(r).encode() + b"\n" for r in records)]).errors


def test_a_tool_call_conversation_is_a_valid_chat_record() -> None:
    report = validate_bytes_iter([json.dumps(RECORD).encode() + b"\n"])
    assert (report.format, report.examples, report.errors) == ("chat", 1, [])
    # without tools, with calls only (the last turn a call), and with an empty content beside the calls
    only_calls = {"messages": [RECORD["messages"][0], {"role": "assistant", "content": "", "tool_calls": [CALL]}]}
    assert line_errors({"messages": RECORD["messages"]}, only_calls) == []


@pytest.mark.parametrize("record, message", [
    (broken(["messages", 2, "tool_call_id"], "call_9"),
     '"messages"[2]["tool_call_id"] "call_9" matches no call an earlier assistant message issued (issued so far: '
     'call_1); set it to the "id" of the call this message answers'),
    (broken(["messages", 2, "tool_call_id"], delete=True),
     '"messages"[2]["tool_call_id"] is missing; a tool message answers a call: set it to the "id" of one of an '
     'earlier assistant message\'s "tool_calls"'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "x"},
                   {"role": "assistant", "tool_calls": [CALL]}]},
     '"messages"[1]["tool_call_id"] "call_1" matches no call an earlier assistant message issued (none was issued '
     'before it); set it to the "id" of the call this message answers'),
    (broken(["messages", 1, "tool_calls", 0, "id"], delete=True),
     '"messages"[1]["tool_calls"][0]["id"] must be a non-empty string (the tool message answering it repeats it '
     'as "tool_call_id"); got null'),
    (broken(["messages", 1, "tool_calls", 0, "type"], "code"),
     '"messages"[1]["tool_calls"][0]["type"] must be "function"; got "code"'),
    (broken(["messages", 1, "tool_calls", 0, "function", "name"], ""),
     '"messages"[1]["tool_calls"][0]["function"]["name"] must be a non-empty string; got ""'),
    (broken(["messages", 1, "tool_calls", 0, "function", "name"], "stocks"),
     '"messages"[1]["tool_calls"][0]["function"]["name"] "stocks" is not one of the record\'s "tools" (weather); '
     "define it there or call one of them"),
    (broken(["messages", 1, "tool_calls", 0, "function", "arguments"], {"city": "Paris"}),
     '"messages"[1]["tool_calls"][0]["function"]["arguments"] must be a string holding a JSON object, as OpenAI '
     'writes it (e.g. "{\\"city\\": \\"Paris\\"}"); got an object'),
    (broken(["messages", 1, "tool_calls", 0, "function", "arguments"], "{city: Paris}"),
     '"messages"[1]["tool_calls"][0]["function"]["arguments"] must be a string holding a JSON object; '
     '"{city: Paris}" does not parse as JSON'),
    (broken(["messages", 1, "tool_calls"], []),
     '"messages"[1]["tool_calls"] must be a non-empty array of calls like {"id": "...", "type": "function", '
     '"function": {"name": "...", "arguments": "{...}"}}; got []'),
    (broken(["messages", 0, "tool_calls"], [CALL]),
     '"messages"[0]["tool_calls"] is allowed only on assistant messages; remove it'),
    (broken(["messages", 3, "tool_call_id"], "call_1"),
     '"messages"[3]["tool_call_id"] is allowed only on tool messages; remove it'),
    (broken(["messages", 2, "content"], None),
     '"messages"[2]["content"] is null; give it a string (only an assistant message with "tool_calls" may leave '
     "it null)"),
    (broken(["tools", 0, "type"], "retrieval"),
     '"tools"[0] must be a function definition like {"type": "function", "function": {"name": "...", '
     '"description": "...", "parameters": {...}}}; got an object'),
    (broken(["tools"], "weather"),
     '"tools" must be an array of function definitions like {"type": "function", "function": {"name": "...", '
     '"description": "...", "parameters": {...}}}; got "weather"'),
    (broken(["tools", 0, "function", "parameters"], "object"),
     '"tools"[0]["function"]["parameters"] must be a JSON Schema object; got "object"'),
    (broken(["messages", 3, "weight"], 0.5),
     '"messages"[3]["weight"] must be 0 or 1 (1 = learn from this message); got 0.5'),
    (broken(["messages", 2, "weight"], 0),
     '"messages"[2]["weight"] is allowed only on assistant messages; remove it'),
], ids=["unknown_call_id", "tool_without_call_id", "result_before_its_call", "call_without_id", "call_not_function",
        "call_name_empty", "call_name_not_a_tool", "arguments_an_object", "arguments_not_json", "calls_empty",
        "calls_on_user", "call_id_on_assistant", "tool_content_null", "tool_not_function", "tools_not_array",
        "parameters_not_object", "weight_not_0_or_1", "weight_on_tool"])
def test_tool_call_and_weight_errors_name_the_line_and_the_field(record: dict, message: str) -> None:
    assert line_errors(RECORD, record) == [LineError(2, message)]


def test_a_call_id_issued_twice_is_refused() -> None:
    messages = [*RECORD["messages"], {"role": "user", "content": "And Rome?"},
                {"role": "assistant", "tool_calls": [CALL]}]
    assert line_errors({"tools": TOOLS, "messages": messages}) == [LineError(
        1, '"messages"[5]["tool_calls"][0]["id"] "call_1" was already issued by "messages"[1]; give each call its '
           "own id")]


def test_a_record_whose_every_assistant_turn_has_weight_0_trains_nothing_and_is_refused() -> None:
    record = {"messages": [RECORD["messages"][0], {"role": "assistant", "tool_calls": [CALL], "weight": 0}]}
    assert line_errors(record) == [LineError(
        1, '"messages" has no assistant message with non-empty content to learn from; add one like '
           '{"role": "assistant", "content": "..."} or set "weight": 1 on one')]


def test_template_messages_leave_weights_out_and_keep_the_tool_fields() -> None:
    turns = formats.template_messages(RECORD["messages"])
    assert turns[1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert turns[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert turns[3] == {"role": "assistant", "content": "Sunny."}


def test_the_plain_tool_layout_writes_calls_tagged_and_offers_the_tools_in_a_system_turn() -> None:
    turns = formats.plain_tool_messages(formats.template_messages(RECORD["messages"]), TOOLS)
    assert turns[0] == {"role": "system", "content": formats.tools_prompt(TOOLS)}
    assert turns[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "weather", "arguments": '
                                                       '{"city": "Paris"}}\n</tool_call>'}
    assert turns[3] == {"role": "tool", "content": "sunny"}
    with_system = formats.plain_tool_messages([{"role": "system", "content": "Be brief."}], TOOLS)
    assert with_system == [{"role": "system", "content": "Be brief.\n\n" + formats.tools_prompt(TOOLS)}]
