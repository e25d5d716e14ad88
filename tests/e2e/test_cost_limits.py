"""Cost limits and evaluation cancel with the real worker."""

from __future__ import annotations

from app.core.db import session_scope
from app.domains.quotas import service as quotas
from tests.conftest import wait_until
from tests.factories import all_events, create_job, uploaded_file_id, wait_for_job


def _set_quota(team_id: str, **values) -> None:
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, **values)


def test_a_job_past_its_teams_token_limit_is_stopped_and_failed(api, make_team, worker):
    team_id, key = make_team()
    client = api(key)
    # No running slot yet: the job stays queued, so it can be paused before the limit is lowered.
    _set_quota(team_id, running_jobs=0)
    job = create_job(client, uploaded_file_id(client), hyperparameters={"n_epochs": 2})
    assert client.post(f"/fine_tuning/jobs/{job['id']}/pause").json()["status"] == "paused"
    # An operator lowers the team's limit below what the accepted job will train on.
    _set_quota(team_id, running_jobs=None, trained_tokens=200)
    assert client.post(f"/fine_tuning/jobs/{job['id']}/resume").json()["status"] in ("queued", "running")
    done = wait_for_job(client, job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "cost_limit_exceeded" and "past its limit of 200 tokens" in done["error"]["message"]
    assert done["adapter_id"] is None and done["fine_tuned_model"] is None
    messages = [e["message"] for e in all_events(client, job["id"])]
    assert any(m.startswith("Cost limit passed: ") for m in messages)
    total = next(e["data"]["total_steps"] for e in all_events(client, job["id"]) if e["type"] == "metrics")
    assert f"of {total}:" in done["error"]["message"] and total > 1  # stopped long before the schedule's end


def test_a_running_evaluation_is_cancelled_by_its_worker(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    # 10 samples of each of HumanEval's 164 problems: minutes of generation on the tiny model.
    ev = client.post("/evaluations", json={"model": "tiny-llama", "tasks": "humaneval", "n": 10, "k": [1],
                                           "temperature": 0.8, "max_tokens": 128}).json()
    wait_until(lambda: client.get(f"/evaluations/{ev['id']}").json()["status"] == "running", timeout=120,
               message="the worker to start the evaluation")
    r = client.post(f"/evaluations/{ev['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "running", r.text
    done = wait_until(lambda: (e := client.get(f"/evaluations/{ev['id']}").json())["status"] != "running" and e,
                      timeout=180, interval=0.3, message="the worker to act on the cancel")
    assert done["status"] == "cancelled" and done["result"] is None and done["finished_at"], done
    r = client.post(f"/evaluations/{ev['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.get(f"/evaluations/{ev['id']}/results").status_code == 409
