"""Checkpoints as models: the `fine_tuned_model_checkpoint` names a job's checkpoints list are models the
team can retrieve (GET /v1/models/{name}); another team's answer 404, and deleting the job's model
deletes them too. Serving them is tested end to end in tests/e2e/test_serving_checkpoints.py."""

from __future__ import annotations

import openai
import pytest

from app.core.db import session_scope
from app.core.storage import get_storage
from app.domains.checkpoints import service as checkpoints
from tests.conftest import wait_until
from tests.factories import job_with_checkpoint_models
from tests.worker.inference.conftest import make_adapter


@pytest.fixture
def job_model(api, make_team, tiny_model, tmp_path):
    """(team key, job id, the job's fine-tuned model name, its checkpoint names by step)."""
    team_id, key = make_team()
    client = api(key)
    dirs = {step: make_adapter(tiny_model, tmp_path / f"step-{step}", seed=step) for step in (4, 8)}
    job_id, model = job_with_checkpoint_models(client, team_id, dirs, adapter_dir=dirs[8])
    listed = client.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    names = {c["step_number"]: c["fine_tuned_model_checkpoint"] for c in listed}
    assert names == {4: f"{model}:ckpt-step-4", 8: f"{model}:ckpt-step-8"}
    return key, job_id, model, names


def test_a_listed_checkpoint_name_is_a_model_of_the_team(api, server, job_model):
    key, _, _, names = job_model
    r = api(key).get(f"/models/{names[4]}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == names[4] and body["object"] == "model" and body["kind"] == "checkpoint"
    assert body["base_model"] == "tiny-llama" and isinstance(body["created"], int)
    with openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0) as sdk:
        assert sdk.models.retrieve(names[8]).id == names[8]


def test_the_models_list_shows_the_teams_checkpoint_models(api, server, make_team, job_model):
    key, _, model, names = job_model
    with openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0) as sdk:
        raw = sdk.models.with_raw_response.list().http_response.json()
    listed = {m["id"]: m for m in raw["data"]}
    for name in names.values():
        assert openai.types.Model.model_validate(listed[name], strict=True).id == name
        assert listed[name]["kind"] == "checkpoint" and listed[name]["base_model"] == "tiny-llama"
        assert api(key).get(f"/models/{name}").json() == listed[name]  # the list says what retrieve says
    assert listed[model]["kind"] == "fine-tuned"
    _, other_key = make_team()
    assert not set(names.values()) & {m["id"] for m in api(other_key).get("/models").json()["data"]}
    assert api(key).delete(f"/models/{model}").status_code == 200
    assert not set(names.values()) & {m["id"] for m in api(key).get("/models").json()["data"]}


@pytest.mark.parametrize("change", [lambda n: n.replace("ckpt-step-4", "ckpt-step-5"),
                                    lambda n: n.replace(":ckpt:", ":other:"),
                                    lambda n: n.replace("ftjob-", "ftjob-x"),
                                    lambda n: n.replace("ckpt-step-4", "ckpt-step-04"),
                                    lambda n: n.replace("ckpt-step-4", "ckpt-step-")],
                         ids=["step_without_checkpoint", "wrong_suffix", "other_job", "leading_zero", "no_step"])
def test_a_name_that_does_not_name_a_checkpoint_answers_404(api, job_model, change):
    key, _, _, names = job_model
    r = api(key).get(f"/models/{change(names[4])}")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_another_teams_checkpoint_model_answers_404_like_a_missing_one(api, make_team, job_model):
    key, _, _, names = job_model
    _, other_key = make_team()
    other = api(other_key)
    theirs, missing = other.get(f"/models/{names[4]}"), other.get(f"/models/{names[4]}0")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
    assert theirs.json()["error"]["message"].replace(names[4], "X") == missing.json()["error"]["message"].replace(
        f"{names[4]}0", "X")
    # Nor can another team delete the job's model, or a checkpoint model on its own.
    assert other.delete(f"/models/{names[4].removesuffix(':ckpt-step-4')}").status_code == 404
    assert api(key).delete(f"/models/{names[4]}").status_code == 404
    assert api(key).get(f"/models/{names[4]}").status_code == 200


def test_deleting_the_jobs_model_deletes_its_checkpoint_models_and_their_files(api, job_model):
    key, job_id, model, names = job_model
    client = api(key)
    with session_scope() as session:
        latest = checkpoints.latest(session, job_id)
        assert latest is not None
        weights = f"{latest.storage_prefix}/adapter_model.safetensors"
    storage = get_storage()
    assert storage.exists(weights)

    r = client.delete(f"/models/{model}")
    assert r.status_code == 200 and r.json() == {"id": model, "object": "model", "deleted": True}
    for name in (model, *names.values()):
        assert client.get(f"/models/{name}").status_code == 404, name
    assert client.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] == []
    # The files go after the commit.
    wait_until(lambda: not storage.exists(weights), timeout=10, message="the checkpoint's files to be deleted")
