"""Every metric family scraped from live processes, as Prometheus would, after this test's own work
moved it: the API, a training worker that trained a tiny-model job, an evaluation worker (the
compose file's `evaluator`) that ran programs, and an inference process that served a completion."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import openai

from tests.conftest import _spawn, _stop, free_port, start_api, start_inference, wait_until
from tests.factories import create_job, create_team, jsonl, upload, uploaded_file_id, wait_for_job
from tests.scrape import scrape


def _worker(env: dict[str, str], queue: str, log: Path):
    """A Celery worker on one queue only, as the compose file's `worker` and `evaluator` are."""
    proc = _spawn([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO",
                   "--concurrency", "1", "-Q", queue, "--hostname", f"metrics-{secrets.token_hex(3)}@%h",
                   "--without-mingle", "--without-gossip"], env, log)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{log.read_text()[-3000:]}")
        return " ready." in log.read_text() if log.exists() else False

    wait_until(ready, timeout=90, interval=0.2, message="the Celery worker to be ready")
    return proc


def test_every_process_kind_serves_its_metrics(services_env, private_database, tmp_path):
    from worker.evaluation.harness import load_humaneval

    queues = {"training": f"training-metrics-{secrets.token_hex(3)}",
              "evaluation": f"evaluation-metrics-{secrets.token_hex(3)}"}
    # A data dir of its own too: the session worker's reaper sweeps the work folders of its data dir
    # whose job is not in its database, and this test's jobs are in a database of their own.
    env = {**services_env, "TUNEFORGE_DATABASE_URL": private_database, "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
           "TUNEFORGE_TRAINING_QUEUE": queues["training"], "TUNEFORGE_EVALUATION_QUEUE": queues["evaluation"]}
    train_port, eval_port = free_port(), free_port()
    procs = []
    try:
        api_proc, api = start_api(env, tmp_path / "api.log")
        procs.append(api_proc)
        procs.append(_worker({**env, "TUNEFORGE_METRICS__WORKER_PORT": str(train_port)}, queues["training"],
                             tmp_path / "worker.log"))
        trainer = f"http://127.0.0.1:{train_port}/metrics"
        before = scrape(trainer)
        assert before.value("tuneforge_jobs", status="succeeded") == 0
        assert (before.value("tuneforge_training_steps_total") or 0) == 0  # nothing trained in this worker yet

        # Training: one tiny-model job, trained by the pool child; its samples reach the main process.
        _, key = create_team()
        client = openai.OpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0)
        import httpx

        http = httpx.Client(base_url=f"{api}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        job = wait_for_job(http, create_job(http, uploaded_file_id(http), hyperparameters={"n_epochs": 1})["id"])
        assert job["status"] == "succeeded", job
        steps = [e for e in client.fine_tuning.jobs.list_events(job["id"], limit=100).data
                 if e.type == "metrics" and "loss" in (e.data or {})]
        trained = scrape(trainer)
        assert trained.value("tuneforge_jobs", status="succeeded") == 1
        assert trained.value("tuneforge_training_steps_total") == len(steps) > 0
        assert trained.value("tuneforge_training_step_seconds_count") == len(steps)
        assert trained.value("tuneforge_training_step_seconds_sum") > 0
        assert trained.value("tuneforge_training_tokens_total") == job["trained_tokens"] > 0
        # Per process (pid label): the pool child that trained has a rate.
        assert all("pid" in labels for labels in trained.labels("tuneforge_training_tokens_per_second"))
        assert trained.value("tuneforge_training_tokens_per_second") > 0
        assert trained.value("tuneforge_training_rss_bytes") > 50 << 20  # torch and a model are resident
        import torch

        if torch.cuda.is_available():
            assert trained.value("tuneforge_training_gpu_memory_bytes", kind="allocated") > 0

        # Evaluation: queued while no evaluator runs (the queue's depth shows it), then run by one.
        problems = list(load_humaneval().values())[:6]
        rows = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems[:4]]
        rows += [{"task_id": p.task_id, "completion": "    return None\n"} for p in problems[4:]]
        completions = upload(http, jsonl(rows), purpose="evals").json()["id"]
        evaluation = http.post("/evaluations", json={"completions_file": completions, "tasks": "humaneval",
                                                     "limit": 6})
        assert evaluation.status_code == 200, evaluation.text
        assert scrape(trainer).value("tuneforge_queue_depth", queue=queues["evaluation"]) == 1
        # The evaluator also logs JSON (TUNEFORGE_LOG_FORMAT=json), with the evaluation's id on its task's lines.
        procs.append(_worker({**env, "TUNEFORGE_METRICS__WORKER_PORT": str(eval_port), "TUNEFORGE_LOG_FORMAT": "json"},
                             queues["evaluation"], tmp_path / "evaluator.log"))
        done = wait_until(lambda: (e := http.get(f"/evaluations/{evaluation.json()['id']}").json())["status"]
                          in ("succeeded", "failed") and e, timeout=300, interval=0.3, message="the evaluation")
        assert done["status"] == "succeeded", done
        evaluator = scrape(f"http://127.0.0.1:{eval_port}/metrics")
        assert evaluator.value("tuneforge_evaluation_programs_total", outcome="passed") == 4
        assert evaluator.value("tuneforge_evaluation_programs_total", outcome="failed") == 2
        assert evaluator.value("tuneforge_evaluation_sandbox_seconds_count") == 6
        assert evaluator.value("tuneforge_evaluation_sandbox_seconds_sum") > 0
        assert evaluator.value("tuneforge_queue_depth", queue=queues["evaluation"]) == 0
        logged = [json.loads(line) for line in (tmp_path / "evaluator.log").read_text().splitlines()
                  if line.startswith("{")]
        assert any(e.get("evaluation_id") == done["id"] for e in logged), logged[-20:]

        # Inference: one completion with the job's adapter, through the API and the openai client.
        inference_proc, inference = start_inference(env, tmp_path / "inference.log", "tiny-llama")
        procs.append(inference_proc)
        idle = scrape(f"{inference}/metrics")
        assert idle.value("tuneforge_inference_requests_total", outcome="completed") == 0
        answer = client.completions.create(model=job["fine_tuned_model"], prompt="def add(a, b):", max_tokens=8,
                                           temperature=0)
        served = scrape(f"{inference}/metrics")
        assert served.value("tuneforge_inference_requests_total", outcome="completed") == 1
        assert served.value("tuneforge_inference_tokens_total", kind="generated") == answer.usage.completion_tokens
        assert served.value("tuneforge_inference_tokens_total", kind="prompt") == answer.usage.prompt_tokens
        assert served.value("tuneforge_inference_adapter_cache_total", event="loads") == 1
        assert served.value("tuneforge_inference_adapters_loaded") == 1
        assert served.value("tuneforge_inference_adapter_cache_bytes") > 0
        assert served.value("tuneforge_inference_batches_total") == 1
        assert served.value("tuneforge_inference_forwards_total", kind="prefills") >= 1
        assert served.value("tuneforge_inference_busy_seconds_total") > 0
        for gauge in ("tokens_per_second", "queue_depth", "running_rows"):
            assert served.value(f"tuneforge_inference_{gauge}") is not None, gauge

        # The API counted the completion under its route.
        assert scrape(f"{api}/metrics").value("tuneforge_http_requests_total", method="POST",
                                              route="/v1/completions", status="200") == 1
        http.close()
    finally:
        for proc in reversed(procs):
            _stop(proc)
