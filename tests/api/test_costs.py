"""Bounded cost per request: refused at create time with the field named, and evaluation cancel."""

from __future__ import annotations

import pytest

from app.core.db import session_scope
from app.domains.evaluations import service as evaluations
from app.domains.quotas import service as quotas
from tests.conftest import wait_until
from tests.factories import create_job, jsonl, post_job, uploaded_file_id


def _set_quota(team_id: str, **values) -> None:
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, **values)


def _refused(r, param: str, code: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    return err


@pytest.mark.parametrize(("body", "param", "code"), [
    # tiny-llama's config.json says 2048 positions
    ({"training": {"max_seq_length": 4096}}, "training.max_seq_length", "context_length_exceeded"),
    ({"lora": {"r": 128, "alpha": 256}}, "lora.r", "cost_limit_exceeded"),
    # 20 completions for each of HumanEval's 164 problems: 3,280 samples, past the 2,000 allowed
    ({"eval": {"tasks": "humaneval", "n": 20, "k": [1], "temperature": 0.8}}, "eval.n", "cost_limit_exceeded"),
])
def test_a_job_past_a_cost_limit_is_refused_naming_the_field(api, make_team, tiny_model, body, param, code):
    _, key = make_team()
    client = api(key)
    _refused(post_job(client, uploaded_file_id(client), **body), param, code)
    assert client.get("/fine_tuning/jobs").json()["data"] == []


def test_the_token_estimate_is_refused_past_the_teams_limit_and_the_override_shows(api, make_team, tiny_model):
    team_id, key = make_team()
    client = api(key)
    records = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(10)]
    content = jsonl(records)
    fid = uploaded_file_id(client, content)
    _set_quota(team_id, trained_tokens=len(content) * 3)
    assert client.get("/quotas").json()["trained_tokens_per_job"] == len(content) * 3
    # 4 epochs of at most the file's bytes: past the limit, with the estimate in the error.
    err = _refused(post_job(client, fid), "training_file", "cost_limit_exceeded")
    assert f"{len(content) * 4:,} tokens" in err["message"] and "4 epoch(s)" in err["message"]
    # 3 epochs fit; so does a max_steps bound below the epochs' (1 step x 1 example x 8 tokens).
    create_job(client, fid, hyperparameters={"n_epochs": 3})
    create_job(client, fid, training={"max_steps": 1, "gradient_accumulation_steps": 1, "max_seq_length": 8})
    assert len(client.get("/fine_tuning/jobs").json()["data"]) == 2
    _set_quota(team_id, trained_tokens=None)
    assert client.get("/quotas").json()["trained_tokens_per_job"] == 50_000_000
    for job in client.get("/fine_tuning/jobs").json()["data"]:
        client.post(f"/fine_tuning/jobs/{job['id']}/cancel")


def test_an_evaluation_past_the_samples_limit_is_refused(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    r = client.post("/evaluations", json={"model": "tiny-llama", "tasks": "humaneval", "n": 20, "k": [1],
                                           "temperature": 0.8})
    err = _refused(r, "n", "cost_limit_exceeded")
    assert "3,280 samples" in err["message"]
    assert client.get("/evaluations").json()["data"] == []
    # The same n on the first 10 tasks is 200 samples: accepted.
    r = client.post("/evaluations", json={"model": "tiny-llama", "tasks": "humaneval", "n": 20, "k": [1],
                                           "temperature": 0.8, "limit": 10})
    assert r.status_code == 200, r.text
    assert client.post(f"/evaluations/{r.json()['id']}/cancel").json()["status"] == "cancelled"


def test_a_queued_evaluation_is_cancelled_at_once_and_an_ended_one_answers_409(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    queued = client.post("/evaluations", json={"model": "tiny-llama", "limit": 1}).json()
    r = client.post(f"/evaluations/{queued['id']}/cancel")
    assert r.status_code == 200, r.text
    if r.json()["status"] == "running":  # a session-wide worker claimed it first: it stops at its next batch
        wait_until(lambda: client.get(f"/evaluations/{queued['id']}").json()["status"] == "cancelled",
                   timeout=120, message="the worker to record the cancel")
    else:
        assert r.json()["status"] == "cancelled" and r.json()["finished_at"], r.text
    assert client.post(f"/evaluations/{queued['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    with session_scope() as session:  # a worker can no longer claim it
        assert evaluations.claim(session, ids=[queued["id"]], lease_seconds=30, max_attempts=3)[1] == []

    ended = client.post("/evaluations", json={"model": "tiny-llama", "limit": 1}).json()
    with session_scope() as session:
        token, _ = evaluations.claim(session, ids=[ended["id"]], lease_seconds=30, max_attempts=3)
        assert evaluations.fail(session, evaluation_id=ended["id"], lease_token=token, code="x", message="y")
    r = client.post(f"/evaluations/{ended['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state", r.text
    assert client.get(f"/evaluations/{ended['id']}").json()["status"] == "failed"


def test_a_running_evaluation_is_asked_and_its_holder_records_the_cancel(api, make_team, tiny_model):
    team_id, key = make_team()
    client = api(key)
    row = client.post("/evaluations", json={"model": "tiny-llama", "limit": 1}).json()
    with session_scope() as session:
        token, won = evaluations.claim(session, ids=[row["id"]], lease_seconds=30, max_attempts=3)
    assert won == [row["id"]]
    r = client.post(f"/evaluations/{row['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "running", r.text
    with session_scope() as session:
        assert evaluations.cancel_requested(session, ids=[row["id"]], lease_token=token)
        assert not evaluations.cancel_requested(session, ids=[row["id"]], lease_token="another holder")
        assert evaluations.cancelled(session, ids=[row["id"]], lease_token=token) == [row["id"]]
    done = client.get(f"/evaluations/{row['id']}").json()
    assert done["status"] == "cancelled" and done["finished_at"]
    assert client.post(f"/evaluations/{row['id']}/cancel").status_code == 200


def test_another_teams_evaluation_cannot_be_cancelled(api, make_team, tiny_model):
    _, key_a = make_team()
    _, key_b = make_team()
    row = api(key_a).post("/evaluations", json={"model": "tiny-llama", "limit": 1}).json()
    r = api(key_b).post(f"/evaluations/{row['id']}/cancel")
    assert r.status_code == 404 and r.json()["error"]["code"] == "evaluation_not_found"
    assert api(key_a).get(f"/evaluations/{row['id']}").json()["status"] == "queued"
    api(key_a).post(f"/evaluations/{row['id']}/cancel")
