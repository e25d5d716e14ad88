"""A DPO job end to end through the service: its wall time and trained tokens/s, on the tiny model and
on SmolLM2-135M-Instruct, in one run.

Each model gets a fresh embedded instance (SQLite and the filesystem broker under a temporary data
dir, as `tuneforge demo` starts one): the API and one training worker, a preference file of `--pairs`
code tasks (the task with its tests; preferred: its reference solution in a fence; not preferred:
another task's solution), and a DPO job of `--epochs` epochs at batch size 2 (the paper's effective
batch of 8 would be one step for 8 pairs). Wall time is the job's created_at to finished_at, from
the API; tokens/s and steps are the job's usage, the reward margin and accuracy its last metrics event.

    .venv/bin/python bench/dpo_job.py --smollm2-dir DIR [--pairs 8] [--epochs 1] [--models tiny,smollm2]

Prints one line per model and writes bench/results/dpo_job-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.domains.files.formats import RecordFormat, task_answer, task_messages  # noqa: E402
from app.domains.jobs.states import FINAL  # noqa: E402
from bench.machine import describe  # noqa: E402
from tuneforge import processes  # noqa: E402
from tuneforge.demo import use_embedded_instance  # noqa: E402


def preference_pairs(n: int) -> str:
    """n preference records from the bundled code tasks, as JSONL."""
    text = resources.files("tuneforge.data").joinpath("code_tasks_train.jsonl").read_text(encoding="utf-8")
    tasks = [json.loads(line) for line in text.splitlines() if line.strip()][:n + 1]
    rows = [{"input": {"messages": task_messages(task, RecordFormat.MBPP)},
             "preferred_output": [{"role": "assistant", "content": task_answer(task, RecordFormat.MBPP)}],
             "non_preferred_output": [{"role": "assistant", "content": task_answer(other, RecordFormat.MBPP)}]}
            for task, other in zip(tasks[:n], tasks[1:], strict=True)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def run_job(model: str, model_dir: Path | None, pairs: int, epochs: int) -> dict[str, Any]:
    """One DPO job on a fresh embedded instance; its measurements."""
    from app.core.db import session_scope
    from app.core.migrate import upgrade
    from app.domains.base_models import service as base_models
    from app.domains.teams import service as teams

    with tempfile.TemporaryDirectory(prefix="dpo-job-") as tmp:
        data_dir = Path(tmp)
        env = use_embedded_instance(data_dir)
        upgrade()
        if model_dir is None:
            from worker.training.tiny import make_tiny_model

            model_dir = make_tiny_model(data_dir / "models" / model, pretrain_steps=0)
        with session_scope() as session:
            base_models.register(session, name=model, path=model_dir)
            _, key = teams.create_team(session, name="bench")
        port = processes.free_port()
        procs = [processes.start(processes.serve_command("127.0.0.1", port), env=env, log=data_dir / "api.log"),
                 processes.start(processes.worker_command(1), env=env, log=data_dir / "worker.log")]
        try:
            processes.wait_http(f"http://127.0.0.1:{port}/healthz", procs[0])
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=60,
                                  headers={"Authorization": f"Bearer {key}"})
            f = client.post("/files", data={"purpose": "fine-tune"},
                            files={"file": ("pairs.jsonl", preference_pairs(pairs), "application/jsonl")})
            f.raise_for_status()
            r = client.post("/fine_tuning/jobs", json={
                "model": model, "training_file": f.json()["id"],
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": epochs, "batch_size": 2}}}})
            r.raise_for_status()
            job_id = r.json()["id"]
            while (job := client.get(f"/fine_tuning/jobs/{job_id}").json())["status"] not in FINAL:
                time.sleep(1)
            events = client.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        finally:
            processes.stop(procs)
    if job["status"] != "succeeded":
        raise RuntimeError(f"{model}: the DPO job ended {job['status']}: {job.get('error')}")
    last = next(e["data"] for e in events if e["type"] == "metrics" and "train_loss" in (e["data"] or {}))
    usage = job["usage"]
    return {"pairs": pairs, "epochs": epochs, "steps": usage.get("steps"), "trained_tokens": job["trained_tokens"],
            "job_wall_seconds": job["finished_at"] - job["created_at"],
            "training_wall_seconds": usage.get("wall_seconds"), "tokens_per_second": usage.get("tokens_per_second"),
            "quantization": usage.get("quantization"), "precision": usage.get("precision"),
            "final_loss": last["train_loss"], "reward_margin": last.get("rewards/margins"),
            "reward_accuracy": last.get("rewards/accuracies")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2-dir", type=Path, default=None, help="the converted SmolLM2 directory")
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "dpo_job", "machine": describe(), "models": {}}
    for model in args.models.split(","):
        if model == "smollm2":
            if args.smollm2_dir is None:
                from worker.base_models.packaged import default_cache_dir, ensure_smollm2

                args.smollm2_dir = ensure_smollm2(default_cache_dir())
            result = run_job("smollm2-135m-instruct", args.smollm2_dir, args.pairs, args.epochs)
        else:
            result = run_job("tiny-llama", None, args.pairs, args.epochs)
        report["models"][model] = result
        print(f"{model}: {result['steps']} steps, {result['trained_tokens']} tokens, "
              f"job {result['job_wall_seconds']} s "
              f"(training {result['training_wall_seconds']:.1f} s), {result['tokens_per_second']:.1f} tokens/s, "
              f"reward margin {result['reward_margin']}, accuracy {result['reward_accuracy']}", flush=True)
    out = ROOT / "bench" / "results" / f"dpo_job-{report['machine'].get('host', 'machine')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
