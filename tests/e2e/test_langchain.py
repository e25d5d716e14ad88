"""LangChain's OpenAI integration (langchain-openai) against the real API forwarding to a real `tuneforge
inference` process on the tiny random model: ChatOpenAI's invoke, stream, bind_tools and with_structured_output,
and the completions model's invoke and batch. The tiny model writes nonsense, so free text is checked for its
shape only; what decoding is constrained to (a forced call, a schema) must come back valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI, OpenAI

from tests.conftest import _stop, start_inference
from tests.factories import create_team
from tests.worker.test_grammar import Forecast, Point

BASE = "tiny-llama"
TIMEOUT = 120.0
ASK = "What will the weather be in Oslo?"


@pytest.fixture(scope="module")
def served(services_env, server, tiny_model):
    _, key = create_team()
    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / "inference-langchain.log"
    proc, url = start_inference(services_env, log, BASE, timeout=TIMEOUT)
    yield {"base_url": f"{server}/v1", "api_key": key}
    _stop(proc)


@pytest.fixture
def chat(served) -> ChatOpenAI:
    return ChatOpenAI(model=BASE, temperature=0, max_tokens=80, max_retries=0, timeout=TIMEOUT, **served)


def test_invoke_answers_an_ai_message_with_usage(chat):
    out = chat.bind(max_tokens=8).invoke(ASK)
    assert isinstance(out, AIMessage) and isinstance(out.content, str) and out.content
    assert out.response_metadata["finish_reason"] in ("stop", "length")
    assert out.response_metadata["model_name"] == BASE
    assert out.usage_metadata["output_tokens"] <= 8
    assert out.usage_metadata["total_tokens"] == out.usage_metadata["input_tokens"] + out.usage_metadata[
        "output_tokens"]


def test_stream_yields_the_answer_in_chunks_then_its_usage(chat, served):
    streaming = ChatOpenAI(model=BASE, temperature=0, max_tokens=8, max_retries=0, timeout=TIMEOUT,
                           stream_usage=True, **served)
    chunks = list(streaming.stream(ASK))
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    whole = sum(chunks[1:], chunks[0])
    assert whole.content == chat.bind(max_tokens=8).invoke(ASK).content
    assert whole.usage_metadata["output_tokens"] == 8
    assert whole.response_metadata["finish_reason"] == "length"


@pytest.mark.parametrize("tool_choice", ["Point", "any"])
def test_bind_tools_with_a_forced_call_answers_tool_calls(chat, tool_choice):
    out = chat.bind_tools([Forecast, Point], tool_choice=tool_choice, parallel_tool_calls=False).invoke(ASK)
    (call,) = out.tool_calls
    assert call["id"].startswith("call_") and call["type"] == "tool_call"
    if tool_choice == "Point":
        assert call["name"] == "Point"
    {"Forecast": Forecast, "Point": Point}[call["name"]].model_validate(call["args"])
    assert out.response_metadata["finish_reason"] == "tool_calls" and not out.invalid_tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_answers_the_pydantic_model(chat, method):
    assert isinstance(chat.with_structured_output(Forecast, method=method).invoke(ASK), Forecast)


def test_with_structured_output_in_json_mode_answers_json(chat):
    # json_object makes the answer JSON, not the schema's: the raw answer must parse, whatever the parsed field.
    out = chat.with_structured_output(Forecast, method="json_mode", include_raw=True).invoke(f"{ASK} Answer in JSON.")
    assert isinstance(json.loads(out["raw"].content), dict)


def test_the_completions_model_invokes_and_batches(served):
    llm = OpenAI(model=BASE, temperature=0, max_tokens=6, max_retries=0, timeout=TIMEOUT, **served)
    one = llm.invoke("def add(")
    assert isinstance(one, str) and one
    both = llm.batch(["def add(", "class Box:"])
    assert both[0] == one and len(both) == 2 and all(isinstance(t, str) for t in both)
    result = llm.generate(["def add(", "class Box:"])
    assert [g[0].text for g in result.generations] == both
    assert result.llm_output["token_usage"]["completion_tokens"] <= 12
