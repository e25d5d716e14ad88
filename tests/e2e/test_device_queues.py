"""Jobs that ask for a kind of device go to that device's training queue, which only workers with
that device consume; the session's worker, which has no CUDA, consumes <training queue>.cpu."""

from __future__ import annotations

import redis

from app.core.db import session_scope
from app.domains.jobs.models import FineTuningJob
from tests.conftest import REDIS_URL, wait_until
from tests.factories import create_job, post_job, uploaded_file_id, wait_for_job


def _waiting(queue: str, job_id: str) -> int:
    return sum(job_id.encode() in m for m in redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1))


def test_a_cuda_job_waits_in_the_cuda_queue_and_a_cpu_job_trains_on_the_cpu_worker(api, make_team, worker,
                                                                                  services_env):
    _, key = make_team()
    client = api(key)
    file_id = uploaded_file_id(client)
    training = services_env["TUNEFORGE_TRAINING_QUEUE"]

    cuda_job = create_job(client, file_id, device="cuda", hyperparameters={"n_epochs": 1})
    assert cuda_job["spec"]["device"] == "cuda"
    wait_until(lambda: _waiting(f"{training}.cuda", cuda_job["id"]) == 1, timeout=30,
               message="the cuda job's message in the cuda queue")
    cpu_job = create_job(client, file_id, device="cpu", hyperparameters={"n_epochs": 1})
    done = wait_for_job(client, cpu_job["id"])
    assert done["status"] == "succeeded", done
    # The CPU job was sent after the CUDA one and has finished: the worker took only its own queues' work.
    assert _waiting(f"{training}.cuda", cuda_job["id"]) == 1
    assert client.get(f"/fine_tuning/jobs/{cuda_job['id']}").json()["status"] == "queued"
    assert _waiting(training, cuda_job["id"]) == 0
    assert client.post(f"/fine_tuning/jobs/{cuda_job['id']}/cancel").json()["status"] == "cancelled"


def test_a_cuda_job_claimed_by_a_worker_without_cuda_fails_with_the_reason(api, make_team, services_env):
    """An operator who points a CPU worker at the cuda queue gets failed jobs that say why, not CPU training."""
    from worker.tasks.training import train

    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), device="cuda")
    redis.Redis.from_url(REDIS_URL).delete(f"{services_env['TUNEFORGE_TRAINING_QUEUE']}.cuda")

    assert train(job["id"]) == "failed"

    done = client.get(f"/fine_tuning/jobs/{job['id']}").json()
    assert done["status"] == "failed"
    assert done["error"]["code"] == "device_unavailable"
    assert "no CUDA device" in done["error"]["message"]
    with session_scope() as session:
        assert session.get(FineTuningJob, job["id"]).attempts == 1


def test_an_unknown_device_is_refused(api, make_team):
    _, key = make_team()
    client = api(key)
    r = post_job(client, uploaded_file_id(client), device="tpu")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "device"
    assert client.get("/fine_tuning/jobs").json()["data"] == []
