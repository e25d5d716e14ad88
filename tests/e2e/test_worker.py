"""The real Celery worker: claims atomically, stops on cancel, fails with a reason."""

from __future__ import annotations


import redis
from sqlalchemy import select

from app.core.db import session_scope
from app.core.queue import TRAIN_TASK, client as celery_client
from app.domains.adapters.models import Adapter
from app.domains.jobs.models import FineTuningJob
from tests.conftest import REDIS_URL, wait_until
from tests.factories import all_events, create_job, uploaded_file_id, wait_for_job


def _queue_drained(queue: str, job_id: str) -> bool:
    """No message for the job is waiting in the queue or delivered-but-unacknowledged."""
    r = redis.Redis.from_url(REDIS_URL)
    waiting = [m for m in r.lrange(queue, 0, -1) if job_id.encode() in m]
    unacked = [v for v in r.hvals("unacked") if job_id.encode() in v]
    return not waiting and not unacked


def test_duplicate_delivery_trains_once(api, make_team, worker, services_env):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), hyperparameters={"n_epochs": 1})
    # The same message again, as a broker redelivery would send it; the worker runs two
    # children, so both copies can be claimed at the same time.
    celery_client().send_task(TRAIN_TASK, args=[job["id"]], queue=services_env["TUNEFORGE_TRAINING_QUEUE"])
    done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    wait_until(lambda: _queue_drained(services_env["TUNEFORGE_TRAINING_QUEUE"], job["id"]), timeout=120,
               message="both deliveries to be consumed")
    events = all_events(client, job["id"])
    assert sum(e["message"].startswith("Claimed by worker") for e in events) == 1
    assert [e["message"] for e in events].count("Training started") == 1
    assert sum("successfully completed" in e["message"] for e in events) == 1
    with session_scope() as session:
        row = session.get(FineTuningJob, job["id"])
        assert row.attempts == 1
        assert len(session.scalars(select(Adapter).where(Adapter.job_id == job["id"])).all()) == 1
    assert len(client.get("/adapters").json()["data"]) == 1


def test_cancel_stops_a_running_job_at_its_next_step(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client),
                     training={"epochs": 100, "gradient_accumulation_steps": 1})

    def training_steps():
        return [e for e in all_events(client, job["id"]) if e["type"] == "metrics" and "loss" in (e["data"] or {})]

    wait_until(lambda: len(training_steps()) >= 3, timeout=180, interval=0.2, message="training to log steps")
    r = client.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    def stopped():
        return [e for e in all_events(client, job["id"]) if e["message"].startswith("Training stopped at step")]

    stop = wait_until(stopped, timeout=60, message="the trainer to stop")[0]
    total = training_steps()[-1]["data"]["total_steps"]
    last_step = training_steps()[-1]["data"]["step"]
    assert last_step < total  # it did not run to the end
    final = client.get(f"/fine_tuning/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["fine_tuned_model"] is None and final["adapter_id"] is None
    assert client.get("/adapters").json()["data"] == []
    assert stop["created_at"] >= r.json()["finished_at"]


def test_a_failing_job_ends_failed_with_its_reason(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), lora={"target_modules": ["no_such_proj"]})
    done = wait_for_job(client, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "training_error" and "no_such_proj" in done["error"]["message"]
    assert done["finished_at"] is not None and done["fine_tuned_model"] is None
    events = all_events(client, job["id"])
    assert events[-1]["level"] == "error" and "failed" in events[-1]["message"]


def test_a_queued_job_whose_message_was_lost_is_redispatched(api, make_team, worker, services_env):
    """The API commits the job before enqueueing; if the enqueue is lost, a worker re-sends it."""
    from worker.reaper import redispatch_stale

    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), hyperparameters={"n_epochs": 1})
    r = redis.Redis.from_url(REDIS_URL)
    queue = services_env["TUNEFORGE_TRAINING_QUEUE"]
    removed = sum(r.lrem(queue, 0, m) for m in r.lrange(queue, 0, -1) if job["id"].encode() in m)
    if removed:  # we beat the worker to the message: the job is now queued with no message at all
        assert client.get(f"/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
        assert job["id"] in redispatch_stale(older_than_seconds=0).jobs
    assert wait_for_job(client, job["id"])["status"] == "succeeded"
