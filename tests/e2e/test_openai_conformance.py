"""Conformance with the official openai client: every serving method it has that Tuneforge supports, driven
against the real API forwarding to a real `tuneforge inference` process on the tiny random model, and every
RAW response body (each stream chunk too) validated with the client's own pydantic type in strict mode, so a
field of the wrong type, a missing required field or a value outside the client's Literal fails here even
where the client's lenient parsing would let it through. Invalid values end in openai.BadRequestError naming
the parameter."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from openai.types import Completion, CompletionChoice, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from tests.conftest import _stop, start_inference
from tests.e2e.test_serving import _store_adapter
from tests.factories import create_team
from tests.worker.test_grammar import HERMES_TEMPLATE, TOOLS, Forecast, Point, _format

BASE = "tiny-llama"
TIMEOUT = 120.0
ASK = [{"role": "user", "content": "What will the weather be in Oslo?"}]
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def served(services_env, server, tiny_model, tmp_path_factory):
    """An inference process on the tiny base, and a team with an adapter whose chat template has tool support."""
    from tests.worker.inference.conftest import make_adapter

    team_id, key = create_team()
    adapter = make_adapter(tiny_model, tmp_path_factory.mktemp("conformance") / "hermes", seed=31)
    (adapter / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    model = f"ft:{BASE}:conform-{secrets.token_hex(3)}"
    _store_adapter(team_id, model, adapter)
    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / "inference-conformance.log"
    proc, url = start_inference(services_env, log, BASE, timeout=TIMEOUT)
    yield {"url": url, "key": key, "hermes": model}
    _stop(proc)


@pytest.fixture(scope="module")
def client(served, server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=served["key"], max_retries=0, timeout=TIMEOUT) as sdk:
        yield sdk


class CompletionChunkChoice(CompletionChoice):
    finish_reason: Literal["stop", "length", "content_filter"] | None  # type: ignore[assignment]


class CompletionChunk(Completion):
    """The client's Completion as the type of a stream's chunk: OpenAI's own streams send `finish_reason: null`
    until a choice ends, which the client's CompletionChoice (shared by both) does not type; every other field
    is held to the client's type as it is."""

    choices: list[CompletionChunkChoice]  # type: ignore[assignment]


def _strict(kind: type[BaseModel], body: Any) -> Any:
    """`body` (decoded JSON) validated by the client's type in strict mode; the validated object."""
    return kind.model_validate(body, strict=True)


def _create(method, **kwargs) -> dict:
    """Call a client method through with_raw_response; the raw JSON body, after checking that the client parses
    it too."""
    response = method(**kwargs)
    response.parse()
    return response.http_response.json()


def _events(method, **kwargs) -> list[dict]:
    """A stream's raw chunks (the JSON of each `data:` event), checked to end with `data: [DONE]`."""
    with method(stream=True, **kwargs) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def _completion(client, **kwargs) -> Completion:
    kwargs = {"model": BASE, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **kwargs}
    return _strict(Completion, _create(client.completions.with_raw_response.create, **kwargs))


def _chat(client, **kwargs) -> ChatCompletion:
    kwargs = {"model": BASE, "messages": ASK, "max_tokens": 80, "temperature": 0, **kwargs}
    return _strict(ChatCompletion, _create(client.chat.completions.with_raw_response.create, **kwargs))


# --- completions ----------------------------------------------------------------------------------


def test_a_completion_validates(client):
    out = _completion(client)
    (choice,) = out.choices
    assert out.object == "text_completion" and out.model == BASE and choice.index == 0
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


@pytest.mark.parametrize("prompt", [["def add(", "class Box:"], [[5, 17], [42, 9]]], ids=["texts", "token_ids"])
def test_batched_prompts_with_n_validate_in_prompt_major_order(client, prompt):
    out = _completion(client, prompt=prompt, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    singles = [_completion(client, prompt=p, n=2) for p in prompt]
    assert [c.text for c in out.choices] == [c.text for s in singles for c in s.choices]


def test_completion_logprobs_validate(client):
    out = _completion(client, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens) == out.usage.completion_tokens
    assert "".join(logprobs.tokens) == out.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(len(top) <= 2 and lp <= 0 for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs,
                                                              strict=True))


def test_an_echoed_completion_begins_with_its_prompt(client):
    plain, echoed = _completion(client), _completion(client, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_best_of_validates(client):
    out = _completion(client, best_of=3, n=1, temperature=0.9, seed=4)
    assert len(out.choices) == 1


def test_a_completion_stream_validates_chunk_by_chunk(client):
    chunks = [_strict(CompletionChunk, c) for c in _events(
        client.completions.with_streaming_response.create, model=BASE, prompt=PROMPT, max_tokens=6, temperature=0,
        logprobs=1, stream_options={"include_usage": True})]
    *texts, usage = chunks
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 6
    assert all(c.usage is None and len(c.choices) == 1 for c in texts)
    assert texts[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in texts) == _completion(client).choices[0].text


# --- chat -----------------------------------------------------------------------------------------


def test_a_chat_completion_with_n_validates(client):
    out = _chat(client, n=2, temperature=0.9, seed=5, max_tokens=openai.omit, max_completion_tokens=8)
    assert out.object == "chat.completion" and [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


def test_chat_logprobs_with_top_logprobs_validate(client):
    out = _chat(client, logprobs=True, top_logprobs=3, max_tokens=6)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def test_a_chat_stream_validates_chunk_by_chunk(client):
    chunks = [_strict(ChatCompletionChunk, c) for c in _events(
        client.chat.completions.with_streaming_response.create, model=BASE, messages=ASK, max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2, stream_options={"include_usage": True})]
    *pieces, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert pieces[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in pieces[1:])
    assert pieces[-1].choices[0].finish_reason == "length"
    whole = _chat(client, max_tokens=6).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == whole


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "plot"}}],
                         ids=["auto", "required", "named"])
def test_tool_choices_validate(client, tool_choice):
    out = _chat(client, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    choice = out.choices[0]
    if tool_choice == "auto":  # the tiny model writes no call of its own
        assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
        return
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        {"get_forecast": Forecast, "plot": Point}[call.function.name].model_validate_json(call.function.arguments)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in choice.message.tool_calls] == ["plot"]


@pytest.mark.parametrize("model", ["base", "hermes"])
def test_a_tool_round_trip_validates(client, served, model):
    name = BASE if model == "base" else served["hermes"]
    first = _chat(client, model=name, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    message = first.choices[0].message
    (call,) = message.tool_calls
    follow_up = [*ASK, message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Rain, 4 degrees."}]
    out = _chat(client, model=name, messages=follow_up, tools=TOOLS, max_tokens=8)
    assert out.usage.prompt_tokens > first.usage.prompt_tokens


def test_a_streamed_forced_tool_call_validates_chunk_by_chunk(client):
    chunks = [_strict(ChatCompletionChunk, c) for c in _events(
        client.chat.completions.with_streaming_response.create, model=BASE, messages=ASK, max_tokens=80,
        temperature=0, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name in ("get_forecast", "plot")
    json.loads("".join(d.function.arguments or "" for d in deltas))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_response_format_json_object_validates(client):
    out = _chat(client, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_response_format_json_schema_validates(client):
    out = _chat(client, response_format=_format(Point))
    Point.model_validate_json(out.choices[0].message.content)


def test_parse_with_a_pydantic_model_validates_and_round_trips(client):
    response = client.chat.completions.with_raw_response.parse(model=BASE, messages=ASK, max_tokens=80,
                                                               temperature=0, response_format=Forecast)
    raw = _strict(ChatCompletion, response.http_response.json())
    parsed = response.parse().choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert parsed == Forecast.model_validate_json(raw.choices[0].message.content)


def test_the_clients_stream_helper_parses_a_structured_answer(client):
    with client.chat.completions.stream(model=BASE, messages=ASK, max_tokens=80, temperature=0,
                                        response_format=Point) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Point)


# --- models ---------------------------------------------------------------------------------------


def test_models_list_and_retrieve_validate(client, served):
    raw = _create(client.models.with_raw_response.list)
    assert raw["object"] == "list"
    models = {m["id"]: _strict(Model, m) for m in raw["data"]}
    assert {BASE, served["hermes"]} <= set(models)
    assert _strict(Model, _create(client.models.with_raw_response.retrieve, model=served["hermes"])).id == \
        served["hermes"]


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": 200}, "n"),
    ({"n": 64, "max_tokens": 4}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_chat_values_raise_bad_request_naming_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": BASE, "messages": ASK, "max_tokens": 4, **kwargs})
    body = caught.value.body
    assert caught.value.status_code == 400 and body["type"] == "invalid_request_error"
    assert body["param"] == param, body


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"logprobs": 6}, "logprobs"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"suffix": "return a"}, "suffix"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_completion_values_raise_bad_request_naming_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": BASE, "prompt": PROMPT, "max_tokens": 4, **kwargs})
    assert caught.value.status_code == 400 and caught.value.body["param"] == param, caught.value.body


@pytest.mark.parametrize("method", ["chat", "completions"])
def test_an_unknown_parameter_is_refused_as_openai_refuses_it(client, method):
    create = client.chat.completions.create if method == "chat" else client.completions.create
    args = {"messages": ASK} if method == "chat" else {"prompt": PROMPT}
    with pytest.raises(openai.BadRequestError) as caught:
        create(model=BASE, max_tokens=4, temperature=5, extra_body={"frobnicate": 1}, **args)
    assert caught.value.body == {"message": "Unrecognized request argument supplied: frobnicate",
                                 "type": "invalid_request_error", "param": "frobnicate", "code": "unknown_parameter"}


def test_parameters_that_change_nothing_here_are_taken_at_the_values_that_ask_for_nothing(client):
    out = _chat(client, max_tokens=4, user="u-1", safety_identifier="s-1", prompt_cache_key="k",
                prompt_cache_retention="24h", store=False, service_tier="auto", modalities=["text"])
    assert out.usage.completion_tokens <= 4
    assert _completion(client, user="u-1").usage.completion_tokens <= 6


@pytest.mark.parametrize("kwargs", [
    {"store": True}, {"metadata": {"team": "x"}}, {"service_tier": "priority"}, {"modalities": ["text", "audio"]},
    {"reasoning_effort": "low"}, {"verbosity": "low"}, {"prediction": {"type": "content", "content": "x"}},
    {"audio": {"voice": "alloy", "format": "mp3"}}, {"web_search_options": {}},
], ids=lambda kwargs: next(iter(kwargs)))
def test_a_feature_this_server_lacks_is_refused_by_name(client, kwargs):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, max_tokens=4, **kwargs)
    assert caught.value.body["param"] == next(iter(kwargs))
    assert caught.value.body["code"] == "unsupported_parameter"
