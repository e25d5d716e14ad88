"""DPO jobs through the official openai client against the live API and a real worker: upload of
preference files, a job paused, checkpointed and resumed to success, DPO after SFT, and the 400s."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from tests.conftest import wait_until
from tests.factories import all_events, jsonl, wait_for_job

TIMES: dict[str, float] = {}


def preference_records(n: int) -> list[dict[str, Any]]:
    return [{"input": {"messages": [{"role": "user", "content": f"Write a function that adds {i} to x."}]},
             "preferred_output": [{"role": "assistant", "content": f"def add(x):\n    return x + {i}\n"}],
             "non_preferred_output": [{"role": "assistant", "content": f"I cannot help with adding {i}."}]}
            for i in range(n)]


def dpo(**hyperparameters: Any) -> dict[str, Any]:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


@pytest.fixture
def oai(server, make_team):
    _, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield client, key
    client.close()


def metric_steps(events: list[dict]) -> list[int]:
    return [e["data"]["step"] for e in events if e["type"] == "metrics" and e["data"] and "loss" in e["data"]]


def test_a_dpo_job_pauses_checkpoints_resumes_and_succeeds(oai, worker, api):
    client, key = oai
    f = client.files.create(file=("prefs.jsonl", jsonl(preference_records(8))), purpose="fine-tune")
    assert f.to_dict()["format"] == "preference"
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id, suffix="dpo", seed=5,
        method=dpo(beta=0.2, n_epochs=12, batch_size=1, learning_rate_multiplier=10),
        extra_body={"training": {"checkpoint_every_steps": 10}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    http = api(key)
    wait_until(lambda: len(metric_steps(all_events(http, job.id))) >= 3, timeout=300, interval=0.2,
               message="the DPO job to log steps")
    assert client.fine_tuning.jobs.pause(job.id).id == job.id
    paused = wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j,
                        timeout=120, message="the worker to pause the DPO job")
    at = max(metric_steps(all_events(http, job.id)))
    assert at < 96, "the job ended before the pause reached it"
    checkpoints = {c.step_number: c.metrics.to_dict() for c in client.fine_tuning.jobs.checkpoints.list(job.id)}
    assert at in checkpoints and {"train_loss", "rewards/margins", "rewards/accuracies", "rewards/chosen",
                                  "rewards/rejected"} <= set(checkpoints[at])
    assert paused.finished_at is None

    assert client.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    done = wait_for_job(http, job.id, timeout=600)
    TIMES["dpo_tiny_job_wall_seconds"] = round(time.monotonic() - started, 1)
    assert done["status"] == "succeeded", done
    events = all_events(http, job.id)
    steps = metric_steps(events)
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] == 96  # 8 pairs x 12 epochs
    assert any(e["message"] == f"Resuming from the checkpoint at step {at}" for e in events)
    last = next(e["data"] for e in events if e["type"] == "metrics" and e["data"] and e["data"].get("step") == 96)
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0
    assert last["train_loss"] < 0.69  # below log 2, where policy == reference
    kept = {c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)}
    assert kept == {70, 80, 90}  # every 10 steps, the newest keep_checkpoints (3) kept
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-llama:") and job.trained_tokens
    assert job.method.type == "dpo"
    usage = done["usage"]
    TIMES["dpo_tiny_tokens_per_second"] = round(usage["tokens_per_second"], 1)
    print(f"\nDPO job on the tiny model: {json.dumps(TIMES)}; trained_tokens {job.trained_tokens}")


def test_dpo_continues_from_a_supervised_job_s_model(trained, server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=trained["key"], max_retries=0)
    sft_model = trained["job"]["fine_tuned_model"]
    f = client.files.create(file=("prefs.jsonl", jsonl(preference_records(4))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=sft_model, training_file=f.id, suffix="dpo-after-sft", method=dpo(n_epochs=1),
        extra_body={"eval": {"tasks": trained["file_id"], "limit": 2, "max_tokens": 16, "timeout_seconds": 5}})
    assert job.model == sft_model and job.method.dpo.hyperparameters.beta == 0.1  # auto
    done = wait_for_job(trained["client"], job.id, timeout=300)
    assert done["status"] == "succeeded", done
    events = all_events(trained["client"], job.id)
    assert any(f"from the model it continues from, {sft_model}" in e["message"] for e in events)
    first = next(e["data"] for e in events if e["type"] == "metrics" and e["data"] and "loss" in e["data"])
    assert abs(first["rewards/margins"]) < 0.05  # the SFT model is the reference: it starts where it is
    assert done["fine_tuned_model"].startswith("ft:tiny-llama:") and done["fine_tuned_model"] != sft_model
    assert done["fine_tuned_model"] in [m.id for m in client.models.list()]
    # The job's evaluation runs after DPO as after supervised training.
    assert any(e["message"].startswith("Training done; evaluating") for e in events)
    report = done["usage"]["evaluation"]
    assert report["base"]["tasks"] == report["tuned"]["tasks"] == 2
    client.close()


def test_preference_files_and_dpo_jobs_answer_400_for_what_does_not_fit(oai, tiny_model):
    client, _ = oai
    good, bad = preference_records(2)
    bad = {**bad, "preferred_output": [{"role": "assistant", "content": None}]}
    before = [x.id for x in client.files.list()]
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("prefs.jsonl", jsonl([good, bad, {"input": {"messages": []},
                                                                    "preferred_output": []}])), purpose="fine-tune")
    message = exc.value.message
    assert 'line 2: "preferred_output"[0]["content"] is null' in message
    assert 'line 3: "input" must be an object with "messages"' in message
    assert [x.id for x in client.files.list()] == before  # nothing stored

    prefs = client.files.create(file=("prefs.jsonl", jsonl([good])), purpose="fine-tune")
    chat = client.files.create(file=("chat.jsonl", jsonl([{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])), purpose="fine-tune")
    cases = [
        ({"training_file": prefs.id}, "training_file", "preference records"),
        ({"training_file": chat.id, "method": dpo()}, "training_file", "DPO job"),
        ({"training_file": prefs.id, "method": dpo(beta=-1)}, "method.dpo.hyperparameters.beta", "beta"),
        ({"training_file": prefs.id, "method": {**dpo(), "supervised": {}}}, "method", "method.type is 'dpo'"),
        ({"training_file": prefs.id, "method": dpo(), "extra_body": {"training": {"packing": True}}},
         "training.packing", "padded pairs"),
        ({"training_file": prefs.id, "method": dpo(), "model": "ft:tiny-llama:nobody::ftjob-x"}, "model",
         "not one of your team's models"),
    ]
    for body, param, text in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.fine_tuning.jobs.create(**{"model": "tiny-llama", **body})
        assert exc.value.body["param"] == param, (body, exc.value.body)
        assert text in exc.value.message, (body, exc.value.message)
    assert list(client.fine_tuning.jobs.list()) == []
