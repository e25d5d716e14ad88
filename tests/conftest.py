"""Shared fixtures: real Postgres, real Redis, a real API server and a real Celery worker.

The session gets its own Postgres database (built by `alembic upgrade head`), its own
Celery queue name on the shared Redis, and its own data dir; every test makes its own
teams, so tests never see each other's rows.

TUNEFORGE_TEST_STORAGE=s3 runs the session's API, workers and inference processes (and the test
process) on S3 storage: a bucket of the session's own S3 server, with the base models registered
into it. The default, local, is the storage directory under the data dir.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

PG_ADMIN = os.environ.get("TUNEFORGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = secrets.token_hex(4)
STORAGE = os.environ.get("TUNEFORGE_TEST_STORAGE", "local")
TEST_UPLOAD_LIMIT = 2 * 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


def _sqlalchemy_url(dbname: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{dbname}"


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return _sqlalchemy_url(name)


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, *, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def services_env(tmp_path_factory, request) -> dict[str, str]:
    """Environment for this session: its own database, queue and data dir (and bucket, with
    TUNEFORGE_TEST_STORAGE=s3). Also applied to the test process itself, so factories talk to the
    same database and storage."""
    if STORAGE not in ("local", "s3"):
        pytest.exit(f"TUNEFORGE_TEST_STORAGE must be local or s3, not {STORAGE!r}", returncode=4)
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:
        pytest.exit(f"Redis is not reachable at {REDIS_URL}: {exc}. Start it (see README).", returncode=3)
    dbname = f"tuneforge_test_{RUN_ID}"
    try:
        url = create_database(dbname)
    except psycopg.Error as exc:
        pytest.exit(f"Postgres is not reachable at {PG_ADMIN}: {exc}. Start it (see README).", returncode=3)
    data_dir = tmp_path_factory.mktemp("tuneforge-data")
    env = {
        "TUNEFORGE_DATABASE_URL": url,
        "TUNEFORGE_BROKER_URL": REDIS_URL,
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_TRAINING_QUEUE": f"training-test-{RUN_ID}",
        "TUNEFORGE_EVALUATION_QUEUE": f"evaluation-test-{RUN_ID}",
        "TUNEFORGE_WEBHOOKS__QUEUE": f"webhooks-test-{RUN_ID}",
        "TUNEFORGE_UPLOAD_MAX_BYTES": str(TEST_UPLOAD_LIMIT),
        # The shared server's per-key and per-address limits are out of the way of tests that send
        # bursts from one key or address; tests of those limits start an API of their own with them.
        "TUNEFORGE_RATE_LIMIT__PER_SECOND": "200",
        "TUNEFORGE_RATE_LIMIT__BURST": "2000",
        "TUNEFORGE_RATE_LIMIT__FAILED_AUTH_BURST": "100000",
        "TUNEFORGE_CONCURRENCY__PER_KEY": "1000",
        "TUNEFORGE_CONCURRENCY__PER_TEAM": "1000",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if STORAGE == "s3":
        env.update(s3_storage_env(request.getfixturevalue("s3_server"), f"suite-{RUN_ID}"))
    os.environ.update(env)
    _clear_caches()
    from app.core.migrate import upgrade

    upgrade(url)
    yield env
    _clear_caches()
    from app.core.db import get_engine

    get_engine.cache_clear()
    drop_database(dbname)
    r = redis.Redis.from_url(REDIS_URL)
    training = env["TUNEFORGE_TRAINING_QUEUE"]
    r.delete(training, f"{training}.cpu", f"{training}.cuda", env["TUNEFORGE_EVALUATION_QUEUE"],
             env["TUNEFORGE_WEBHOOKS__QUEUE"])


def _clear_caches() -> None:
    from app.core import queue
    from app.core.config import get_settings
    from app.core.db import get_engine, get_sessionmaker
    from app.core.storage import get_storage

    for cached in (get_settings, get_engine, get_sessionmaker, get_storage, queue.client):
        cached.cache_clear()


@pytest.fixture(scope="session")
def tiny_model(services_env) -> Path:
    """The tiny Llama model, built offline and registered as 'tiny-llama'."""
    from app.core.db import session_scope
    from worker.training.tiny import make_tiny_model

    path = make_tiny_model(Path(services_env["TUNEFORGE_DATA_DIR"]) / "models" / "tiny-llama")
    with session_scope() as session:
        register_base(session, "tiny-llama", path)
    return path


def register_base(session, name: str, path: Path):
    """Register a base model as this session's storage wants it: into the bucket with S3 storage
    (as `tuneforge models register --store` does), else by its local path."""
    from app.core.storage import get_storage
    from app.domains.base_models import service as base_models

    return base_models.register(session, name=name, path=path, storage=get_storage() if STORAGE == "s3" else None)


@pytest.fixture
def private_database(services_env, tiny_model) -> str:
    """A database of this test's own (with tiny-llama registered), for the test process too. For
    tests whose jobs no other worker may touch: every worker's reaper re-sends the stale jobs of
    the database it serves, so jobs in the session's database would reach the session's worker."""
    from app.core.db import session_scope
    from app.core.migrate import upgrade

    name = f"tuneforge_test_{RUN_ID}_{secrets.token_hex(3)}"
    url = create_database(name)
    upgrade(url)
    previous = os.environ["TUNEFORGE_DATABASE_URL"]
    os.environ["TUNEFORGE_DATABASE_URL"] = url
    _clear_caches()
    with session_scope() as session:
        register_base(session, "tiny-llama", tiny_model)
    yield url
    os.environ["TUNEFORGE_DATABASE_URL"] = previous
    _clear_caches()
    drop_database(name)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture(scope="session")
def server(services_env) -> str:
    """A real uvicorn process serving the API; yields its base URL."""
    proc, base = start_api(services_env, Path(services_env["TUNEFORGE_DATA_DIR"]) / "api.log")
    yield base
    _stop(proc)


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """A real uvicorn process with the given environment; returns it and its base URL once healthy."""
    port = free_port()
    proc = _spawn([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(port)], env, log)
    base = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            pytest.fail(f"API exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=60, message="the API to start")
    return proc, base


def start_inference(env: dict[str, str], log: Path, base_model: str, *args: str,
                    timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """A real `tuneforge inference` process for the base model (extra CLI args given); returns it and
    its URL once it has registered in the database and answers /health."""
    proc = _spawn([sys.executable, "-m", "tuneforge.cli", "inference", "--model", base_model, "--port", "0", *args],
                  env, log)

    def registered():
        if proc.poll() is not None:
            pytest.fail(f"inference process exited:\n{log.read_text()[-3000:]}")
        from app.core.db import session_scope
        from app.domains.serving import service as serving

        with session_scope() as session:
            live = serving.live(session, base_model=base_model)
            return live[0].url if live else None

    url = wait_until(registered, timeout=timeout, interval=0.2, message="the inference process to register")
    wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout=timeout,
               message="the inference process to answer")
    return proc, url


def start_worker(env: dict[str, str], log: Path, concurrency: int = 2) -> subprocess.Popen:
    """A real Celery worker on this session's queue; returns once it is ready."""
    proc = _spawn([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO",
                   "--concurrency", str(concurrency), "-Q",
                   f"{env['TUNEFORGE_TRAINING_QUEUE']},{env['TUNEFORGE_EVALUATION_QUEUE']},{env['TUNEFORGE_WEBHOOKS__QUEUE']}",
                   "--hostname", f"test-{secrets.token_hex(3)}@%h", "--without-mingle", "--without-gossip"],
                  env, log)

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"worker exited:\n{log.read_text()[-3000:]}")
        return log.exists() and " ready." in log.read_text()

    wait_until(ready, timeout=90, interval=0.2, message="the Celery worker to be ready")
    return proc


@pytest.fixture(scope="session")
def worker(services_env, tiny_model) -> subprocess.Popen:
    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / "worker.log"
    proc = start_worker(services_env, log)
    yield proc
    _stop(proc)


@pytest.fixture
def make_team(services_env):
    """Factory: a new team with a unique name; returns (team_id, api_key)."""
    from tests.factories import create_team

    return create_team


@pytest.fixture
def api(server):
    """Factory: an httpx client for /v1 authenticated with the given key (or none)."""
    clients = []

    def _make(key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=f"{server}/v1", headers=headers, timeout=60)
        clients.append(client)
        return client

    yield _make
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> str:
    """A real S3-protocol server of this session's own: moto's standalone server (`moto[server]`
    from PyPI; MinIO's server is neither on PyPI nor packaged by Debian here), on a free port,
    holding its objects in its own memory. Yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {}, log)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            pytest.fail(f"moto server exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/moto-api/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=60, message="the S3 server to start")
    yield url
    _stop(proc)


def s3_storage_env(endpoint: str, bucket: str, prefix: str = "tuneforge") -> dict[str, str]:
    """Settings that select S3 storage in a new bucket of the test S3 server (created here)."""
    import boto3

    env = {
        "TUNEFORGE_STORAGE_URL": f"s3://{bucket}/{prefix}",
        "TUNEFORGE_S3__ENDPOINT_URL": endpoint,
        "TUNEFORGE_S3__REGION": "us-east-1",
        "TUNEFORGE_S3__ACCESS_KEY_ID": "tuneforge-test",
        "TUNEFORGE_S3__SECRET_ACCESS_KEY": "tuneforge-test-secret",
        "TUNEFORGE_S3__ADDRESSING_STYLE": "path",
    }
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="tuneforge-test",
                 aws_secret_access_key="tuneforge-test-secret").create_bucket(Bucket=bucket)
    return env
