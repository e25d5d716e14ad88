"""evaluations.run and evaluations.run_job: generate completions, run them in the sandbox, record pass@k.

Both consume the evaluation queue (CPU workers), so model-written code never runs beside training.
Claims are conditional updates: a redelivered message scores nothing twice. A job's evaluation
scores the base and then the tuned model on the same tasks and settings, and moves the job from
evaluating to succeeded with the comparison.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import resource
import time
import traceback
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.core.queue import (EVALUATE_JOB_TASK, EVALUATE_TASK, enqueue_evaluation, enqueue_job_evaluation,
                             enqueue_training)
from app.core.storage import get_storage
from app.domains.adapters.models import Adapter
from app.domains.evaluations import service as evaluations
from app.domains.evaluations.models import Evaluation
from app.domains.evaluations.spec import SamplingSpec
from app.domains.files import service as files
from app.domains.jobs import service as jobs
from app.domains.models import service as models
from worker.celery_app import app
from worker.tasks.training import Lease

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


def _run_plans(plans: list[_Plan], lease: Lease) -> dict[str, dict]:
    """Run each plan, recording each outcome as it ends while the lease is held. Returns
    {evaluation id: summary}; re-raises the first failure after marking that evaluation (and the
    ones not run) failed. Stops early, writing nothing more, once the lease is lost."""
    results: dict[str, dict] = {}
    for i, plan in enumerate(plans):
        if lease.lost.is_set():
            break
        try:
            summary, key = _evaluate(plan)
        except Exception as exc:
            log.error("evaluation %s failed:\n%s", plan.id, traceback.format_exc())
            message = f"{type(exc).__name__}: {exc}"[:2000]
            with session_scope() as session:
                for later in plans[i:]:
                    evaluations.fail(session, evaluation_id=later.id, lease_token=lease.token,
                                     code="evaluation_error", message=message)
            raise
        with session_scope() as session:
            if evaluations.succeed(session, evaluation_id=plan.id, lease_token=lease.token, result=summary,
                                   results_key=key):
                results[plan.id] = summary
    return results


def _fail_unplanned(ids: list[str], token: str, exc: Exception) -> None:
    """Claimed evaluations whose inputs could not be read: failed now, not left to the reaper."""
    log.error("evaluations %s cannot start:\n%s", ", ".join(ids), traceback.format_exc())
    with session_scope() as session:
        for evaluation_id in ids:
            evaluations.fail(session, evaluation_id=evaluation_id, lease_token=token, code="evaluation_error",
                             message=f"{type(exc).__name__}: {exc}"[:2000])


def _claim(ids: list[str]) -> tuple[str, list[str]]:
    settings = get_settings()
    with session_scope() as session:
        return evaluations.claim(session, ids=ids, lease_seconds=settings.lease_seconds,
                                 max_attempts=settings.max_attempts)


def _lease(ids: list[str], token: str) -> Lease:
    seconds = get_settings().lease_seconds
    return Lease(f"evaluation {', '.join(ids)}", token,
                 lambda session: evaluations.renew(session, ids=ids, lease_token=token, lease_seconds=seconds))


@app.task(name=EVALUATE_TASK)
def run(evaluation_id: str) -> str:
    """Score one standalone evaluation. Returns 'not-claimed', 'succeeded', 'failed' or 'lost'
    (the lease was lost: the reaper gave the evaluation to another worker)."""
    token, won = _claim([evaluation_id])
    if not won:
        return "not-claimed"
    try:
        with session_scope() as session:
            plan = _plan(session, session.get(Evaluation, evaluation_id))
    except Exception as exc:  # its model or files went away after it was queued
        _fail_unplanned(won, token, exc)
        return "failed"
    with _lease(won, token) as lease:
        try:
            results = _run_plans([plan], lease)
        except Exception:
            return "failed"
    return "succeeded" if evaluation_id in results else "lost"


@app.task(name=EVALUATE_JOB_TASK)
def run_job(job_id: str) -> str:
    """Score a job's base and tuned evaluations, then end the job with the comparison. Scores
    only the queued ones: after a worker died mid-way, the one it finished is not run again."""
    with session_scope() as session:
        queued = [r.id for r in evaluations.for_job(session, job_id) if r.status == "queued"]
    if not queued:
        return "not-claimed"
    token, won = _claim(queued)
    if not won:
        return "not-claimed"
    try:
        with session_scope() as session:
            rows = evaluations.for_job(session, job_id)
            plans = [_plan(session, r) for r in sorted(rows, key=lambda r: r.role != "base") if r.id in won]
    except Exception as exc:
        _fail_unplanned(won, token, exc)
        with session_scope() as session:
            jobs.fail(session, job_id=job_id, code="evaluation_error", message=f"{type(exc).__name__}: {exc}"[:2000])
            jobs.end_round(session, job_id=job_id)
        return "failed"
    with _lease(won, token) as lease:
        try:
            results = _run_plans(plans, lease)
        except Exception as exc:
            with session_scope() as session:
                jobs.fail(session, job_id=job_id, code="evaluation_error",
                          message=f"{type(exc).__name__}: {exc}"[:2000])
                jobs.end_round(session, job_id=job_id)
            return "failed"
    if set(results) != set(won):
        return "lost"  # the reaper gave the rest to another worker, which ends the job
    with session_scope() as session:
        rows = evaluations.for_job(session, job_id)
        by_role = {r.role: r.result for r in rows if r.status == "succeeded"}
        if set(by_role) != {"base", "tuned"}:
            return "lost"
        next_round = jobs.after_evaluation(session, job_id=job_id, evaluation=compare(by_role))
    if next_round:
        enqueue_training(next_round)
    return "succeeded"


def reap_expired_evaluations() -> list[str]:
    """One reaper pass over evaluations: requeue (and enqueue) running ones whose lease expired,
    or fail them after max_attempts claims, and a job whose evaluation failed so. Returns the
    requeued ids."""
    with session_scope() as session:
        requeued, failed = evaluations.reap(session, max_attempts=get_settings().max_attempts)
        for evaluation_id, job_id in failed:
            if job_id and jobs.fail(session, job_id=job_id, code="lease_expired",
                                    message=f"its evaluation {evaluation_id} was given up: its worker stopped "
                                            f"renewing its lease on every attempt"):
                jobs.end_round(session, job_id=job_id)
    _dispatch(requeued)
    if requeued or failed:
        log.warning("reaped evaluations with expired leases: requeued %s, failed %s",
                    [e for e, _ in requeued], [e for e, _ in failed])
    return [e for e, _ in requeued]


def redispatch_stale_evaluations(older_than_seconds: float | None = None) -> list[str]:
    """Re-enqueue queued evaluations not enqueued for longer than the threshold. Returns their ids."""
    seconds = older_than_seconds if older_than_seconds is not None else get_settings().redispatch_after_seconds
    with session_scope() as session:
        stale = evaluations.stale_queued(session, older_than=utcnow() - dt.timedelta(seconds=seconds))
    _dispatch(stale)
    if stale:
        log.info("re-dispatched %d queued evaluation(s): %s", len(stale), ", ".join(e for e, _ in stale))
    return [e for e, _ in stale]


def _dispatch(rows: list[tuple[str, str | None]]) -> None:
    """A standalone evaluation goes out on its own; a job's as its job's evaluation task, once."""
    for job_id in dict.fromkeys(job_id for _, job_id in rows if job_id):
        enqueue_job_evaluation(job_id)
    for evaluation_id, job_id in rows:
        if not job_id:
            enqueue_evaluation(evaluation_id)


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
