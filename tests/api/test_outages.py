"""Outages: with the database or the broker down, the API answers 503 in the error shape (never
500), /readyz names the dependency that is down, and a job or evaluation created while the broker
is down is kept queued and re-dispatched once the broker is back. The outages are separate API
processes pointed at ports nobody listens on; the shared Postgres and Redis are never touched."""

from __future__ import annotations

import time

import httpx
import redis

from tests.api.servers import private_api
from tests.conftest import REDIS_URL, free_port, wait_until
from tests.factories import demo_tasks, upload
from tests.routes import v1_routes


def _call(client: httpx.Client, method: str, path: str) -> httpx.Response:
    path = path.replace("/v1", "", 1)
    for name in ("file_id", "job_id", "adapter_id", "evaluation_id", "model_id", "key_id", "checkpoint_id"):
        path = path.replace("{" + name + "}", "x-1")
    if "{" in path:  # a route added later with another parameter name
        path = path.split("{")[0] + "x-1" + path.split("}", 1)[1]
    if (method, path) == ("POST", "/files"):
        return upload(client, demo_tasks())
    return client.request(method, path, json={} if method in ("POST", "PUT", "PATCH") else None)


def test_with_the_database_down_every_route_answers_503(services_env, make_team):
    _, key = make_team()
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/tuneforge"
    with private_api(services_env, TUNEFORGE_DATABASE_URL=dead) as base, \
            httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        answers = {f"{m} {p}": _call(client, m, p) for m, p in v1_routes()}
        wrong = {route: (r.status_code, r.text[:200]) for route, r in answers.items() if r.status_code != 503}
        assert not wrong
        for r in answers.values():
            assert r.json()["error"] == {"message": "The database is unavailable; retry shortly.",
                                         "type": "server_error", "param": None, "code": "unavailable"}
            assert r.headers["Retry-After"] == "5"
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503
        assert ready.json()["database"].startswith("unavailable") and ready.json()["broker"] == "ok"
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_with_the_broker_down_reads_work_and_new_jobs_and_evaluations_are_kept_and_redispatched(
        services_env, make_team, tiny_model, worker):
    from app.core.db import session_scope
    from app.domains.jobs.models import FineTuningJob
    from app.domains.evaluations.models import Evaluation
    from worker.reaper import redispatch_stale

    def evaluation_status(evaluation_id: str) -> str:
        with session_scope() as session:
            return session.get(Evaluation, evaluation_id).status

    _, key = make_team()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with private_api(services_env, TUNEFORGE_BROKER_URL=dead) as base, \
            httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503
        assert ready.json()["broker"].startswith("unavailable") and ready.json()["database"] == "ok"
        for method, path in v1_routes():
            if method == "GET" and "{" not in path:
                r = _call(client, method, path)
                assert r.status_code == 200, (path, r.text)
        file_id = upload(client, demo_tasks()).json()["id"]
        started = time.monotonic()
        r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                   "hyperparameters": {"n_epochs": 1}})
        elapsed = time.monotonic() - started
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "queued"
        assert elapsed < 10, f"creating a job with the broker down took {elapsed:.1f} s"
        r = client.post("/evaluations", json={"model": "tiny-llama", "tasks": "humaneval", "limit": 1,
                                              "max_tokens": 8})
        assert r.status_code == 200, r.text
        evaluation = r.json()
        assert evaluation["status"] == "queued"
    with session_scope() as session:
        assert session.get(FineTuningJob, job["id"]).status == "queued"
        assert session.get(Evaluation, evaluation["id"]).status == "queued"

    # The broker is back (this process uses the live one): the job and the evaluation are sent again.
    stale = redispatch_stale(older_than_seconds=0)
    assert job["id"] in stale.jobs
    queue = services_env["TUNEFORGE_TRAINING_QUEUE"]
    r = redis.Redis.from_url(REDIS_URL)

    def sent_or_taken():
        if any(job["id"].encode() in m for m in r.lrange(queue, 0, -1)):
            return True
        with session_scope() as session:  # a worker of this session may have taken it already
            return session.get(FineTuningJob, job["id"]).status != "queued"

    wait_until(sent_or_taken, timeout=30, message="the job to be re-dispatched")

    # And the evaluation, which the session's worker then scores.
    assert evaluation["id"] in stale.evaluations
    done = wait_until(lambda: (e := evaluation_status(evaluation["id"])) in ("succeeded", "failed") and e,
                      timeout=120, message="the re-dispatched evaluation to be scored")
    assert done == "succeeded"
