"""The official openai client works against Tuneforge unchanged."""

from __future__ import annotations

import io
import tarfile

import openai
import pytest

from tests.factories import demo_tasks, wait_for_job


@pytest.fixture
def oai(server, make_team):
    _, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield client, key
    client.close()


def test_openai_client_uploads_trains_lists_and_reads_events(oai, worker, api, tiny_model):
    client, key = oai
    f = client.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(demo_tasks()) and f.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, suffix="oai",
                                         hyperparameters={"n_epochs": 1}, seed=7, metadata={"run": "oai"})
    assert job.status in ("queued", "running") and job.training_file == f.id and job.seed == 7
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "oai"})] == [job.id]
    assert list(client.fine_tuning.jobs.list(metadata={"run": "other"})) == []

    done = wait_for_job(api(key), job.id)
    assert done["status"] == "succeeded", done
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.fine_tuned_model == f"ft:tiny-llama:{job.fine_tuned_model.split(':')[2]}:oai:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at >= job.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))  # iterating walks every page
    messages = [e.message for e in events]
    assert any("successfully completed" in m for m in messages)
    metrics = [e for e in events if e.type == "metrics" and e.data and "loss" in e.data]
    assert metrics and all(e.data["tokens_per_second"] > 0 for e in metrics)
    steps = [e.data["step"] for e in reversed(metrics)]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    # Tuneforge's own routes are reachable through the same client (as the README shows).
    evaluation = client.post("/evaluations", body={"model": job.fine_tuned_model, "tasks": "humaneval", "limit": 1,
                                                   "max_tokens": 8}, cast_to=object)
    assert evaluation["id"].startswith("eval-") and evaluation["model"] == job.fine_tuned_model


def test_openai_client_cancels_a_job_and_maps_errors(oai, tiny_model):
    client, _ = oai
    f = client.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                         extra_body={"training": {"epochs": 50}})
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # idempotent
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-does-not-exist")
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(model="no-such-base", training_file=f.id)
    assert exc.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, extra_body={"lora": {"r": -1}})
    assert exc.value.body["param"] == "lora.r"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("bad.jsonl", b"{oops\n"), purpose="fine-tune")
    assert "line 1" in exc.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="tf_bad", max_retries=0).files.list()


def test_cancelling_a_finished_job_is_a_conflict(trained, server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=trained["key"], max_retries=0)
    with pytest.raises(openai.ConflictError) as exc:
        client.fine_tuning.jobs.cancel(trained["job"]["id"])
    assert "succeeded" in exc.value.message


def test_adapter_downloads_and_loads_with_peft(trained, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client, job = trained["client"], trained["job"]
    adapter = client.get(f"/adapters/{job['adapter_id']}").json()
    assert adapter["name"] == job["fine_tuned_model"] and adapter["base_model"] == "tiny-llama"
    r = client.get(f"/adapters/{job['adapter_id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    import hashlib

    assert hashlib.sha256(r.content).hexdigest() == adapter["sha256"] == r.headers["x-adapter-sha256"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = set(tar.getnames())
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
        import tempfile

        target = tempfile.mkdtemp()
        tar.extractall(target, filter="data")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, target).eval()
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits)
