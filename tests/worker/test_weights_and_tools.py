"""Per-message weights, tool-call conversations and content parts in the training labels, laid out by the
rendering serving shares (formats.render_chat)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from app.domains.files import formats
from worker.training.data import (
    IGNORE_INDEX,
    chat_text_and_targets,
    encode_record_with_labels,
    format_record,
    load_examples,
    tokenize_records,
)
from worker.training.tiny import EOS

TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
TOOL_RECORD = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C."},
]}
TAGGED_CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEIGHTED = {"messages": [
    {"role": "user", "content": "Add one."},
    {"role": "assistant", "content": "x - 1", "weight": 0},
    {"role": "user", "content": "No: add one."},
    {"role": "assistant", "content": "x + 1", "weight": 1},
]}
# A template with tool support, as transformers' tool-use templates are written: it reads `tools` and each
# call's arguments as an object.
NATIVE_TEMPLATE = (
    "{% if tools %}<|system|>\nTOOLS {{ tools | tojson }}" + EOS + "\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}</call>{% endfor %}{% endif %}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def trained(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def ignored(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])


def without_weights(record: dict) -> dict:
    out = copy.deepcopy(record)
    for m in out["messages"]:
        m.pop("weight", None)
    return out


def test_a_weight_0_message_gets_label_minus_100_on_all_its_tokens(tokenizer):
    ids, labels = encode_record_with_labels(WEIGHTED, tokenizer, completion_only=True)
    plain_ids, plain_labels = encode_record_with_labels(without_weights(WEIGHTED), tokenizer, completion_only=True)
    assert ids == plain_ids  # the weighted-out turn is still read as context
    assert trained(tokenizer, ids, labels) == f"x + 1{EOS}\n"
    assert trained(tokenizer, plain_ids, plain_labels) == f"x - 1{EOS}\nx + 1{EOS}\n"
    dropped = [t for t, a, b in zip(ids, labels, plain_labels, strict=True) if a == IGNORE_INDEX and b != IGNORE_INDEX]
    assert tokenizer.decode(dropped) == f"x - 1{EOS}\n"
    # The trained-token count says so: exactly the weighted-out turn's tokens are gone from it.
    counted = tokenize_records([WEIGHTED], tokenizer, 512, completion_only=True)
    assert counted.num_target_tokens == tokenize_records([without_weights(WEIGHTED)], tokenizer, 512,
                                                         completion_only=True).num_target_tokens - len(dropped)
    assert counted.num_tokens == len(ids)


def test_a_weight_0_message_gets_no_loss_under_full_loss_either(tokenizer):
    ids, labels = encode_record_with_labels(WEIGHTED, tokenizer, completion_only=False)
    assert "x - 1" not in trained(tokenizer, ids, labels)
    assert ignored(tokenizer, ids, labels) == f"x - 1{EOS}\n"  # every other token, prompts too, is a target


def test_a_weight_0_message_gets_no_loss_without_a_template(tokenizer):
    tokenizer.chat_template = None
    ids, labels = encode_record_with_labels(WEIGHTED, tokenizer, completion_only=True)
    assert trained(tokenizer, ids, labels) == f"x + 1\n{EOS}"


def test_a_tool_call_conversation_renders_as_serving_renders_it_and_trains_on_the_calls(tokenizer):
    """The tiny model's template has no tool support: the plain tool layout, the same on both sides."""
    assert not formats.template_supports_tools(tokenizer.chat_template)
    messages = TOOL_RECORD["messages"]
    text = format_record(TOOL_RECORD, tokenizer)
    assert text == formats.render_chat(tokenizer, messages, TOOLS)
    assert text == chat_text_and_targets(messages, tokenizer, TOOLS)[0]
    # What serving sends the model before each assistant turn is the training text up to that turn, and
    # the model learns to continue it with exactly the turn.
    for turn, answer in ((2, TAGGED_CALL), (4, "Sunny and 21 C.")):
        prompt = formats.render_chat(tokenizer, messages[:turn], TOOLS, add_generation_prompt=True)
        assert text.startswith(prompt) and text[len(prompt):].startswith(answer + EOS)
    assert formats.tools_prompt(TOOLS) in text and "Answer briefly." in text

    ids, labels = encode_record_with_labels(TOOL_RECORD, tokenizer, completion_only=True)
    assert trained(tokenizer, ids, labels) == f"{TAGGED_CALL}{EOS}\nSunny and 21 C.{EOS}\n"
    rest = ignored(tokenizer, ids, labels)
    assert "sunny, 21 C" in rest and '"description": "The weather in a city"' in rest and "Weather in Paris?" in rest


def test_a_template_with_tool_support_renders_the_tools_and_calls_itself(tokenizer):
    tokenizer.chat_template = NATIVE_TEMPLATE
    assert formats.template_supports_tools(tokenizer.chat_template)
    messages = TOOL_RECORD["messages"]
    text = format_record(TOOL_RECORD, tokenizer)
    assert text == formats.render_chat(tokenizer, messages, TOOLS)
    assert text.startswith(f"<|system|>\nTOOLS {json.dumps(TOOLS)}")  # tools= reached the template
    call = '<call>weather {"city": "Paris"}</call>'  # arguments as an object, not the JSON string
    assert call in text and "<tool_call>" not in text
    ids, labels = encode_record_with_labels(TOOL_RECORD, tokenizer, completion_only=True)
    assert trained(tokenizer, ids, labels) == f"{call}{EOS}\nSunny and 21 C.{EOS}\n"
    assert "sunny, 21 C" in ignored(tokenizer, ids, labels)


def test_a_tool_call_conversation_without_a_template_is_the_plain_layout_with_eos(tokenizer):
    tokenizer.chat_template = None
    text = format_record(TOOL_RECORD, tokenizer)
    assert text == formats.render_chat(tokenizer, TOOL_RECORD["messages"], TOOLS) + EOS
    assert text.startswith(f"<|system|>\nAnswer briefly.\n\n{formats.tools_prompt(TOOLS)}\n")
    ids, labels = encode_record_with_labels(TOOL_RECORD, tokenizer, completion_only=True)
    assert trained(tokenizer, ids, labels) == f"{TAGGED_CALL}\nSunny and 21 C.\n{EOS}"


def test_content_part_records_train_on_their_joined_text(tokenizer, tmp_path: Path):
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "one."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x + 1"}]},
    ]}
    as_text = {"messages": [{"role": "user", "content": "Add one."}, {"role": "assistant", "content": "x + 1"}]}
    assert format_record(record, tokenizer) == format_record(as_text, tokenizer)
    path = tmp_path / "parts.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(TOOL_RECORD) + "\n" + json.dumps(WEIGHTED) + "\n")
    examples = load_examples(path, tokenizer, 512, completion_only=True)
    assert len(examples.input_ids) == 3 and examples.num_skipped == 0
    assert trained(tokenizer, examples.input_ids[0], examples.labels[0]) == f"x + 1{EOS}\n"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}, {"role": "assistant"}],
    [{"role": "user"}, {"role": "assistant", "content": "yo"}],
], ids=["assistant_without_content_or_calls", "user_without_content"])
def test_a_message_without_content_or_calls_cannot_be_rendered(tokenizer, messages):
    from worker.training.data import DataFormatError

    with pytest.raises(DataFormatError, match="content"):
        chat_text_and_targets(messages, tokenizer)
