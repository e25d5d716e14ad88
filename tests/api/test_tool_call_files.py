"""Tool-call, weighted and content-part chat files through the official openai client: they upload, and a
job trains on them with the loss where the records put it; a bad weight or tool_call_id is refused by line
and field, and nothing is stored."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from app.domains.files import formats
from tests.factories import wait_for_job
from worker.training.data import format_record, tokenize_records

TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tool_record(city: str, sky: str) -> dict:
    call = {"id": f"call_{city}", "type": "function",
            "function": {"name": "weather", "arguments": json.dumps({"city": city})}}
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": sky},
        {"role": "assistant", "content": f"{sky.capitalize()} in {city}."},
    ]}


RECORDS = [
    tool_record("Paris", "sunny"),
    tool_record("Oslo", "snowing"),
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "one."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "x + 1"}]}]},
    {"messages": [{"role": "user", "content": "Add two."},
                  {"role": "assistant", "content": "x - 2, a wrong answer the model must not learn", "weight": 0},
                  {"role": "user", "content": "No."},
                  {"role": "assistant", "content": "x + 2", "weight": 1}]},
]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def stored_files(services_env) -> list[Path]:
    return [p for p in (Path(services_env["TUNEFORGE_DATA_DIR"]) / "storage").rglob("*") if p.is_file()]


@pytest.fixture
def oai(server, make_team):
    _, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield client, key
    client.close()


def test_a_tool_call_weighted_and_content_part_file_uploads_and_trains(oai, api, worker, tiny_model):
    client, key = oai
    f = client.files.create(file=("tools.jsonl", jsonl(RECORDS)), purpose="fine-tune")
    assert f.bytes == len(jsonl(RECORDS))
    assert client.files.retrieve(f.id).model_extra["format"] == "chat"
    assert client.files.retrieve(f.id).model_extra["examples"] == len(RECORDS)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, hyperparameters={"n_epochs": 1})
    done = wait_for_job(api(key), job.id)
    assert done["status"] == "succeeded", done

    # The job's data holds exactly the target tokens the records ask for: the tool calls and answers, not
    # the tool results, and not the weight-0 turn.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    # what the job trained on is the text serving renders for the same conversation
    assert format_record(RECORDS[0], tokenizer) == formats.render_chat(tokenizer, RECORDS[0]["messages"], TOOLS)
    expected = tokenize_records(RECORDS, tokenizer, 2048, completion_only=True)
    unweighted = [{"messages": [{k: v for k, v in m.items() if k != "weight"} for m in r["messages"]],
                   **({"tools": r["tools"]} if "tools" in r else {})} for r in RECORDS]
    assert expected.num_target_tokens < tokenize_records(unweighted, tokenizer, 2048,
                                                         completion_only=True).num_target_tokens
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    data = [e.data for e in events if e.data and "target_tokens" in e.data]
    assert data and data[-1]["examples"] == len(RECORDS)
    assert (data[-1]["tokens"], data[-1]["target_tokens"]) == (expected.num_tokens, expected.num_target_tokens)
    losses = [e.data["loss"] for e in events if e.type == "metrics" and e.data and "loss" in e.data]
    assert losses and all(loss == loss and loss < 1e4 for loss in losses)  # finite


@pytest.mark.parametrize("bad, param", [
    ({"messages": [{"role": "user", "content": "Add two."},
                   {"role": "assistant", "content": "x + 2", "weight": 0.5}]}, '"messages"[1]["weight"]'),
    ({"messages": [{"role": "user", "content": "Add two.", "weight": 1},
                   {"role": "assistant", "content": "x + 2"}]}, '"messages"[0]["weight"]'),
    ({**tool_record("Rome", "rain"), "messages": [
        *tool_record("Rome", "rain")["messages"][:2],
        {"role": "tool", "tool_call_id": "call_Roma", "content": "rain"},
        tool_record("Rome", "rain")["messages"][3]]}, '"messages"[2]["tool_call_id"]'),
], ids=["weight_not_0_or_1", "weight_on_user", "unknown_tool_call_id"])
def test_a_bad_weight_or_tool_call_id_is_refused_by_line_and_field_and_nothing_is_stored(oai, services_env, bad,
                                                                                         param):
    client, _ = oai
    before = stored_files(services_env)
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("bad.jsonl", jsonl([RECORDS[0], bad])), purpose="fine-tune")
    body = exc.value.body
    assert body["param"] == "file" and body["type"] == "invalid_request_error"
    assert [e["line"] for e in body["errors"]] == [2]
    assert body["errors"][0]["message"].startswith(param)
    assert f"line 2: {param}" in exc.value.message
    assert list(client.files.list()) == [] and stored_files(services_env) == before
