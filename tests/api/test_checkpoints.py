"""GET /v1/fine_tuning/jobs/{id}/checkpoints: OpenAI's checkpoint objects, the team's jobs only;
and the spec's checkpoint settings are validated at job creation."""

from __future__ import annotations

import openai
import pytest

from app.core.db import session_scope
from app.domains.checkpoints import service as checkpoints
from app.domains.teams.models import Team
from tests.factories import create_job, post_job, uploaded_file_id


def _job_with_checkpoints(client, team_id: str, steps: list[int]) -> str:
    job = create_job(client, uploaded_file_id(client), suffix="ckpt")
    client.post(f"/fine_tuning/jobs/{job['id']}/cancel")  # only its row is needed, not a run
    with session_scope() as session:
        for step in steps:
            checkpoints.record(session, job_id=job["id"], team_id=team_id, step=step,
                               metrics={"train_loss": 1.0 / step, **({"valid_loss": 0.5} if step == 30 else {})},
                               prefix=f"teams/{team_id}/jobs/{job['id']}/checkpoints/step-{step:08d}", size=100)
    return job["id"]


def test_checkpoints_are_listed_newest_first_as_openai_objects(api, make_team, tiny_model, server):
    team_id, key = make_team()
    client = api(key)
    job_id = _job_with_checkpoints(client, team_id, [10, 20, 30])
    with session_scope() as session:
        team_name = session.get(Team, team_id).name

    page = client.get(f"/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 2})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["object"] == "list" and body["has_more"] is True
    newest = body["data"][0]
    assert newest["object"] == "fine_tuning.job.checkpoint" and newest["id"].startswith("ftckpt-")
    assert newest["fine_tuning_job_id"] == job_id and newest["step_number"] == 30
    assert newest["metrics"]["step"] == 30 and newest["metrics"]["train_loss"] == pytest.approx(1 / 30)
    assert newest["metrics"]["valid_loss"] == 0.5
    assert newest["fine_tuned_model_checkpoint"] == f"ft:tiny-llama:{team_name}:ckpt:{job_id}:ckpt-step-30"
    assert isinstance(newest["created_at"], int)
    rest = client.get(f"/fine_tuning/jobs/{job_id}/checkpoints", params={"after": body["data"][-1]["id"]}).json()
    assert [c["step_number"] for c in body["data"] + rest["data"]] == [30, 20, 10] and rest["has_more"] is False

    with openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0) as sdk:
        listed = list(sdk.fine_tuning.jobs.checkpoints.list(job_id))
    assert [c.step_number for c in listed] == [30, 20, 10]
    assert listed[0].metrics.step == 30 and listed[0].fine_tuning_job_id == job_id


def test_another_teams_checkpoints_answer_404_like_a_missing_job(api, make_team, tiny_model):
    owner_id, owner_key = make_team()
    job_id = _job_with_checkpoints(api(owner_key), owner_id, [5])
    _, other_key = make_team()
    other = api(other_key)
    for path in (f"/fine_tuning/jobs/{job_id}/checkpoints", "/fine_tuning/jobs/ftjob-missing/checkpoints"):
        r = other.get(path)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "job_not_found"
    assert "ftckpt-" not in other.get(f"/fine_tuning/jobs/{job_id}/checkpoints").text


@pytest.mark.parametrize(
    ("training", "param"),
    [
        ({"checkpoint_every_steps": 0}, "training.checkpoint_every_steps"),
        ({"keep_checkpoints": 0}, "training.keep_checkpoints"),
        ({"keep_checkpoints": 21}, "training.keep_checkpoints"),
    ],
)
def test_invalid_checkpoint_settings_are_refused_naming_the_field(api, make_team, tiny_model, training, param):
    _, key = make_team()
    client = api(key)
    r = post_job(client, uploaded_file_id(client), training=training)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_checkpoint_settings_default_to_every_50_steps_and_three_kept(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), training={"checkpoint_every_steps": None})
    client.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    assert (job["spec"]["training"]["checkpoint_every_steps"], job["spec"]["training"]["keep_checkpoints"]) == (None, 3)
    default = create_job(client, uploaded_file_id(client))
    client.post(f"/fine_tuning/jobs/{default['id']}/cancel")
    assert default["spec"]["training"]["checkpoint_every_steps"] == 50
