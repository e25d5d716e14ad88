"""A job's result_files: OpenAI's metrics CSV, written from its metrics events by the real worker,
read back through the official client."""

from __future__ import annotations

import csv
import io

import openai
import pytest

from app.core.db import session_scope
from app.domains.quotas import service as quotas
from tests.factories import all_events, demo_tasks, wait_for_job

COLUMNS = ["step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"]


@pytest.fixture
def team(server, make_team, api):
    team_id, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield team_id, client, api(key)
    client.close()


def _csv(client: openai.OpenAI, file_id: str) -> list[dict[str, str]]:
    f = client.files.retrieve(file_id)
    assert (f.purpose, f.filename) == ("fine-tune-results", "step_metrics.csv")
    text = client.files.content(file_id).text
    assert text.splitlines()[0] == ",".join(COLUMNS)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert f.bytes == len(text.encode())
    return rows


def _metrics(http, job_id: str) -> list[dict]:
    return [e["data"] for e in all_events(http, job_id) if e["type"] == "metrics"]


def test_a_succeeded_job_has_a_metrics_csv_with_one_row_per_logged_step(team, worker, server, make_team):
    _, client, http = team
    f = client.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id, seed=5,
        extra_body={"training": {"max_steps": 4, "gradient_accumulation_steps": 1, "validation_split": 0.1,
                                 "eval_every_steps": 2, "checkpoint_every_steps": 2}})
    assert job.result_files == []
    done = wait_for_job(http, job.id)
    assert done["status"] == "succeeded", done
    job = client.fine_tuning.jobs.retrieve(job.id)
    [result] = job.result_files

    metrics = _metrics(http, job.id)
    train = {m["step"]: m for m in metrics if "train_loss" in m}
    valid = {m["step"]: m["valid_loss"] for m in metrics if "valid_loss" in m}
    valid_accuracy = {m["step"]: m["valid_mean_token_accuracy"] for m in metrics if "valid_loss" in m}
    assert sorted(train) == [1, 2, 3, 4] and sorted(valid) == [2, 4]
    assert all(m["train_loss"] == m["loss"] for m in train.values())  # the old key stays beside OpenAI's
    assert all(0.0 <= m["train_mean_token_accuracy"] <= 1.0 for m in train.values())
    assert all(0.0 <= a <= 1.0 for a in valid_accuracy.values())

    rows = _csv(client, result)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        step = int(r["step"])
        assert float(r["train_loss"]) == train[step]["train_loss"]
        assert (float(r["valid_loss"]) if r["valid_loss"] else None) == valid.get(step)
        # Token accuracy at every logged step, and the validation's at the steps that evaluated.
        assert float(r["train_mean_token_accuracy"]) == train[step]["train_mean_token_accuracy"]
        assert 0.0 <= float(r["train_mean_token_accuracy"]) <= 1.0
        assert (float(r["valid_mean_token_accuracy"]) if r["valid_mean_token_accuracy"] else None) == \
            valid_accuracy.get(step)
    # Each checkpoint's metrics carry the accuracies logged at its step (evaluated before it was written).
    checkpoints = {c.step_number: c.metrics for c in client.fine_tuning.jobs.checkpoints.list(job.id)}
    assert sorted(checkpoints) == [2, 4]
    for step, m in checkpoints.items():
        assert m.train_mean_token_accuracy == train[step]["train_mean_token_accuracy"]
        assert m.valid_mean_token_accuracy == valid_accuracy[step]
    # The file is the team's: listed under its purpose, not trained on, and another team cannot read it.
    assert [x.id for x in client.files.list(purpose="fine-tune-results")] == [result]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=result)
    with openai.OpenAI(base_url=f"{server}/v1", api_key=make_team()[1], max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.files.content(result)


def test_a_job_failed_after_some_steps_keeps_the_steps_it_logged(team, worker):
    team_id, client, http = team
    with session_scope() as session:  # no running slot yet: the job waits, so it can be paused
        quotas.set_overrides(session, team_id=team_id, running_jobs=0)
    f = client.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                         extra_body={"training": {"gradient_accumulation_steps": 1}})
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    with session_scope() as session:  # an operator lowers the limit below what the job will train on
        quotas.set_overrides(session, team_id=team_id, running_jobs=None, trained_tokens=600)
    client.fine_tuning.jobs.resume(job.id)
    done = wait_for_job(http, job.id)
    assert done["status"] == "failed" and done["error"]["code"] == "cost_limit_exceeded", done

    steps = sorted({m["step"] for m in _metrics(http, job.id) if "train_loss" in m})
    assert steps, "the limit should let a few steps log before it stops the job"
    [result] = client.fine_tuning.jobs.retrieve(job.id).result_files
    assert [int(r["step"]) for r in _csv(client, result)] == steps
