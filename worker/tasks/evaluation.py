"""evaluations.run and evaluations.run_job: generate completions, run them in the sandbox, record pass@k.

Both consume the evaluation queue (CPU workers), so model-written code never runs beside training.
Claims are conditional updates: a redelivered message scores nothing twice. A job's evaluation
scores the base and then the tuned model on the same tasks and settings, and moves the job from
evaluating to succeeded with the comparison.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import traceback
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.queue import EVALUATE_JOB_TASK, EVALUATE_TASK, enqueue_training
from app.core.storage import get_storage
from app.domains.adapters.models import Adapter
from app.domains.evaluations import service as evaluations
from app.domains.evaluations.models import Evaluation
from app.domains.evaluations.spec import SamplingSpec
from app.domains.files import service as files
from app.domains.jobs import service as jobs
from app.domains.models import service as models
from worker.celery_app import app

log = logging.getLogger("tuneforge.evaluation")


@dataclass(frozen=True)
class _Plan:
    """What one evaluation needs, read in one short transaction."""

    id: str
    team_id: str
    role: str | None
    settings: SamplingSpec
    tasks_path: Path | None  # None: built-in HumanEval
    completions_path: Path | None
    base_path: Path | None
    adapter_dir: Path | None


@lru_cache
def _sandbox():
    """One sandbox per worker process: its identities and self-check are set up once."""
    from worker.evaluation.sandbox import Sandbox

    return Sandbox(mode="auto", allow_weak_sandbox=get_settings().allow_weak_sandbox)


def _plan(session, row: Evaluation) -> _Plan:
    storage = get_storage()

    def file_path(file_id: str) -> Path:
        return storage.path(files.get(session, team_id=row.team_id, file_id=file_id).storage_key)

    adapter = session.get(Adapter, row.adapter_id) if row.adapter_id else None
    base = models.get_base(session, row.base_model) if row.base_model else None
    return _Plan(
        id=row.id, team_id=row.team_id, role=row.role, settings=SamplingSpec.model_validate(row.settings),
        tasks_path=None if row.tasks == "humaneval" else file_path(row.tasks),
        completions_path=file_path(row.completions_file) if row.completions_file else None,
        base_path=Path(base.path) if base else None,
        adapter_dir=storage.path(f"{adapter.storage_prefix}/files") if adapter else None,
    )


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _evaluate(plan: _Plan) -> tuple[dict, str]:
    """Score one evaluation; returns (result summary, storage key of the per-sample JSONL)."""
    from worker.evaluation import generate, harness, tasks_io

    start, cpu0 = time.monotonic(), _cpu_seconds()
    problems, prompts = tasks_io.builtin_humaneval() if plan.tasks_path is None else tasks_io.from_jsonl(plan.tasks_path)
    if plan.settings.limit:
        prompts = prompts[:plan.settings.limit]
        problems = {p.task_id: problems[p.task_id] for p in prompts}
    summary: dict = {}
    if plan.completions_path is not None:
        with open(plan.completions_path, encoding="utf-8") as f:
            samples = [s for s in harness.read_samples(f, problems=None) if s.task_id in problems]
    else:
        model, tokenizer = generate.load(plan.base_path, plan.adapter_dir)
        samples, summary["generation_seconds"] = generate.generate(model, tokenizer, prompts, plan.settings)
        summary["heldout_loss"] = generate.heldout_loss(model, tokenizer, generate.heldout_texts())
        del model
    exec_start = time.monotonic()
    score = harness.score(_sandbox(), samples, problems=problems, ks=plan.settings.k,
                          timeout_s=plan.settings.timeout_seconds)
    outcomes: dict[str, int] = {}
    for r in score.results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    summary.update(
        pass_at_k={str(k): v for k, v in sorted(score.pass_at_k.items())}, tasks=score.tasks,
        samples=score.samples, passed=sum(r.passed for r in score.results), outcomes=outcomes,
        sandbox_mode=score.mode, execution_seconds=time.monotonic() - exec_start,
        wall_seconds=time.monotonic() - start, cpu_seconds=_cpu_seconds() - cpu0,
        peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    key = f"teams/{plan.team_id}/evaluations/{plan.id}/results.jsonl"
    storage = get_storage()
    with storage.temp_file() as tmp:
        for r in score.results:
            tmp.write((json.dumps(asdict(r)) + "\n").encode())
    storage.commit(tmp.name, key)
    return summary, key


def _run_plans(plans: list[_Plan]) -> dict[str, dict]:
    """Run each plan, recording each outcome as it ends. Returns {evaluation id: summary};
    re-raises the first failure after marking that evaluation (and the ones not run) failed."""
    results: dict[str, dict] = {}
    for i, plan in enumerate(plans):
        try:
            summary, key = _evaluate(plan)
        except Exception as exc:
            log.error("evaluation %s failed:\n%s", plan.id, traceback.format_exc())
            message = f"{type(exc).__name__}: {exc}"[:2000]
            with session_scope() as session:
                for later in plans[i:]:
                    evaluations.fail(session, evaluation_id=later.id, code="evaluation_error", message=message)
            raise
        with session_scope() as session:
            evaluations.succeed(session, evaluation_id=plan.id, result=summary, results_key=key)
        results[plan.id] = summary
    return results


@app.task(name=EVALUATE_TASK)
def run(evaluation_id: str) -> str:
    """Score one standalone evaluation. Returns 'not-claimed', 'succeeded' or 'failed'."""
    with session_scope() as session:
        if not evaluations.claim(session, ids=[evaluation_id]):
            return "not-claimed"
        plan = _plan(session, session.get(Evaluation, evaluation_id))
    try:
        _run_plans([plan])
    except Exception:
        return "failed"
    return "succeeded"


@app.task(name=EVALUATE_JOB_TASK)
def run_job(job_id: str) -> str:
    """Score a job's base and tuned evaluations, then end the job with the comparison."""
    with session_scope() as session:
        rows = evaluations.for_job(session, job_id)
        won = set(evaluations.claim(session, ids=[r.id for r in rows if r.status == "queued"]))
        if not won:
            return "not-claimed"
        plans = [_plan(session, r) for r in sorted(rows, key=lambda r: r.role != "base") if r.id in won]
    try:
        results = _run_plans(plans)
    except Exception as exc:
        with session_scope() as session:
            jobs.fail(session, job_id=job_id, code="evaluation_error", message=f"{type(exc).__name__}: {exc}"[:2000])
            jobs.end_round(session, job_id=job_id)
        return "failed"
    by_role = {p.role: results[p.id] for p in plans}
    with session_scope() as session:
        next_round = jobs.after_evaluation(session, job_id=job_id, evaluation=compare(by_role))
    if next_round:
        enqueue_training(next_round)
    return "succeeded"


def compare(by_role: dict[str, dict]) -> dict:
    """The job's evaluation report: both sides, pass@k differences, and the forgetting check
    (held-out loss of the tuned model minus the base's; positive means it forgot some)."""
    base, tuned = by_role.get("base", {}), by_role.get("tuned", {})
    delta = {k: tuned["pass_at_k"][k] - base["pass_at_k"][k]
             for k in tuned.get("pass_at_k", {}) if k in base.get("pass_at_k", {})}
    report = {"base": base, "tuned": tuned, "pass_at_k_delta": delta}
    if "heldout_loss" in base and "heldout_loss" in tuned:
        report["forgetting"] = {"base_heldout_loss": base["heldout_loss"], "tuned_heldout_loss": tuned["heldout_loss"],
                                "increase": tuned["heldout_loss"] - base["heldout_loss"]}
    return report
