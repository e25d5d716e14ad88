"""Experiment trackers against a real worker: a job's wandb integration logs an offline W&B run, the
operator's MLflow file store gets the same metrics, the tensorboard integration attaches event files
to result_files, a tracker that fails leaves the job succeeded with an event, and a bad
integrations value answers 400 with its param."""

from __future__ import annotations

import io
import json
import secrets
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api.servers import private_api
from tests.conftest import _stop, start_worker
from tests.factories import all_events, demo_tasks, wait_for_job

TRAINING = {"max_steps": 4, "gradient_accumulation_steps": 1, "validation_split": 0.1, "eval_every_steps": 2,
            "checkpoint_every_steps": None}


def _stack(services_env: dict[str, str], **env: str) -> Iterator[str]:
    """An API and a worker (concurrency 1) on queues of their own with `env`; yields the API's /v1 URL."""
    run = secrets.token_hex(3)
    env = {"TUNEFORGE_TRAINING_QUEUE": f"training-trackers-{run}",
           "TUNEFORGE_EVALUATION_QUEUE": f"evaluation-trackers-{run}",
           "TUNEFORGE_WEBHOOKS__QUEUE": f"webhooks-trackers-{run}", **env}
    worker = start_worker({**services_env, **env}, Path(services_env["TUNEFORGE_DATA_DIR"]) / f"worker-{run}.log",
                          concurrency=1)
    try:
        with private_api(services_env, **env) as base:
            yield f"{base}/v1"
    finally:
        _stop(worker)


@pytest.fixture(scope="module")
def mlruns(services_env) -> Path:
    return Path(services_env["TUNEFORGE_DATA_DIR"]) / f"mlruns-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def tracked_api(services_env, tiny_model, mlruns) -> Iterator[str]:
    yield from _stack(services_env, TUNEFORGE_MLFLOW_TRACKING_URI=mlruns.as_uri())


def _client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0)


def _train(client: openai.OpenAI, http, **body) -> tuple[str, list[dict]]:
    f = client.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=3,
                                         extra_body={"training": TRAINING}, **body)
    done = wait_for_job(http, job.id)
    assert done["status"] == "succeeded", done
    return job.id, all_events(http, job.id)


def _losses(events: list[dict], key: str) -> dict[int, float]:
    return {e["data"]["step"]: e["data"][key] for e in events if e["type"] == "metrics" and key in e["data"]}


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte header ':W&B', 0xBEE1, version 0;
    32 KiB blocks of records, each with a 7-byte header crc32c, length, type: 1 full, 2 first, 3
    middle, 4 last). wandb 0.31 left its Python reader to wandb-core; the records are its protobufs."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def _wandb_history(run_dir: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    [log] = run_dir.glob("*.wandb")
    rows = []
    for raw in _wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_a_job_logs_its_losses_to_wandb_offline_mlflow_and_tensorboard(tracked_api, mlruns, make_team, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import httpx

    key = make_team()[1]
    with _client(tracked_api, key) as client, httpx.Client(
            base_url=tracked_api, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        integrations = [{"type": "wandb", "wandb": {"project": "tuneforge-tests", "name": "tiny", "tags": ["e2e"]}},
                        {"type": "tensorboard"}]
        job_id, events = _train(client, http, integrations=integrations)
        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.integrations[0].type == "wandb" and job.integrations[0].wandb.project == "tuneforge-tests"
        train, valid = _losses(events, "train_loss"), _losses(events, "valid_loss")
        assert sorted(train) == [1, 2, 3, 4] and sorted(valid) == [2, 4]

        # W&B: the run directory an event names holds the loss of every step, in W&B's own records.
        assert not [e for e in events if (e["data"] or {}).get("error")], events
        [named] = [e["data"] for e in events if (e["data"] or {}).get("integration") == "wandb"]
        assert named["mode"] == "offline" and named["run_id"] == job_id
        history = _wandb_history(Path(named["run_dir"]))
        logged = {row["_step"]: row for row in history}
        assert {s: logged[s]["train_loss"] for s in train} == pytest.approx(train)
        assert {s: logged[s]["valid_loss"] for s in valid} == pytest.approx(valid)
        assert all("learning_rate" in logged[s] and "tokens_per_second" in logged[s] for s in train)

        # MLflow: one run named for the job, its spec as params, the same metrics per step, the final status.
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only with this
        mlflow = MlflowClient(tracking_uri=mlruns.as_uri())
        [run] = mlflow.search_runs([mlflow.get_experiment_by_name("tuneforge").experiment_id],
                                   filter_string=f"tags.`tuneforge.job_id` = '{job_id}'")
        assert run.info.run_name == job_id and run.info.status == "FINISHED"
        assert run.data.tags["tuneforge.status"] == "succeeded"
        assert run.data.params["training.max_steps"] == "4" and run.data.params["lora.r"] == "8"
        for name, expected in (("train_loss", train), ("valid_loss", valid)):
            got = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, name)}
            assert got == pytest.approx(expected)
        assert len(mlflow.get_metric_history(run.info.run_id, "learning_rate")) == 4
        assert len(mlflow.get_metric_history(run.info.run_id, "tokens_per_second")) == 4

        # TensorBoard: a result file beside the metrics CSV, whose event files hold the same losses.
        archive_id = next(f for f in job.result_files if client.files.retrieve(f).filename == "tensorboard.tar.gz")
        assert len(job.result_files) == 2
        content = client.files.content(archive_id).content
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        tar.extractall(mlruns.parent / f"tb-{job_id}", filter="data")
    board = EventAccumulator(str(mlruns.parent / f"tb-{job_id}" / "tensorboard"))
    board.Reload()
    assert {e.step: e.value for e in board.Scalars("train_loss")} == pytest.approx(train)
    assert {e.step: e.value for e in board.Scalars("valid_loss")} == pytest.approx(valid)


def test_a_failing_tracker_leaves_the_job_succeeded_with_an_event(services_env, tiny_model, make_team, tmp_path):
    import httpx

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the MLflow store's folder would be")
    for base in _stack(services_env, TUNEFORGE_MLFLOW_TRACKING_URI=(blocker / "mlruns").as_uri()):
        key = make_team()[1]
        with _client(base, key) as client, httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            job_id, events = _train(client, http, integrations=[{"type": "tensorboard"}])
            job = client.fine_tuning.jobs.retrieve(job_id)
    [failed] = [e for e in events if (e["data"] or {}).get("integration") == "mlflow"]
    assert failed["data"]["error"]
    assert failed["message"].startswith("MLflow tracking could not start (")
    assert "training goes on without it" in failed["message"]
    assert sorted(_losses(events, "train_loss")) == [1, 2, 3, 4]
    assert job.status == "succeeded" and len(job.result_files) == 2  # the other tracker went on


@pytest.mark.parametrize(("integrations", "param"), [
    ([{"type": "wandb"}], "integrations.0"),
    ([{"type": "wandb", "wandb": {"project": "a/b"}}], "integrations.0.wandb.project"),
    ([{"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}], "integrations.0.wandb.tags"),
    ([{"type": "comet", "comet": {}}], "integrations.0.type"),
    ([{"type": "tensorboard"}, {"type": "tensorboard"}], "integrations"),
    ([{"type": "wandb", "wandb": {"project": "p", "team": "t"}}], "integrations.0.wandb.team"),
])
def test_a_bad_integrations_value_answers_400_with_its_param(server, make_team, integrations, param):
    with _client(f"{server}/v1", make_team()[1]) as client:
        f = client.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, integrations=integrations)
        assert caught.value.body["param"] == param, caught.value.body
        assert client.fine_tuning.jobs.list().data == []
