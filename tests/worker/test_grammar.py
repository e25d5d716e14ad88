"""Constrained decoding in the inference engine (llguidance): on the tiny random model, whose unconstrained
output is never JSON, every constrained row must parse and validate, each row of a mixed batch against its own
grammar, streamed or not; forced tool calls are valid calls; a schema that does not compile is refused by name."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from app.domains.files import formats
from app.domains.serving import tools as tool_calls
from tests.worker.inference.conftest import make_engine, tiny  # noqa: F401  (fixtures)
from worker.inference.errors import GenerationInvalid


class Forecast(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=14)
    unit: Literal["c", "f"]


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)
    label: str = Field(max_length=6)


class Tags(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: list[Literal["red", "green", "blue"]] = Field(max_length=3)
    ok: bool


def _format(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema()
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": schema, "strict": True}}


def _tool(name: str, model: type[BaseModel]) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": model.model_json_schema()}}


TOOLS = [_tool("get_forecast", Forecast), _tool("plot", Point)]
PROMPTS = ("def fibonacci(n):", "import os\nclass Config:", "for i in range(10):")


@pytest.fixture
def engine(make_engine):  # noqa: F811
    return make_engine()


def test_unconstrained_output_of_the_tiny_model_is_not_json(engine):
    text = engine.submit(PROMPTS[0], max_tokens=40, temperature=0).result().choices[0].text
    with pytest.raises(ValueError):
        json.loads(text)


def test_each_row_of_one_batch_matches_its_own_schema(engine):
    engine.pause()  # queue them all, so they are admitted together
    schemas = [Forecast, Point, Tags]
    constrained = [engine.submit(p, max_tokens=80, temperature=0, response_format=_format(m))
                   for p, m in zip(PROMPTS, schemas, strict=True)]
    sampled = engine.submit(PROMPTS[1], max_tokens=80, temperature=0.9, seed=7, n=3, response_format=_format(Point))
    anything = engine.submit(PROMPTS[2], max_tokens=80, temperature=0, response_format={"type": "json_object"})
    free = engine.submit(PROMPTS[0], max_tokens=20, temperature=0)
    engine.resume()
    results = [g.result(timeout=120) for g in constrained]
    assert len({r.batch_id for r in results} | {sampled.result().batch_id, free.result().batch_id}) == 1
    for result, model in zip(results, schemas, strict=True):
        assert result.choices[0].finish_reason == "stop"
        model.model_validate_json(result.choices[0].text)
    assert len(sampled.result().choices) == 3
    for choice in sampled.result().choices:
        Point.model_validate_json(choice.text)
    assert isinstance(json.loads(anything.result().choices[0].text), dict)
    with pytest.raises(ValueError):
        json.loads(free.result().choices[0].text)


def test_streamed_constrained_deltas_add_up_to_valid_json(engine):
    generation = engine.submit(PROMPTS[2], max_tokens=80, temperature=0.7, seed=3, response_format=_format(Forecast))
    deltas = list(generation.stream(timeout=120))
    assert len(deltas) > 3
    text = "".join(d.text for d in deltas)
    assert text == generation.result().choices[0].text
    Forecast.model_validate_json(text)


def test_logprobs_of_a_constrained_row_leave_out_forbidden_tokens(engine):
    choice = engine.submit(PROMPTS[0], max_tokens=40, temperature=0, logprobs=5,
                           response_format=_format(Tags)).result().choices[0]
    assert choice.logprobs is not None
    first = choice.logprobs[0]
    assert first.token == "{" or first.token.startswith("{")
    assert all(lp > float("-inf") for _, lp in first.top)
    assert len(first.top) < 5  # a JSON object's first token has few spellings


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "plot"}}])
def test_a_forced_tool_call_is_a_valid_call(engine, choice):
    prompt = engine.encode_chat([{"role": "user", "content": "Plot the origin."}], tools=TOOLS)
    result = engine.submit(prompt, max_tokens=120, temperature=0, tools=TOOLS, tool_choice=choice,
                           parallel_tool_calls=False).result()
    assert result.choices[0].finish_reason == "stop"
    content, calls = tool_calls.parse(result.choices[0].text)
    assert content is None and len(calls) == 1
    models = {"get_forecast": Forecast, "plot": Point}
    if isinstance(choice, dict):
        assert calls[0].name == "plot"
    models[calls[0].name].model_validate_json(calls[0].arguments)


def test_tools_and_earlier_calls_are_rendered_for_a_template_without_tool_support(engine):
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_forecast", "arguments": '{"city": "Oslo", "days": 2, "unit": "c"}'}}]},
                {"role": "tool", "content": "rain", "tool_call_id": "call_1"}]
    text = engine.tokenizer.decode(engine.encode_chat(messages, tools=TOOLS))
    assert '"name": "get_forecast"' in text and '"maxLength": 12' in text  # the offered tools
    assert formats.tool_call_text("get_forecast", {"city": "Oslo", "days": 2, "unit": "c"}) in text
    assert "<|tool|>\nrain" in text


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/missing"}}}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
])
def test_a_schema_that_does_not_compile_is_refused_by_name(engine, response_format):
    with pytest.raises(GenerationInvalid) as caught:
        engine.submit(PROMPTS[0], max_tokens=8, response_format=response_format)
    assert caught.value.param == "response_format.json_schema.schema"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": response_format["json_schema"]["schema"]}}
    with pytest.raises(GenerationInvalid) as caught:
        engine.submit(PROMPTS[0], max_tokens=8, tools=[TOOLS[0], bad_tool], tool_choice="required")
    assert caught.value.param == "tools.1.function.parameters"


def test_tool_calls_are_parsed_from_text_and_from_a_stream():
    text = 'Let me check.\n<tool_call>\n{"name": "plot", "arguments": {"x": 1, "y": 2, "label": "a"}}\n</tool_call>'
    content, calls = tool_calls.parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("plot", {"x": 1, "y": 2, "label": "a"})]
    parser = tool_calls.CallParser()
    pieces = [p for i in range(0, len(text), 3) for p in parser.feed(text[i:i + 3])] + parser.finish()
    assert "".join(p for p in pieces if isinstance(p, str)) == "Let me check.\n"
    assert [p for p in pieces if isinstance(p, tool_calls.ParsedCall)] == calls
    assert tool_calls.parse("<tool_call>\n{not json}\n</tool_call>") == ("<tool_call>\n{not json}\n</tool_call>", [])
    assert tool_calls.parse("text <tool_call> unclosed") == ("text <tool_call> unclosed", [])


# A chat template with tool support in Qwen2.5's (Hermes) style, cut to what it does with tools and calls.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each function call, return a json object with function name and arguments within <tool_call></tool_call> tags.\
<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- for tc in m.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_with_tool_support_gets_the_tools_and_calls_natively(engine, tmp_path):
    from worker.inference import AdapterRef

    (tmp_path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    ref = AdapterRef(id="hermes", path=tmp_path, base="tiny")
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_forecast", "arguments": '{"city": "Oslo", "days": 2, "unit": "c"}'}}]},
                {"role": "tool", "content": "rain", "tool_call_id": "call_1"}]
    text = engine.tokenizer.decode(engine.encode_chat(messages, ref, tools=TOOLS))
    tools_block = text.split("<tools>")[1].split("</tools>")[0]
    assert '"get_forecast"' in tools_block and '"plot"' in tools_block
    # the template rendered the call from the arguments object, exactly as the tagged form the parser reads
    assert formats.tool_call_text("get_forecast", {"city": "Oslo", "days": 2, "unit": "c"}) in text
    assert "<tool_response>\nrain\n</tool_response>" in text
    assert "You may call one or more functions" not in text  # not the plain description
