"""Faults injected into real workers, brokers and databases; every job still ends exactly once.

Each test builds its own stack: a private redis-server on a free port (never the shared one),
its own API process and Celery workers with short leases (5 s, heartbeat 0.5 s, reaper every
1 s), and, for the database restart, a private Postgres cluster. Each fault's time to recover is
printed and written to recovery-times.json in the pytest tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import free_port, start_api, start_worker, wait_until
from tests.factories import FINAL, create_job, uploaded_file_id

LEASE = {"TUNEFORGE_LEASE_SECONDS": "5", "TUNEFORGE_WORKER_HEARTBEAT_SECONDS": "0.5",
         "TUNEFORGE_REAPER_INTERVAL_SECONDS": "1", "TUNEFORGE_REDISPATCH_AFTER_SECONDS": "5",
         "TUNEFORGE_MAX_ATTEMPTS": "3", "TUNEFORGE_STOP_WAIT_SECONDS": "30"}
# The 40 demo tasks, one example per optimizer step: 40 steps.
LONG_JOB = {"training": {"epochs": 1, "gradient_accumulation_steps": 1, "checkpoint_every_steps": 4,
                         "optimizer": "adamw_torch"}}
FINAL_EVENT_PREFIXES = ("Job cancelled", "The job has successfully completed", "The job failed")
SETUP = """
import sys
from app.core.config import get_settings
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.domains.base_models import service as base_models
from app.domains.teams import service as teams
upgrade(get_settings().effective_database_url)
with session_scope() as session:
    if base_models.get_base(session, "tiny-llama") is None:
        base_models.register(session, name="tiny-llama", path=sys.argv[1])
    team, key = teams.create_team(session, name=sys.argv[2])
print(key)
"""
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def recovery_times(tmp_path_factory):
    yield TIMES
    out = tmp_path_factory.mktemp("recovery") / "recovery-times.json"
    out.write_text(json.dumps(TIMES, indent=2))
    print(f"\ntime to recover (s), also in {out}: {json.dumps(TIMES)}")


def _kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class RedisServer:
    """A private, non-persistent redis-server; restart() loses every message, as a real crash would."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=open(self.folder / "redis.log", "a"), stderr=subprocess.STDOUT)
        wait_until(self._pong, timeout=20, message="the private redis-server")

    def _pong(self) -> bool:
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class PostgresServer:
    """A private Postgres cluster (initdb as the postgres user) on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        self.bin = bins[-1]
        self._as_postgres("initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres")
        self.start()
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                        "CREATE DATABASE tuneforge"], check=True, capture_output=True)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/tuneforge"

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args], check=True,
                       capture_output=True)

    def start(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "pg.log"), "-w",
                          "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def restart(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        self.start()

    def close(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Stack:
    """An API, a team, and the workers a test starts, all on one broker and database."""

    env: dict[str, str]
    folder: Path
    client: httpx.Client
    procs: list[subprocess.Popen] = field(default_factory=list)

    def worker(self, name: str, concurrency: int = 1, **env: str) -> subprocess.Popen:
        proc = start_worker({**self.env, **env}, self.folder / f"{name}.log", concurrency=concurrency)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()


@pytest.fixture
def make_stack(services_env, tiny_model, private_database, tmp_path):
    stacks: list[Stack] = []

    def make(broker_url: str, database_url: str | None = None, **env: str) -> Stack:
        tag = os.urandom(3).hex()
        # Its own database: the session's worker must not reap and re-send these jobs.
        full = {**services_env, **LEASE, **env, "TUNEFORGE_BROKER_URL": broker_url,
                "TUNEFORGE_DATABASE_URL": private_database,
                "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
                "TUNEFORGE_TRAINING_QUEUE": f"training-{tag}", "TUNEFORGE_EVALUATION_QUEUE": f"evaluation-{tag}"}
        if database_url:
            full["TUNEFORGE_DATABASE_URL"] = database_url
        setup = subprocess.run([sys.executable, "-c", SETUP, str(tiny_model), f"recovery-{tag}"],
                               env={**os.environ, **full}, check=True, capture_output=True, text=True,
                               cwd=Path(__file__).parents[2])
        key = setup.stdout.split()[-1]
        api, base = start_api(full, tmp_path / "api.log")
        client = httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        stack = Stack(env=full, folder=tmp_path, client=client, procs=[api])
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for proc in stack.procs:
            _kill_tree(proc)
        stack.client.close()


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


# -- reading the job through the API ----------------------------------------------------------------

def _job(stack: Stack, job_id: str) -> dict:
    return stack.client.get(f"/fine_tuning/jobs/{job_id}").json()


def _events(stack: Stack, job_id: str) -> list[dict]:
    """Oldest first."""
    events, after = [], None
    while True:
        page = stack.client.get(f"/fine_tuning/jobs/{job_id}/events",
                                params={"limit": 100, **({"after": after} if after else {})}).json()
        events += page["data"]
        if not page["has_more"]:
            return list(reversed(events))
        after = page["data"][-1]["id"]


def _steps(events: list[dict]) -> list[int]:
    return [e["data"]["step"] for e in events if e["type"] == "metrics" and "loss" in (e["data"] or {})]


def _checkpoint_steps(stack: Stack, job_id: str) -> list[int]:
    return [c["step_number"] for c in stack.client.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]]


def _holder_pid(stack: Stack, job_id: str) -> int:
    """The pid of the process training the job: the 'Claimed by worker host:pid' event's, the latest."""
    claims = [e for e in _events(stack, job_id) if e["message"].startswith("Claimed by worker")]
    return int(claims[-1]["data"]["worker_id"].rsplit(":", 1)[1])


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_final(stack: Stack, job_id: str, timeout: float = 400) -> dict:
    return wait_until(lambda: (j := _job(stack, job_id))["status"] in FINAL and j, timeout=timeout, interval=0.5,
                      message=f"job {job_id} to end")


def _assert_ended_once_and_continued(stack: Stack, job_id: str, resumed_from: int) -> dict:
    """Succeeded once, one adapter, and the resumed run continued the step count from `resumed_from`."""
    job = _wait_final(stack, job_id)
    assert job["status"] == "succeeded", job
    events = _events(stack, job_id)
    assert len([e for e in events if e["message"].startswith(FINAL_EVENT_PREFIXES)]) == 1
    resumes = [e for e in events if e["message"].startswith("Resuming from the checkpoint at step")]
    assert resumes and resumes[-1]["data"]["step"] == resumed_from
    after = _steps(events[events.index(resumes[-1]):])
    assert after and after[0] > resumed_from and after == sorted(after)
    assert job["usage"]["resumed_from_step"] == resumed_from
    assert job["usage"]["steps"] == job["usage"]["total_steps"] == after[-1]
    assert len(stack.client.get("/adapters").json()["data"]) == 1  # the stack's team has this job only
    return job


def _start_long_job(stack: Stack, **body) -> dict:
    return create_job(stack.client, uploaded_file_id(stack.client), **{**LONG_JOB, **body})


def _wait_for_checkpoint(stack: Stack, job_id: str) -> None:
    wait_until(lambda: _checkpoint_steps(stack, job_id) and _job(stack, job_id)["status"] == "running",
               timeout=300, interval=0.3, message="a first checkpoint of the running job")


# -- the faults -------------------------------------------------------------------------------------

def test_sigkill_of_the_training_process_resumes_from_its_last_checkpoint_on_another_worker(make_stack,
                                                                                          private_redis):
    stack = make_stack(private_redis.url)
    stack.worker("a")
    stack.worker("b")
    job = _start_long_job(stack)
    _wait_for_checkpoint(stack, job["id"])
    victim = _holder_pid(stack, job["id"])
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    last_checkpoint = max(_checkpoint_steps(stack, job["id"]))

    claims = wait_until(lambda: [e for e in _events(stack, job["id"]) if e["message"].startswith("Claimed by worker")]
                        [1:], timeout=120, interval=0.2, message="the job to be claimed again")
    TIMES["sigkill_training_process_to_reclaim"] = round(time.time() - killed_at, 1)
    # The reaper takes the job once the 5 s lease lapses (+ 1 s reaper interval), then a worker claims it.
    assert claims[0]["created_at"] - killed_at <= 5 + 1 + 10
    assert _holder_pid(stack, job["id"]) != victim
    done = _assert_ended_once_and_continued(stack, job["id"], last_checkpoint)
    TIMES["sigkill_training_process_to_final"] = round(time.time() - killed_at, 1)
    assert any(e["message"].startswith("Requeued: worker") for e in _events(stack, job["id"]))
    assert done["error"] is None


def test_killing_a_worker_process_tree_lets_another_workers_reaper_recover_the_job(make_stack, private_redis):
    stack = make_stack(private_redis.url)
    workers = [stack.worker("a"), stack.worker("b")]
    job = _start_long_job(stack)
    _wait_for_checkpoint(stack, job["id"])
    holder = next(w for w in workers if w.pid == _parent_of(_holder_pid(stack, job["id"])))
    _kill_tree(holder)
    killed_at = time.time()
    last_checkpoint = max(_checkpoint_steps(stack, job["id"]))

    requeued = wait_until(lambda: [e for e in _events(stack, job["id"]) if e["message"].startswith("Requeued")],
                          timeout=60, interval=0.2, message="the surviving worker's reaper to requeue the job")
    TIMES["kill_worker_tree_to_requeue"] = round(time.time() - killed_at, 1)
    assert requeued[0]["created_at"] - killed_at <= 5 + 1 + 2
    _assert_ended_once_and_continued(stack, job["id"], last_checkpoint)
    TIMES["kill_worker_tree_to_final"] = round(time.time() - killed_at, 1)


def test_killing_an_evaluation_worker_lets_another_worker_score_it_again(make_stack, private_redis):
    stack = make_stack(private_redis.url)
    victim = stack.worker("a")
    ev = stack.client.post("/evaluations", json={"model": "tiny-llama", "tasks": "humaneval", "limit": 40,
                                                 "max_tokens": 256, "timeout_seconds": 5}).json()

    def evaluation() -> dict:
        return stack.client.get(f"/evaluations/{ev['id']}").json()

    wait_until(lambda: evaluation()["status"] == "running", timeout=120, interval=0.1,
               message="worker a to start the evaluation")
    _kill_tree(victim)
    killed_at = time.time()
    assert evaluation()["status"] == "running"  # killed mid-way, not after it ended
    stack.worker("b")
    done = wait_until(lambda: (e := evaluation())["status"] in ("succeeded", "failed") and e, timeout=300,
                      interval=0.5, message="the evaluation to end on worker b")
    TIMES["kill_evaluation_worker_to_final"] = round(time.time() - killed_at, 1)
    assert done["status"] == "succeeded", done
    assert done["result"]["tasks"] == 40
    # Recovered by b's reaper once a's lease lapsed, not by a broker redelivery (6 h away).
    assert "reaped evaluations with expired leases" in stack.log("b")


def test_a_job_longer_than_the_visibility_timeout_is_not_run_twice(make_stack, private_redis):
    stack = make_stack(private_redis.url, TUNEFORGE_VISIBILITY_TIMEOUT_SECONDS="3")
    stack.worker("a", concurrency=2)  # a free slot to take the redelivered message
    job = create_job(stack.client, uploaded_file_id(stack.client),
                     training={"epochs": 2, "gradient_accumulation_steps": 1, "optimizer": "adamw_torch"})
    started = time.monotonic()
    wait_until(lambda: f"job {job['id']} not claimable" in stack.log("a"), timeout=300, interval=0.5,
               message="Redis to redeliver the running job's message after the 3 s visibility timeout")
    TIMES["visibility_timeout_duplicate_refused_after"] = round(time.monotonic() - started, 1)
    done = _wait_final(stack, job["id"])
    assert done["status"] == "succeeded" and time.monotonic() - started > 3
    events = _events(stack, job["id"])
    assert sum(e["message"].startswith("Claimed by worker") for e in events) == 1
    assert len([e for e in events if e["message"].startswith(FINAL_EVENT_PREFIXES)]) == 1
    assert len(stack.client.get("/adapters").json()["data"]) == 1


def test_pause_checkpoints_and_resume_continues_the_step_count(make_stack, private_redis):
    stack = make_stack(private_redis.url)
    stack.worker("a")
    job = _start_long_job(stack, training={**LONG_JOB["training"], "checkpoint_every_steps": None})
    wait_until(lambda: len(_steps(_events(stack, job["id"]))) >= 3, timeout=300, interval=0.3,
               message="training to log steps")
    r = stack.client.post(f"/fine_tuning/jobs/{job['id']}/resume")
    assert r.status_code == 409 and "only paused jobs can be resumed" in r.json()["error"]["message"]

    r = stack.client.post(f"/fine_tuning/jobs/{job['id']}/pause")
    assert r.status_code == 200 and r.json()["object"] == "fine_tuning.job", r.text
    paused = wait_until(lambda: (j := _job(stack, job["id"]))["status"] == "paused" and j, timeout=60,
                        message="the worker to pause the job")
    assert stack.client.post(f"/fine_tuning/jobs/{job['id']}/pause").json()["status"] == "paused"  # idempotent
    [at] = _checkpoint_steps(stack, job["id"])  # written by the pause: the spec asks for none otherwise
    assert paused["finished_at"] is None and at == max(_steps(_events(stack, job["id"])))

    r = stack.client.post(f"/fine_tuning/jobs/{job['id']}/resume")
    assert r.status_code == 200 and r.json()["status"] in ("queued", "running"), r.text
    _assert_ended_once_and_continued(stack, job["id"], at)
    for action in ("pause", "resume"):
        r = stack.client.post(f"/fine_tuning/jobs/{job['id']}/{action}")
        assert r.status_code == 409 and r.json()["error"]["param"] == "fine_tuning_job_id"
        assert "succeeded" in r.json()["error"]["message"]


def test_warm_shutdown_checkpoints_and_hands_the_job_back(make_stack, private_redis):
    stack = make_stack(private_redis.url)
    first = stack.worker("a")
    job = _start_long_job(stack, training={**LONG_JOB["training"], "checkpoint_every_steps": None})
    wait_until(lambda: len(_steps(_events(stack, job["id"]))) >= 3, timeout=300, interval=0.3,
               message="training to log steps")
    first.send_signal(signal.SIGTERM)  # Celery's warm shutdown
    asked = time.monotonic()
    first.wait(timeout=60)
    TIMES["warm_shutdown_to_worker_exit"] = round(time.monotonic() - asked, 1)
    assert time.monotonic() - asked < 60
    handed = _job(stack, job["id"])
    assert handed["status"] == "queued", handed
    assert any("handed back" in e["message"] for e in _events(stack, job["id"]))
    [at] = _checkpoint_steps(stack, job["id"])

    restarted = time.monotonic()
    stack.worker("b")
    _assert_ended_once_and_continued(stack, job["id"], at)
    TIMES["warm_shutdown_new_worker_to_final"] = round(time.monotonic() - restarted, 1)


def test_restarting_redis_and_postgres_during_a_job_still_ends_it_exactly_once(make_stack, private_redis):
    postgres = PostgresServer()
    try:
        stack = make_stack(private_redis.url, postgres.url, TUNEFORGE_LEASE_SECONDS="15")
        stack.worker("a")
        stack.worker("b")
        job = _start_long_job(stack)
        _wait_for_checkpoint(stack, job["id"])

        private_redis.restart()
        redis_back = time.time()
        postgres.restart()
        postgres_back = time.time()
        steps_then = len(_steps(_events(stack, job["id"])))
        wait_until(lambda: len(_steps(_events(stack, job["id"]))) > steps_then, timeout=60, interval=0.3,
                   message="training to go on after both restarts")
        TIMES["redis_and_postgres_restart_to_next_step"] = round(time.time() - postgres_back, 1)
        wait_until(lambda: any("Connection to broker lost" in stack.log(w) for w in ("a", "b")), timeout=60,
                   message="the workers to notice the Redis restart")
        done = _wait_final(stack, job["id"])
        TIMES["redis_and_postgres_restart_to_final"] = round(time.time() - redis_back, 1)
        assert done["status"] == "succeeded", done
        events = _events(stack, job["id"])
        assert len([e for e in events if e["message"].startswith(FINAL_EVENT_PREFIXES)]) == 1
        assert len(stack.client.get("/adapters").json()["data"]) == 1
        assert done["usage"]["steps"] == done["usage"]["total_steps"]
    finally:
        postgres.close()
