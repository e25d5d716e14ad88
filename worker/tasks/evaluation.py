"""evaluations.run and evaluations.run_job: claim, run the evaluation pipeline
(worker.evaluation.runner), record the outcome.

Both consume the evaluation queue (CPU workers), so model-written code never runs beside training.
Claims are conditional updates: a redelivered message scores nothing twice. A job's evaluation
scores each of its roles (base, tuned and, when asked, the tuned adapter on the 4-bit base) on the
same tasks and settings, warns on the job when its tasks overlap its training data, and moves the
job from evaluating to succeeded with the comparison (or on to its next auto_iterate round).
"""

from __future__ import annotations

import logging
import traceback

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.queue import EVALUATE_JOB_TASK, EVALUATE_TASK
from app.domains.evaluations import roles
from app.domains.evaluations import service as evaluations
from app.domains.evaluations.models import Evaluation
from app.domains.evaluations.states import EvaluationStatus
from app.domains.jobs import lease as job_lease
from app.domains.jobs import rounds
from app.domains.jobs.states import add_event
from worker.celery_app import app
from worker.evaluation import runner
from worker.evaluation.errors import EvaluationStopped
from worker.lease import Lease

log = logging.getLogger("tuneforge.evaluation")


def _claim(ids: list[str]) -> tuple[str, list[str]]:
    settings = get_settings()
    with session_scope() as session:
        return evaluations.claim(session, ids=ids, lease_seconds=settings.lease_seconds,
                                 max_attempts=settings.max_attempts)


def _lease(ids: list[str], token: str) -> Lease:
    seconds = get_settings().lease_seconds
    return Lease(f"evaluation {', '.join(ids)}", token,
                 lambda session: evaluations.renew(session, ids=ids, lease_token=token, lease_seconds=seconds))


def _cannot_start(ids: list[str], token: str, exc: Exception) -> None:
    """Claimed evaluations whose inputs could not be read: failed now, not left to the reaper."""
    log.error("evaluations %s cannot start:\n%s", ", ".join(ids), traceback.format_exc())
    runner.fail(ids, token, exc)


def _fail_job(job_id: str, exc: Exception, *, code: str = "evaluation_error") -> str:
    message = str(exc) if isinstance(exc, EvaluationStopped) else f"{type(exc).__name__}: {exc}"
    with session_scope() as session:
        job_lease.fail(session, job_id=job_id, code=code, message=message[:2000])
    return str(EvaluationStatus.FAILED)


def _warn_of_overlap(session, job_id: str, report: dict) -> None:
    """A warning event on the job when its evaluation tasks were in its training data."""
    found = report.get("overlap") or {}
    if found.get("contaminated"):
        shown = ", ".join(found["task_ids"]) + (", ..." if found["count"] > len(found["task_ids"]) else "")
        add_event(session, job_id, f"{found['count']} of the {found['tasks']} evaluation tasks are in the job's "
                                   f"training data ({shown}): their scores measure recall, not skill",
                  level="warn", data={"overlap": found})


@app.task(name=EVALUATE_TASK)
def run(evaluation_id: str) -> str:
    """Score one standalone evaluation. Returns 'not-claimed', 'succeeded', 'failed' (also past its
    wall-time limit), 'cancelled' or 'lost' (the lease was lost: the reaper gave the evaluation to
    another worker)."""
    token, won = _claim([evaluation_id])
    if not won:
        return "not-claimed"
    try:
        with session_scope() as session:
            plan = runner.plan(session, session.get(Evaluation, evaluation_id))
    except Exception as exc:  # its model or files went away after it was queued
        _cannot_start(won, token, exc)
        return str(EvaluationStatus.FAILED)
    with _lease(won, token) as lease:
        try:
            results = runner.run_plans([plan], lease)
        except EvaluationStopped as stopped:
            return {"cancel": str(EvaluationStatus.CANCELLED), "limit": str(EvaluationStatus.FAILED)}.get(
                stopped.reason, "lost")
        except Exception:
            return str(EvaluationStatus.FAILED)
    return str(EvaluationStatus.SUCCEEDED) if evaluation_id in results else "lost"


@app.task(name=EVALUATE_JOB_TASK)
def run_job(job_id: str) -> str:
    """Score a job's evaluations (one per role), then end the job with the comparison. Scores
    only the queued ones: after a worker died mid-way, the one it finished is not run again."""
    with session_scope() as session:
        queued = evaluations.queued_for_job(session, job_id)
    if not queued:
        return "not-claimed"
    token, won = _claim(queued)
    if not won:
        return "not-claimed"
    try:
        with session_scope() as session:
            rows = evaluations.for_job(session, job_id)
            plans = [runner.plan(session, r) for r in sorted(rows, key=lambda r: roles.run_order(r.role))
                     if r.id in won]
    except Exception as exc:
        _cannot_start(won, token, exc)
        return _fail_job(job_id, exc)
    with _lease(won, token) as lease:
        try:
            results = runner.run_plans(plans, lease)
        except EvaluationStopped as stopped:
            if stopped.reason == "lost":
                return "lost"
            return _fail_job(job_id, stopped,
                             code="cost_limit_exceeded" if stopped.reason == "limit" else "evaluation_cancelled")
        except Exception as exc:
            return _fail_job(job_id, exc)
    if set(results) != set(won):
        return "lost"  # the reaper gave the rest to another worker, which ends the job
    with session_scope() as session:
        report = evaluations.job_report(session, job_id)
        if report is None:
            return "lost"
        _warn_of_overlap(session, job_id, report)
        rounds.after_evaluation(session, job_id=job_id, evaluation=report)
    return str(EvaluationStatus.SUCCEEDED)
