"""Time to a job's first training step, with the base model in the local storage directory and with it
staged from S3, in one run.

Each backend gets a fresh embedded instance (SQLite and the filesystem broker under a temporary data
dir) with the API and one training worker; the s3 one stores blobs in a bucket of moto's standalone S3
server (a subprocess on a free port) and registers the base model into it, as
`tuneforge models register --store` does. Two jobs run one after the other on each instance, on the
bundled demo tasks (`--steps` optimizer steps of one example each): the first finds the worker's
cache empty, so on s3 it stages the base model (and the training file) from the bucket; the second
finds them staged. The first job of a worker also pays for importing torch in its pool process.

Reported per job, from the job's row and its events in the database (microsecond times):
- claim to training start: the job's started_at to its "Training started" event, which is what
  staging, loading (and quantizing) the model and tokenizing the data take on the worker;
- claim to first step: the same to its step-1 metrics event, the first step included;
- created to first step: the same from the job's created_at, queueing included;
and the ratio of each s3 job to the local job of the same cache state. The API, the worker and the S3 server share the
machine's cores.

    .venv/bin/python bench/first_step.py [--model-dir DIR] [--backends local,s3] [--steps 1]

Without --model-dir it uses SmolLM2-135M-Instruct from the package-index wheel (converted once into
the cache, see worker/base_models/packaged.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.domains.jobs.states import FINAL  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.s3 import bucket_env, moto_server  # noqa: E402
from tuneforge import processes  # noqa: E402
from tuneforge.demo import use_embedded_instance  # noqa: E402

MODEL = "smollm2-135m-instruct"


def _timings(job_id: str) -> dict[str, float]:
    """created_at, started_at and the step-1 metrics event's time of a finished job, in seconds."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.domains.jobs.models import FineTuningJob, FineTuningJobEvent

    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.started_at is not None
        events = session.scalars(select(FineTuningJobEvent).where(FineTuningJobEvent.job_id == job_id)).all()
        first = min((e.created_at for e in events if e.type == "metrics" and (e.data or {}).get("step") == 1),
                    default=None)
        started = min((e.created_at for e in events if e.message == "Training started"), default=None)
        if first is None or started is None:
            raise RuntimeError(f"job {job_id} logged no 'Training started' or no step-1 metrics")
        return {"claim_to_training_start_s": (started - job.started_at).total_seconds(),
                "claim_to_first_step_s": (first - job.started_at).total_seconds(),
                "created_to_first_step_s": (first - job.created_at).total_seconds()}


def run_backend(backend: str, model_dir: Path, steps: int, s3_endpoint: str | None) -> list[dict[str, Any]]:
    """Two jobs on a fresh embedded instance with this backend; their timings."""
    from importlib import resources

    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.core.migrate import upgrade
    from app.core.storage import get_storage
    from app.domains.base_models import service as base_models
    from app.domains.teams import service as teams

    with tempfile.TemporaryDirectory(prefix=f"first-step-{backend}-") as tmp:
        data_dir = Path(tmp)
        env = use_embedded_instance(data_dir)
        if backend == "s3":
            assert s3_endpoint is not None
            extra = bucket_env(s3_endpoint)
            env.update(extra)
            os.environ.update(extra)
            get_settings.cache_clear()
        get_storage.cache_clear()
        upgrade()
        with session_scope() as session:
            base_models.register(session, name=MODEL, path=model_dir,
                                 storage=get_storage() if backend == "s3" else None)
            _, key = teams.create_team(session, name="bench")
        port = processes.free_port()
        procs = [processes.start(processes.serve_command("127.0.0.1", port), env=env, log=data_dir / "api.log"),
                 processes.start(processes.worker_command(1), env=env, log=data_dir / "worker.log")]
        results = []
        try:
            processes.wait_http(f"http://127.0.0.1:{port}/healthz", procs[0])
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120,
                                  headers={"Authorization": f"Bearer {key}"})
            tasks = resources.files("tuneforge.data").joinpath("demo_tasks.jsonl").read_bytes()
            f = client.post("/files", data={"purpose": "fine-tune"}, files={"file": ("tasks.jsonl", tasks)})
            f.raise_for_status()
            for cache in ("cold", "warm"):
                r = client.post("/fine_tuning/jobs", json={"model": MODEL, "training_file": f.json()["id"],
                                                           "hyperparameters": {"n_epochs": 1, "batch_size": 1},
                                                           "training": {"max_steps": steps}})
                r.raise_for_status()
                job_id = r.json()["id"]
                while (job := client.get(f"/fine_tuning/jobs/{job_id}").json())["status"] not in FINAL:
                    time.sleep(0.5)
                if job["status"] != "succeeded":
                    raise RuntimeError(f"{backend} job {job_id} ended {job['status']}: {job.get('error')}")
                results.append({"backend": backend, "cache": cache, "job": job_id, **_timings(job_id)})
            client.close()
        finally:
            processes.stop(procs)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="a model directory (default: SmolLM2's)")
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per job")
    args = parser.parse_args()
    if args.model_dir is None:
        from worker.base_models.packaged import default_cache_dir, ensure_smollm2

        args.model_dir = ensure_smollm2(default_cache_dir())
    size = sum(p.stat().st_size for p in args.model_dir.rglob("*") if p.is_file())
    backends = args.backends.split(",")
    with moto_server() if "s3" in backends else contextlib.nullcontext() as endpoint:
        results = [r for b in backends for r in run_backend(b, args.model_dir, args.steps, endpoint)]
    print(f"base model {args.model_dir} ({size / 1024**2:.0f} MiB), {args.steps} steps per job")
    print(f"{'backend':8} {'cache':6} {'claim to training start':>24} {'claim to first step':>20} "
          f"{'created to first step':>22}")
    for r in results:
        print(f"{r['backend']:8} {r['cache']:6} {r['claim_to_training_start_s']:22.1f} s "
              f"{r['claim_to_first_step_s']:18.1f} s {r['created_to_first_step_s']:20.1f} s")
    for r in results:
        local = next((o for o in results if o["backend"] == "local" and o["cache"] == r["cache"]), None)
        if r["backend"] == "s3" and local is not None:
            print(f"s3 {r['cache']} / local {r['cache']}: claim to training start "
                  f"{r['claim_to_training_start_s'] / local['claim_to_training_start_s']:.2f}x, to first step "
                  f"{r['claim_to_first_step_s'] / local['claim_to_first_step_s']:.2f}x")
    print(json.dumps({"benchmark": "first_step", "machine": describe(), "model_bytes": size, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
