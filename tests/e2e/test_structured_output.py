"""Structured output and tool calling through the official openai client: the real API forwarding to a real
`tuneforge inference` process on the tiny random model, whose unconstrained output is never JSON, so every
answer that parses here was made to parse by the grammar."""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import _stop, start_inference, wait_until
from tests.e2e.test_serving import _store_adapter
from tests.factories import create_team
from tests.worker.test_grammar import HERMES_TEMPLATE, TOOLS, Forecast, Point, Tags, _format

BASE = "tiny-llama"
TIMEOUT = 120.0
ASK = [{"role": "user", "content": "What will the weather be in Oslo?"}]


@pytest.fixture(scope="module")
def served(services_env, server, tiny_model, tmp_path_factory):
    """An inference process on the tiny base, and a team with an adapter whose chat template has tool support."""
    from tests.worker.inference.conftest import make_adapter

    team_id, key = create_team()
    adapter = make_adapter(tiny_model, tmp_path_factory.mktemp("structured") / "hermes", seed=21)
    (adapter / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    model = f"ft:{BASE}:hermes-{secrets.token_hex(3)}"
    _store_adapter(team_id, model, adapter)
    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / "inference-structured.log"
    proc, url = start_inference(services_env, log, BASE, timeout=TIMEOUT)
    yield {"url": url, "key": key, "hermes": model}
    _stop(proc)


@pytest.fixture
def client(served, server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=served["key"], max_retries=0, timeout=TIMEOUT)


def _chat(client, **kwargs):
    kwargs.setdefault("model", BASE)
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("max_tokens", 120)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(**kwargs)


def _recent_batches(server: str, key: str) -> list[dict]:
    r = httpx.get(f"{server}/v1/inference/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    (endpoint,) = [e for e in r.json()["data"] if e["base_model"] == BASE]
    return endpoint["stats"]["batches"]["recent"], endpoint["stats"]["queue_depth"]


def test_json_schemas_of_one_batch_each_validate(client, served, server):
    plan = [Forecast, Point, Tags]
    results: dict[int, object] = {}
    httpx.post(f"{served['url']}/v1/pause", timeout=10).raise_for_status()
    try:
        threads = [threading.Thread(target=lambda i=i, m=m: results.__setitem__(
            i, _chat(client, response_format=_format(m)))) for i, m in enumerate(plan)]
        for t in threads:
            t.start()
        wait_until(lambda: _recent_batches(server, served["key"])[1] == len(plan), timeout=TIMEOUT,
                   message="the three requests queued")
    finally:
        httpx.post(f"{served['url']}/v1/resume", timeout=10).raise_for_status()
    for t in threads:
        t.join(TIMEOUT)
    for i, model in enumerate(plan):
        choice = results[i].choices[0]
        assert choice.finish_reason == "stop"
        model.model_validate_json(choice.message.content)
    assert any(b["requests"] == 3 for b in _recent_batches(server, served["key"])[0])


def test_parse_with_a_pydantic_model_round_trips(client):
    out = client.chat.completions.parse(model=BASE, messages=ASK, max_tokens=120, temperature=0,
                                        response_format=Forecast)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert parsed == Forecast.model_validate_json(out.choices[0].message.content)


def test_a_streamed_json_schema_answer_validates(client):
    chunks = list(_chat(client, response_format=_format(Point), stream=True, temperature=0.8, seed=5))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    Point.model_validate_json(text)


def test_a_json_object_answer_parses(client):
    unconstrained = _chat(client, max_tokens=30).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(unconstrained)
    content = _chat(client, response_format={"type": "json_object"}).choices[0].message.content
    assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_forecast"}}])
@pytest.mark.parametrize("model", ["base", "hermes"])
def test_a_forced_tool_call_comes_back_as_tool_calls(client, served, tool_choice, model):
    name = BASE if model == "base" else served["hermes"]
    out = _chat(client, model=name, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    models = {"get_forecast": Forecast, "plot": Point}
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_forecast"
    models[call.function.name].model_validate_json(call.function.arguments)


def test_a_streamed_tool_call_arrives_as_tool_call_deltas(client):
    whole = _chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).choices[0].message
    chunks = list(_chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function" and deltas[0].index == 0
    assert deltas[0].function.name == whole.tool_calls[0].function.name
    assert "".join(d.function.arguments or "" for d in deltas) == whole.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("model", ["base", "hermes"])
def test_a_tool_result_follow_up_is_accepted(client, served, model):
    name = BASE if model == "base" else served["hermes"]
    first = _chat(client, model=name, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    follow_up = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Rain, 4 degrees."}]
    bare = _chat(client, model=name, messages=[*ASK], tools=TOOLS, tool_choice="none", max_tokens=4)
    out = _chat(client, model=name, messages=follow_up, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert out.choices[0].message.content is not None and out.choices[0].message.tool_calls is None
    assert out.usage.prompt_tokens > bare.usage.prompt_tokens + 10  # the call and its result are in the prompt


def test_tools_with_auto_parse_only_what_the_model_wrote(client):
    out = _chat(client, tools=TOOLS, max_tokens=30)
    choice = out.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


def test_a_schema_that_does_not_compile_answers_400_naming_it(client):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, response_format=bad)
    assert caught.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, response_format=bad, stream=True)
    assert caught.value.body["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_contradicting_tool_parameters_answer_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, **kwargs)
    assert caught.value.body["param"] == param
