"""Evaluations: resolve what to score, record it, claim it for a worker, store the outcome.

States: queued -> running -> succeeded | failed. Claims and final writes are conditional
updates, so a redelivered message scores nothing twice. A claim comes with a lease that the
worker's heartbeat renews and that every final write is conditional on; reap() requeues (or,
after max_attempts claims, fails) running evaluations whose lease expired, and stale_queued()
finds queued ones whose message may have been lost."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import get_owned, take_stale_queued, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.adapters import service as adapters
from app.domains.evaluations.errors import EvaluationInvalid, EvaluationNotFound
from app.domains.evaluations.models import Evaluation
from app.domains.evaluations.schemas import EvaluationCreate, EvaluationList, EvaluationRead
from app.domains.evaluations.spec import SamplingSpec
from app.domains.files import service as files
from app.domains.files.errors import FileNotFound
from app.domains.files.validation import TASK_FORMATS
from app.domains.models import service as models

BUILTIN_TASKS = ("humaneval",)


def check_task_file(session: Session, *, team_id: str, file_id: str, param: str) -> None:
    """Raises EvaluationInvalid unless file_id is the team's file of mbpp or humaneval tasks."""
    _team_file(session, team_id, file_id, param, TASK_FORMATS)


def _team_file(session: Session, team_id: str, file_id: str, param: str, formats: tuple[str, ...]):
    try:
        row = files.get(session, team_id=team_id, file_id=file_id)
    except FileNotFound:
        raise EvaluationInvalid(f"{param} {file_id!r} does not exist.", param=param, code="file_not_found") from None
    if row.format not in formats:
        raise EvaluationInvalid(f"{param} {file_id!r} holds {row.format} records; it must hold "
                                f"{' or '.join(formats)} records.", param=param)
    return row


def _resolve_model(session: Session, team_id: str, name: str) -> tuple[str, str | None]:
    """(base model, adapter id) for a base or the team's fine-tuned model name."""
    if models.get_base(session, name) is not None:
        return name, None
    adapter = adapters.get_by_name(session, team_id=team_id, name=name)
    if adapter is None:
        raise EvaluationInvalid(f"Model {name!r} is neither a base model nor one of your fine-tuned models; "
                                "GET /v1/models lists them.", param="model", code="model_not_found")
    return adapter.base_model, adapter.id


def create(session: Session, *, team_id: str, body: EvaluationCreate) -> Evaluation:
    """Validate and record a standalone evaluation in 'queued'. The caller commits, then enqueues."""
    if body.tasks not in BUILTIN_TASKS:
        check_task_file(session, team_id=team_id, file_id=body.tasks, param="tasks")
    if body.completions_file:
        _team_file(session, team_id, body.completions_file, "completions_file", ("completions",))
    base, adapter_id = _resolve_model(session, team_id, body.model) if body.model else (None, None)
    settings = SamplingSpec.model_validate(body.model_dump(include=set(SamplingSpec.model_fields)))
    row = Evaluation(id=new_id("eval"), team_id=team_id, status="queued", model=body.model, base_model=base,
                     adapter_id=adapter_id, tasks=body.tasks, completions_file=body.completions_file,
                     settings=settings.model_dump(mode="json"))
    session.add(row)
    session.flush()
    return row


def create_for_job(session: Session, *, team_id: str, job_id: str, base_model: str, adapter_id: str,
                   fine_tuned_model: str, tasks: str, settings: SamplingSpec) -> list[Evaluation]:
    """The base and the tuned evaluation of a job, on the same tasks and settings."""
    rows = [Evaluation(id=new_id("eval"), team_id=team_id, job_id=job_id, role=role, status="queued", model=model,
                       base_model=base_model, adapter_id=adapter, tasks=tasks, settings=settings.model_dump(mode="json"))
            for role, model, adapter in (("base", base_model, None), ("tuned", fine_tuned_model, adapter_id))]
    session.add_all(rows)
    session.flush()
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


def claim(session: Session, *, ids: list[str], lease_seconds: float, max_attempts: int) -> tuple[str, list[str]]:
    """Move the queued ones of `ids` with attempts left to running, under one new lease; returns
    (the lease token, the ids this caller won)."""
    token, now = secrets.token_hex(16), utcnow()
    won = session.execute(
        update(Evaluation).where(Evaluation.id.in_(ids), Evaluation.status == "queued",
                                 Evaluation.attempts < max_attempts)
        .values(status="running", started_at=now, attempts=Evaluation.attempts + 1, lease_token=token,
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .returning(Evaluation.id).execution_options(synchronize_session=False)).scalars().all()
    return token, list(won)


def renew(session: Session, *, ids: list[str], lease_token: str, lease_seconds: float) -> bool:
    """Extend the lease of the running ones of `ids` still held with lease_token; False when none
    is (the reaper took them back, or they ended): the holder's results would not be recorded."""
    now = utcnow()
    renewed = session.execute(
        update(Evaluation).where(Evaluation.id.in_(ids), Evaluation.status == "running",
                                 Evaluation.lease_token == lease_token)
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .returning(Evaluation.id).execution_options(synchronize_session=False)).all()
    return bool(renewed)


def succeed(session: Session, *, evaluation_id: str, lease_token: str, result: dict[str, Any],
            results_key: str) -> bool:
    return _finish(session, evaluation_id, lease_token, status="succeeded", result=result, results_key=results_key)


def fail(session: Session, *, evaluation_id: str, lease_token: str, code: str, message: str) -> bool:
    return _finish(session, evaluation_id, lease_token, status="failed", error={"code": code, "message": message})


def _finish(session: Session, evaluation_id: str, lease_token: str, **values: Any) -> bool:
    done = session.execute(update(Evaluation).where(Evaluation.id == evaluation_id, Evaluation.status == "running",
                                                    Evaluation.lease_token == lease_token)
                           .values(finished_at=utcnow(), lease_token=None, lease_expires_at=None, **values)
                           .returning(Evaluation.id).execution_options(synchronize_session=False)).first()
    return done is not None


def reap(session: Session, *, max_attempts: int) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """Take back running evaluations whose lease expired (their worker died or lost the database):
    queued again while attempts remain, else failed with code lease_expired. Each is one
    conditional UPDATE, so a holder renewing at the same moment either wins or loses cleanly.
    Returns (requeued, failed), each as (evaluation id, job id or None), for the caller to enqueue
    the requeued ones and end the failed ones' jobs."""
    now = utcnow()
    expired = (Evaluation.status == "running", Evaluation.lease_expires_at < now)
    gone = {"lease_token": None, "lease_expires_at": None}
    failed = session.execute(
        update(Evaluation).where(*expired, Evaluation.attempts >= max_attempts)
        .values(status="failed", finished_at=now, **gone, error={
            "code": "lease_expired",
            "message": f"The evaluation was given up: its worker stopped renewing its lease on all "
                       f"{max_attempts} attempts (max_attempts {max_attempts}).",
        }).returning(Evaluation.id, Evaluation.job_id).execution_options(synchronize_session=False)).all()
    requeued = session.execute(
        update(Evaluation).where(*expired).values(status="queued", enqueued_at=now, **gone)
        .returning(Evaluation.id, Evaluation.job_id).execution_options(synchronize_session=False)).all()
    return [tuple(r) for r in requeued], [tuple(r) for r in failed]


def stale_queued(session: Session, *, older_than: dt.datetime) -> list[tuple[str, str | None]]:
    """Queued evaluations last enqueued (or created) before `older_than`, as (id, job id or None):
    their message may be lost (the broker was down at create time, or lost it). Marks them
    enqueued now, so each is re-sent at most once per interval."""
    rows = take_stale_queued(session, Evaluation, Evaluation.id, Evaluation.job_id, older_than=older_than)
    return [tuple(r) for r in rows]


def to_read(row: Evaluation) -> EvaluationRead:
    return EvaluationRead(id=row.id, created_at=unix(row.created_at), status=row.status, model=row.model,
                          base_model=row.base_model, adapter_id=row.adapter_id, tasks=row.tasks,
                          completions_file=row.completions_file, job_id=row.job_id, role=row.role,
                          settings=row.settings, result=row.result, error=row.error,
                          finished_at=unix(row.finished_at))
