"""Hosts that share nothing but the network: Postgres, Redis and an S3 server on one host, the API,
a training worker and an inference process each on a host of its own (network namespaces on a
bridge; see tests/netns.py), every process with its own data dir. The operator's commands run on
the API host; the test reaches the service only through the API host's address. A job trains and
evaluates on the worker host and its adapter is served by the inference host, through the API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import redis

from tests import netns
from tests.conftest import ROOT, s3_storage_env, wait_until
from tests.factories import create_job, files_under, uploaded_file_id, wait_for_job

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))

BASE = "tiny-llama-hosts"
PG_BIN = Path("/usr/lib/postgresql")
PORTS = {"postgres": 5432, "redis": 6379, "s3": 9000, "api": 8000, "inference": 8100}


def _postgres_bin() -> Path:
    found = sorted(PG_BIN.glob("*/bin/postgres"))
    if not found:
        pytest.skip("the PostgreSQL server binaries are not installed")
    return found[-1].parent


def _connects(hosts: netns.NetworkHosts, host: netns.Host, address: str, port: int) -> bool:
    """Whether a TCP connection from `host` to address:port is accepted."""
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=3)"
    return hosts.run(host, [sys.executable, "-c", code]).returncode == 0


def _ready(proc: subprocess.Popen, log: Path, probe) -> bool:
    if proc.poll() is not None:
        pytest.fail(f"{log.stem} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return bool(probe())
    except Exception:
        return False


def test_a_job_trains_evaluates_and_serves_across_hosts_that_share_only_the_network(tiny_model, tmp_path):
    pg_bin = _postgres_bin()
    pg_dir = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))  # the postgres user must reach it; tmp_path is root's
    shutil.chown(pg_dir, "postgres", "postgres")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    dirs = {name: tmp_path / name for name in ("api", "worker", "inference")}
    hosts = netns.NetworkHosts()
    try:
        with hosts:
            services = hosts.add("services")
            api_host, worker_host, inference_host = (hosts.add(n) for n in ("api", "worker", "inference"))
            svc = services.address

            # The services host: its own Postgres cluster, Redis and S3 server, listening on its veth address only.
            init = subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                                   str(pg_bin / "initdb"), "-D", str(pg_dir / "data"), "-A", "trust", "-U", "postgres",
                                   "--no-sync", "-E", "UTF8"], capture_output=True, text=True)
            assert init.returncode == 0, init.stderr
            with open(pg_dir / "data" / "pg_hba.conf", "a") as hba:  # the hosts' subnet, not only loopback
                hba.write(f"host all all {hosts.subnet}.0/24 trust\n")
            pg_log = tmp_path / "postgres.log"
            postgres = hosts.spawn(services, [str(pg_bin / "postgres"), "-D", str(pg_dir / "data"), "-h", svc,
                                              "-p", str(PORTS["postgres"]), "-k", str(pg_dir), "-c", "fsync=off"],
                                   env=base_env, log=pg_log, user="postgres")
            redis_log = tmp_path / "redis.log"
            redis_server = hosts.spawn(services, ["redis-server", "--bind", svc, "--port", str(PORTS["redis"]),
                                                  "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                                  "--dir", str(tmp_path)], env=base_env, log=redis_log)
            s3_log = tmp_path / "s3.log"
            s3 = hosts.spawn(services, [sys.executable, "-m", "moto.server", "-H", svc, "-p", str(PORTS["s3"])],
                             env=base_env, log=s3_log, cwd=ROOT)
            database_url = f"postgresql+psycopg://postgres@{svc}:{PORTS['postgres']}/postgres"
            wait_until(lambda: _ready(postgres, pg_log, lambda: psycopg.connect(
                database_url.replace("+psycopg", ""), connect_timeout=2).close() or True),
                timeout=60, interval=0.2, message="Postgres on the services host")
            wait_until(lambda: _ready(redis_server, redis_log, lambda: redis.Redis(host=svc, port=PORTS["redis"],
                                                                                  socket_timeout=2).ping()),
                       timeout=60, interval=0.2, message="Redis on the services host")
            s3_url = services.url(PORTS["s3"])
            wait_until(lambda: _ready(s3, s3_log, lambda: httpx.get(f"{s3_url}/moto-api/", timeout=2).status_code
                                      == 200), timeout=60, interval=0.2, message="the S3 server on the services host")

            env = {**base_env, **s3_storage_env(s3_url, "hosts"), "TUNEFORGE_DATABASE_URL": database_url,
                   "TUNEFORGE_BROKER_URL": f"redis://{svc}:{PORTS['redis']}/0", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            env_of = {name: {**env, "TUNEFORGE_DATA_DIR": str(folder)} for name, folder in dirs.items()}

            # The servers listen on the services host's veth address only, not even on its loopback; and no
            # host reaches the machine's own services: the only Postgres and Redis are the services host's.
            for port in (PORTS["postgres"], PORTS["redis"], PORTS["s3"]):
                assert not _connects(hosts, services, "127.0.0.1", port)
            for host in (api_host, worker_host, inference_host):
                assert not _connects(hosts, host, "127.0.0.1", PORTS["postgres"])
                assert not _connects(hosts, host, "127.0.0.1", PORTS["redis"])
                assert not _connects(hosts, host, hosts.gateway, PORTS["postgres"])
                assert _connects(hosts, host, svc, PORTS["postgres"]) and _connects(hosts, host, svc, PORTS["redis"])

            # The operator, on the API host: migrate, store the base model in S3, create a team.
            def operator(*args: str) -> str:
                done = hosts.run(api_host, [sys.executable, "-m", "tuneforge.cli", *args], env=env_of["api"],
                                 timeout=300)
                assert done.returncode == 0, f"tuneforge {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
                return done.stdout

            operator("migrate")
            operator("models", "register", BASE, str(tiny_model), "--store")
            key = operator("admin", "create-team", "hosts").strip().splitlines()[-1]

            api_log, worker_log, inference_log = (tmp_path / f"{n}.log" for n in ("api", "worker", "inference"))
            api = hosts.spawn(api_host, [sys.executable, "-m", "tuneforge.cli", "serve", "--host", api_host.address,
                                         "--port", str(PORTS["api"])], env=env_of["api"], log=api_log, cwd=ROOT)
            worker = hosts.spawn(worker_host, [sys.executable, "-m", "tuneforge.cli", "worker", "--concurrency", "1"],
                                 env=env_of["worker"], log=worker_log, cwd=ROOT)
            inference = hosts.spawn(inference_host, [sys.executable, "-m", "tuneforge.cli", "inference", "--model",
                                                     BASE, "--host", inference_host.address, "--port",
                                                     str(PORTS["inference"])],
                                    env=env_of["inference"], log=inference_log, cwd=ROOT)
            api_url = api_host.url(PORTS["api"])
            wait_until(lambda: _ready(api, api_log, lambda: httpx.get(f"{api_url}/readyz", timeout=2).status_code
                                      == 200), timeout=90, interval=0.2, message="the API host")
            wait_until(lambda: _ready(worker, worker_log, lambda: " ready." in worker_log.read_text()),
                       timeout=120, interval=0.2, message="the worker host")
            inference_url = inference_host.url(PORTS["inference"])
            serving = lambda: ("serving base model" in inference_log.read_text()  # noqa: E731
                               and httpx.get(f"{inference_url}/health", timeout=2).status_code == 200)
            wait_until(lambda: _ready(inference, inference_log, serving), timeout=180, interval=0.2,
                       message="the inference host")

            client = httpx.Client(base_url=f"{api_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
            tasks = uploaded_file_id(client)
            job = create_job(client, tasks, model=BASE, suffix="hosts", hyperparameters={"n_epochs": 1},
                             eval={"tasks": tasks, "limit": 2, "max_tokens": 16, "timeout_seconds": 5})
            done = wait_for_job(client, job["id"], timeout=600)
            assert done["status"] == "succeeded", (done, worker_log.read_text()[-3000:])
            report = done["usage"]["evaluation"]
            for side in ("base", "tuned"):  # both sides generated and executed on the worker host
                assert report[side]["tasks"] == 2 and sum(report[side]["outcomes"].values()) == 2
            adapter_model = done["fine_tuned_model"]

            # Served through the API by the inference host, which stages the adapter from S3 itself.
            chat = openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0).chat.completions.create(
                model=adapter_model, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=4)
            assert chat.model == adapter_model and chat.usage.completion_tokens > 0

            # Each host kept only its own cache: the blobs live in the bucket, nobody has a storage folder.
            for folder in dirs.values():
                assert not (folder / "storage").exists()
            assert any(p.startswith(f"models/{BASE}/") for p in files_under(dirs["worker"] / "cache"))
            served = files_under(dirs["inference"] / "cache")
            assert any(p.startswith(f"models/{BASE}/") for p in served)
            assert any("/adapters/" in p for p in served), served
            assert not (dirs["api"] / "cache").exists()
            client.close()
    finally:
        shutil.rmtree(pg_dir, ignore_errors=True)

    # Every process, namespace and link is gone.
    assert all(proc.poll() is not None for _, proc in hosts.procs)
    assert hosts.cleanup.leftover_pids == {name: [] for name in ("services", "api", "worker", "inference")}
    assert not set(hosts.cleanup.namespaces) & set(netns.namespaces())
    assert hosts.bridge not in netns.links() and not any(link.startswith(f"tfv{hosts.tag}") for link in netns.links())
