"""Fine-tuning jobs: creation, the state machine, and what workers record.

Every status change is one conditional UPDATE plus its event, in the caller's
transaction: a change from a state the job is no longer in matches no row and
is refused, so two actors (a worker finishing, a user cancelling) can never
both win. States: validating_files -> queued -> running -> succeeded | failed
| cancelled; cancel is allowed from validating_files, queued, running, paused.

A running job has exactly one holder: the worker whose claim wrote its
lease_token. Only the holder renews the lease and writes what follows running
(a final state, paused, or queued on hand-back); the API asks a running job to
cancel or pause through stop_request, and the reaper takes over jobs whose
lease expired (their holder died): requeued up to max_attempts, then failed.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any, Literal

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from app.core.db import get_owned, take_stale_queued, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.adapters import service as adapters
from app.domains.files import service as files
from app.domains.evaluations import service as evaluations
from app.domains.files.errors import FileNotFound
from app.domains.files.validation import TRAINABLE_FORMATS
from app.domains.jobs import iteration
from app.domains.jobs.errors import IllegalTransition, JobInvalid, JobNotFound, ModelNotFound
from app.domains.jobs.models import FineTuningJob, FineTuningJobEvent
from app.domains.jobs.schemas import EventList, EventRead, Hyperparameters, JobCreate, JobList, JobRead
from app.domains.jobs.spec import TrainingSettings, TrainingSpec
from app.domains.models import service as models
from app.domains.quotas import service as quotas

ACTIVE = ("validating_files", "queued", "running", "evaluating", "paused")
FINAL = ("succeeded", "failed", "cancelled")
CANCELLABLE = ("validating_files", "queued", "running", "evaluating", "paused")
# States with no lease holder, which the API may end directly.
UNHELD = ("validating_files", "queued", "evaluating", "paused")
StopReason = Literal["cancel", "pause", "shutdown"]
DEFAULT_LR = TrainingSettings().learning_rate


# -- creation -----------------------------------------------------------------

def resolve_spec(body: JobCreate, seed: int) -> TrainingSpec:
    """Merge OpenAI's hyperparameters into Tuneforge's training settings.
    Raises JobInvalid when they contradict each other."""
    training = body.training or TrainingSettings()
    hp = body.hyperparameters
    if body.method and body.method.supervised and body.method.supervised.hyperparameters:
        if hp is not None:
            raise JobInvalid("Give hyperparameters either at the top level or in method.supervised, not both.",
                             param="method.supervised.hyperparameters")
        hp = body.method.supervised.hyperparameters
    hp = hp or Hyperparameters()
    changes: dict[str, Any] = {}
    if hp.n_epochs != "auto":
        changes["epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        if hp.batch_size % training.batch_size:
            raise JobInvalid(
                f"hyperparameters.batch_size ({hp.batch_size}) must be a multiple of training.batch_size "
                f"({training.batch_size}), the micro-batch it is accumulated from.", param="hyperparameters.batch_size")
        changes["gradient_accumulation_steps"] = hp.batch_size // training.batch_size
    if hp.learning_rate_multiplier != "auto":
        changes["learning_rate"] = training.learning_rate * hp.learning_rate_multiplier
    if changes:
        training = training.model_copy(update=changes)
        training = TrainingSettings.model_validate(training.model_dump())
    return TrainingSpec(lora=body.lora or TrainingSpec().lora,
                        quantization=body.quantization or TrainingSpec().quantization,
                        training=training, evaluation=body.eval, auto_iterate=body.auto_iterate, seed=seed)


def _check_file(session: Session, team_id: str, file_id: str, param: str) -> None:
    try:
        row = files.get(session, team_id=team_id, file_id=file_id)
    except FileNotFound:
        raise JobInvalid(f"{param} {file_id!r} does not exist. Upload it with POST /v1/files first.",
                         param=param, code="file_not_found") from None
    if row.purpose != "fine-tune":
        raise JobInvalid(f"{param} {file_id!r} has purpose {row.purpose!r}; it must be 'fine-tune'.", param=param)
    if row.format not in TRAINABLE_FORMATS:
        raise JobInvalid(f"{param} {file_id!r} holds {row.format} records, which cannot be trained on; "
                         f"use one of {', '.join(TRAINABLE_FORMATS)}.", param=param)


def create(session: Session, *, team_id: str, body: JobCreate) -> FineTuningJob:
    """Validate the request and create the job in 'queued'. Raises ModelNotFound, JobInvalid.
    The caller commits and then enqueues the job's id."""
    if models.get_base(session, body.model) is None:
        raise ModelNotFound(f"Base model {body.model!r} is not registered. GET /v1/models lists the base models.",
                            param="model")
    seed = body.seed if body.seed is not None else 42
    spec = resolve_spec(body, seed)
    quotas.check_can_queue(session, team_id=team_id)  # 429 when the team has its limit of jobs waiting
    job = FineTuningJob(
        id=new_id("ftjob"), team_id=team_id, model=body.model, training_file=body.training_file,
        validation_file=body.validation_file, status="validating_files", spec=spec.model_dump(mode="json"),
        suffix=body.suffix, seed=seed, metadata_=body.metadata, attempts=0,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Validating training file: {body.training_file}")
    _check_file(session, team_id, body.training_file, "training_file")
    if body.validation_file:
        _check_file(session, team_id, body.validation_file, "validation_file")
    if body.eval and body.eval.tasks != "humaneval":
        evaluations.check_task_file(session, team_id=team_id, file_id=body.eval.tasks, param="eval.tasks")
    transition(session, job.id, ("validating_files",), "queued", "Files validated; job queued")
    session.refresh(job)
    return job


# -- reading --------------------------------------------------------------------

def get(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """The team's job. Raises JobNotFound for a missing id and for another team's, alike."""
    job = get_owned(session, FineTuningJob, job_id, team_id)
    if job is None:
        raise JobNotFound(f"No such fine-tuning job: {job_id!r}.", param="fine_tuning_job_id")
    return job


def list_page(session: Session, *, team_id: str, after: str | None, limit: int,
              metadata: dict[str, str] | None = None) -> JobList:
    stmt = select(FineTuningJob).where(FineTuningJob.team_id == team_id)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(FineTuningJob.metadata_[key].as_string() == value)
    rows, has_more = paginate(session, stmt, FineTuningJob.id, after=after, limit=limit)
    return JobList(data=[to_read(session, r) for r in rows], has_more=has_more)


def events_page(session: Session, *, team_id: str, job_id: str, after: str | None, limit: int) -> EventList:
    get(session, team_id=team_id, job_id=job_id)
    stmt = select(FineTuningJobEvent).where(FineTuningJobEvent.job_id == job_id)
    rows, has_more = paginate(session, stmt, FineTuningJobEvent.id, after=after, limit=limit)
    return EventList(data=[EventRead(id=e.id, created_at=unix(e.created_at), level=e.level, message=e.message,
                                     data=e.data, type=e.type) for e in rows], has_more=has_more)


def active_jobs_using_file(session: Session, *, team_id: str, file_id: str) -> list[str]:
    stmt = select(FineTuningJob.id).where(
        FineTuningJob.team_id == team_id, FineTuningJob.status.in_(ACTIVE),
        (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id))
    return list(session.scalars(stmt))


def to_read(session: Session, job: FineTuningJob) -> JobRead:
    spec = TrainingSpec.model_validate(job.spec)
    t = spec.training
    hp = {"n_epochs": t.epochs, "batch_size": t.batch_size * t.gradient_accumulation_steps,
          "learning_rate_multiplier": round(t.learning_rate / DEFAULT_LR, 6)}
    adapter = adapters.for_job(session, job.id)
    return JobRead(
        id=job.id, created_at=unix(job.created_at), error=job.error, fine_tuned_model=job.fine_tuned_model,
        finished_at=unix(job.finished_at), hyperparameters=hp, model=job.model, organization_id=job.team_id,
        seed=job.seed, status=job.status, trained_tokens=job.trained_tokens, training_file=job.training_file,
        validation_file=job.validation_file, estimated_finish=unix(job.estimated_finish), metadata=job.metadata_,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}}, user_provided_suffix=job.suffix,
        spec=job.spec, usage=job.usage, adapter_id=adapter.id if adapter else None,
        parent_job_id=job.parent_job_id, round=job.round,
    )


# -- state machine ----------------------------------------------------------------

def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict | None = None) -> FineTuningJobEvent:
    event = FineTuningJobEvent(id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message,
                               data=data)
    session.add(event)
    session.flush()
    return event


def transition(session: Session, job_id: str, from_states: tuple[str, ...], to_state: str, message: str, *,
               level: str = "info", data: dict | None = None, where: tuple[ColumnElement[bool], ...] = (),
               **values: Any) -> bool:
    """Move the job to `to_state` only if it is in one of `from_states` (and `where` holds); write
    the event. Returns False (and writes nothing) when it did not match. Leaving running always
    drops the lease and any pending stop request."""
    now = utcnow()
    if to_state in FINAL:
        values.setdefault("finished_at", now)
        values.setdefault("estimated_finish", None)
    if to_state != "running":
        values.update(lease_token=None, lease_expires_at=None, stop_request=None)
    result = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.status.in_(from_states), *where)
        .values(status=to_state, **values)
        .returning(FineTuningJob.id)
        .execution_options(synchronize_session=False)
    ).first()
    if result is None:
        return False
    add_event(session, job_id, message, level=level, data=data)
    return True


def cancel(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """Cancel a job that has not ended. One with no holder (queued, paused, ...) ends cancelled
    here; a running one gets a cancel request that its worker acts on at its next step (the reaper,
    if that worker died). Idempotent for an already cancelled job. Raises JobNotFound, IllegalTransition."""
    job = get(session, team_id=team_id, job_id=job_id)
    if job.status != "cancelled":
        if not _cancel_one(session, job_id, "Job cancelled", "Cancellation requested"):
            session.refresh(job)
            raise IllegalTransition(
                f"Job {job_id} is {job.status}; only jobs that are {', '.join(CANCELLABLE)} can be cancelled.",
                param="fine_tuning_job_id")
        # auto_iterate: cancelling the loop cancels its running round; cancelling a round ends the loop.
        for child in session.scalars(select(FineTuningJob.id).where(FineTuningJob.parent_job_id == job_id)):
            _cancel_one(session, child, f"Cancelled with its parent job {job_id}",
                        f"Cancellation requested with its parent job {job_id}")
        if job.parent_job_id:
            end_round(session, job_id=job_id)
    session.refresh(job)
    return job


def _cancel_one(session: Session, job_id: str, message: str, request: str) -> bool:
    """Cancel directly, or ask the holder. Retried once: the job may have left running (reaped,
    handed back) between the two conditional UPDATEs."""
    for _ in range(2):
        if transition(session, job_id, UNHELD, "cancelled", message):
            return True
        if _request_stop(session, job_id, "cancel", f"{request}; the worker stops at its next step"):
            return True
    return False


def _request_stop(session: Session, job_id: str, request: str, message: str) -> bool:
    """Record a stop request on a running job for its holder. A cancel overrides a pending pause;
    a pause never overrides a pending cancel."""
    allowed = FineTuningJob.stop_request.is_(None) | (FineTuningJob.stop_request == request)
    if request == "cancel":
        allowed = allowed | (FineTuningJob.stop_request == "pause")
    matched = session.execute(
        update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status == "running", allowed)
        .values(stop_request=request).returning(FineTuningJob.id).execution_options(synchronize_session=False)
    ).first()
    if matched is not None:
        add_event(session, job_id, message)
    return matched is not None


def pause(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """Pause a job: a queued one at once (it keeps its checkpoints), a running one through its
    worker, which checkpoints at its next step and moves it to paused. Idempotent for a paused job.
    Raises JobNotFound, IllegalTransition."""
    job = get(session, team_id=team_id, job_id=job_id)
    if job.status != "paused" and not (
            transition(session, job_id, ("queued",), "paused", "Job paused before it started")
            or _request_stop(session, job_id, "pause",
                             "Pause requested; the worker checkpoints and pauses at its next step")):
        session.refresh(job)
        pending = " (a cancellation is pending)" if job.stop_request == "cancel" else ""
        raise IllegalTransition(f"Job {job_id} is {job.status}{pending}; only queued or running jobs can be paused.",
                                param="fine_tuning_job_id")
    session.refresh(job)
    return job


def resume(session: Session, *, team_id: str, job_id: str) -> tuple[FineTuningJob, bool]:
    """Resume a paused job: back to queued, to continue from its latest checkpoint; returns the job
    and True when the caller must enqueue it (after commit). A running job whose pause is still
    pending just has the request withdrawn. Raises JobNotFound, IllegalTransition."""
    job = get(session, team_id=team_id, job_id=job_id)
    now = utcnow()
    requeued = transition(session, job_id, ("paused",), "queued", "Job resumed; queued to continue from its "
                          "latest checkpoint", enqueued_at=now)
    if not requeued:
        withdrawn = session.execute(
            update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status == "running",
                                        FineTuningJob.stop_request == "pause")
            .values(stop_request=None).returning(FineTuningJob.id).execution_options(synchronize_session=False)
        ).first()
        if withdrawn is None:
            session.refresh(job)
            raise IllegalTransition(f"Job {job_id} is {job.status}; only paused jobs can be resumed.",
                                    param="fine_tuning_job_id")
        add_event(session, job_id, "Pause withdrawn; the job keeps running")
    session.refresh(job)
    return job, requeued


# -- what workers record ---------------------------------------------------------------

def claim(session: Session, *, job_id: str, worker_id: str, lease_seconds: float,
          max_attempts: int) -> FineTuningJob | None:
    """Atomically move a queued job to running for this worker with a new lease (the returned row's
    lease_token) and count the attempt. Returns None when the job is not queued (claimed and still
    leased, finished, cancelled, paused or unknown), has used its attempts, or its team may not start
    another job yet (it stays queued; re-dispatch retries it): a redelivered message does nothing."""
    team_id = session.scalar(select(FineTuningJob.team_id).where(FineTuningJob.id == job_id,
                                                                  FineTuningJob.status == "queued"))
    if team_id is None or not quotas.may_start(session, team_id):
        return None
    now = utcnow()
    live_lease = FineTuningJob.lease_expires_at.is_not(None) & (FineTuningJob.lease_expires_at > now)
    if not transition(session, job_id, ("queued",), "running", f"Claimed by worker {worker_id}",
                      data={"worker_id": worker_id},
                      where=(FineTuningJob.attempts < max_attempts, ~live_lease),
                      worker_id=worker_id, started_at=func.coalesce(FineTuningJob.started_at, now),
                      heartbeat_at=now, attempts=FineTuningJob.attempts + 1, lease_token=secrets.token_hex(16),
                      lease_expires_at=now + dt.timedelta(seconds=lease_seconds), stop_request=None):
        return None
    return session.get(FineTuningJob, job_id, populate_existing=True)


def _held(job_id: str, lease_token: str) -> tuple[ColumnElement[bool], ...]:
    return (FineTuningJob.id == job_id, FineTuningJob.status == "running", FineTuningJob.lease_token == lease_token)


def renew(session: Session, *, job_id: str, lease_token: str, lease_seconds: float) -> bool:
    """Extend the holder's lease from now. False when the lease is no longer this holder's (the
    reaper requeued the job, or it ended): the holder must stop and write nothing more."""
    now = utcnow()
    return session.execute(
        update(FineTuningJob).where(*_held(job_id, lease_token))
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds), heartbeat_at=now)
        .returning(FineTuningJob.id).execution_options(synchronize_session=False)
    ).first() is not None


def holds(session: Session, *, job_id: str, lease_token: str) -> bool:
    """Whether this holder still holds the lease; locks the row until the caller's transaction ends,
    so what the holder writes in that transaction cannot interleave with a reap."""
    return session.execute(select(FineTuningJob.id).where(*_held(job_id, lease_token))
                           .with_for_update()).first() is not None


def holder_view(session: Session, *, job_id: str, lease_token: str) -> Literal["lost", "cancel", "pause"] | None:
    """What the holder should do now: "lost" (stop, write nothing), "cancel" or "pause" (requested
    by the API), or None (keep training)."""
    row = session.execute(select(FineTuningJob.status, FineTuningJob.lease_token, FineTuningJob.stop_request)
                          .where(FineTuningJob.id == job_id)).first()
    if row is None or row.status != "running" or row.lease_token != lease_token:
        return "lost"
    return row.stop_request


def release(session: Session, *, job_id: str, lease_token: str, reason: StopReason,
            message: str | None = None) -> str | None:
    """The holder stopped training early: settle the job and drop the lease. A pending cancel
    request wins (cancelled), then a pause request (paused), then a shutdown (queued again, for the
    caller to enqueue after commit). A pause or a hand-back does not use up an attempt. Returns the
    new status, or None when the lease is no longer held (nothing is written)."""
    row = session.execute(select(FineTuningJob.stop_request).where(*_held(job_id, lease_token))
                          .with_for_update()).first()
    if row is None:
        return None
    # A pause withdrawn after the trainer already stopped for it: hand the job back instead.
    request = row.stop_request or ("shutdown" if reason != "cancel" else None)
    if request == "cancel":
        transition(session, job_id, ("running",), "cancelled", "Job cancelled", where=_held(job_id, lease_token))
        status = "cancelled"
    elif request in ("pause", "shutdown"):
        status = "paused" if request == "pause" else "queued"
        text = ("Job paused at its latest checkpoint" if status == "paused"
                else "Worker shutting down; job handed back and queued to continue from its latest checkpoint")
        transition(session, job_id, ("running",), status, text, where=_held(job_id, lease_token),
                   attempts=FineTuningJob.attempts - 1, enqueued_at=utcnow())
    else:  # "cancel" with no request: the lease was lost in between; leave it to the new owner
        return None
    if message:
        add_event(session, job_id, message)
    return status


def status_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))


def record_metrics(session: Session, *, job_id: str, lease_token: str, message: str, data: dict) -> bool:
    """A training-progress event; also refreshes trained_tokens and the ETA. Only by the lease
    holder: returns False (and writes nothing) otherwise."""
    values: dict[str, Any] = {}
    if data.get("trained_tokens") is not None:
        values["trained_tokens"] = int(data["trained_tokens"])
    if data.get("eta_seconds") is not None:
        values["estimated_finish"] = utcnow() + dt.timedelta(seconds=float(data["eta_seconds"]))
    if not holds(session, job_id=job_id, lease_token=lease_token):
        return False
    if values:
        session.execute(update(FineTuningJob).where(*_held(job_id, lease_token))
                        .values(**values).execution_options(synchronize_session=False))
    add_event(session, job_id, message, type="metrics", data=data)
    return True


def _held_without_cancel(job_id: str, lease_token: str) -> tuple[ColumnElement[bool], ...]:
    return (*_held(job_id, lease_token), FineTuningJob.stop_request.is_distinct_from("cancel"))


def succeed(session: Session, *, job_id: str, lease_token: str, fine_tuned_model: str, trained_tokens: int,
            usage: dict) -> bool:
    """Final state, only by the lease holder of a running job. Returns False when the lease is lost
    or a cancel was requested meanwhile (the caller then release()s)."""
    return transition(session, job_id, ("running",), "succeeded",
                      f"The job has successfully completed; fine-tuned model: {fine_tuned_model}",
                      data=usage, where=_held_without_cancel(job_id, lease_token), fine_tuned_model=fine_tuned_model,
                      trained_tokens=trained_tokens, usage=usage)


def start_evaluating(session: Session, *, job_id: str, lease_token: str, fine_tuned_model: str,
                     trained_tokens: int, usage: dict) -> bool:
    """running -> evaluating once the adapter is saved, by the lease holder. False as for succeed()."""
    return transition(session, job_id, ("running",), "evaluating",
                      f"Training done; evaluating the base and the tuned model ({fine_tuned_model})",
                      data=usage, where=_held_without_cancel(job_id, lease_token), fine_tuned_model=fine_tuned_model,
                      trained_tokens=trained_tokens, usage=usage)


def finish_evaluation(session: Session, *, job_id: str, evaluation: dict) -> bool:
    """evaluating -> succeeded, adding the evaluation report to the job's usage."""
    job = session.get(FineTuningJob, job_id)
    if job is None:
        return False
    usage = {**(job.usage or {}), "evaluation": evaluation}
    delta = ", ".join(f"pass@{k} {evaluation['base']['pass_at_k'][k]:.3f} -> {evaluation['tuned']['pass_at_k'][k]:.3f}"
                      for k in evaluation.get("pass_at_k_delta", {}))
    return transition(session, job_id, ("evaluating",), "succeeded",
                      f"The job has successfully completed; fine-tuned model: {job.fine_tuned_model}"
                      + (f" ({delta})" if delta else ""), data=evaluation, usage=usage)


def fail(session: Session, *, job_id: str, code: str, message: str, param: str | None = None,
         lease_token: str | None = None) -> bool:
    """Final state. A running job fails only by its lease holder (pass lease_token); without one,
    only a job with no holder (validating_files, queued, evaluating) fails. Returns False otherwise."""
    states, where = ("validating_files", "queued", "evaluating"), ()
    if lease_token is not None:
        states, where = ("running",), _held(job_id, lease_token)
    return transition(session, job_id, states, "failed", f"The job failed: {message}", level="error",
                      where=where, error={"code": code, "message": message, "param": param})


def reap(session: Session, *, max_attempts: int) -> list[str]:
    """Take over running jobs whose lease expired (their worker died or lost the database): a
    pending cancel ends them cancelled, a pending pause paused; otherwise they are queued again
    while attempts remain, else failed with code lease_expired. Each is one conditional UPDATE, so
    a holder renewing at the same moment either wins or loses cleanly. Returns the requeued ids,
    for the caller to enqueue after commit."""
    now = utcnow()
    expired = (FineTuningJob.status == "running", FineTuningJob.lease_expires_at < now)
    lost = "its worker stopped renewing its lease"
    outcomes = (
        ((FineTuningJob.stop_request == "cancel",), "cancelled", {}),
        ((FineTuningJob.stop_request == "pause",), "paused", {}),
        ((FineTuningJob.attempts >= max_attempts,), "failed", {"level": "error"}),
        ((), "queued", {"enqueued_at": now}),
    )
    requeued: list[str] = []
    for where, status, extra in outcomes:
        values: dict[str, Any] = {k: v for k, v in extra.items() if k != "level"}
        if status in FINAL:
            values.update(finished_at=now, estimated_finish=None)
        rows = session.execute(
            update(FineTuningJob).where(*expired, *where)
            .values(status=status, lease_token=None, lease_expires_at=None, stop_request=None, **values)
            .returning(FineTuningJob.id, FineTuningJob.attempts, FineTuningJob.worker_id)
            .execution_options(synchronize_session=False)
        ).all()
        for job_id, attempts, worker in rows:
            if status == "failed":
                text = f"{lost} on all {attempts} attempts (max_attempts {max_attempts})"
                session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(
                    error={"code": "lease_expired", "message": f"The job was given up: {text}.", "param": None})
                    .execution_options(synchronize_session=False))
                add_event(session, job_id, f"The job failed: {text}", level="error")
            elif status == "queued":
                add_event(session, job_id, f"Requeued: worker {worker} stopped renewing its lease "
                                           f"(attempt {attempts} of {max_attempts} used)")
                requeued.append(job_id)
            else:
                add_event(session, job_id, f"Job {status} ({lost}; it had been asked to "
                                           f"{'cancel' if status == 'cancelled' else 'pause'})")
            if status in FINAL:
                end_round(session, job_id=job_id)
    return requeued


def stale_queued(session: Session, *, older_than: dt.datetime) -> list[str]:
    """Queued jobs last enqueued (or created) before `older_than`: candidates for re-dispatch (a
    lost enqueue, a message lost with the broker, a claim the quota deferred). Marks them enqueued
    now, so one job is re-sent at most once per interval."""
    return [r.id for r in take_stale_queued(session, FineTuningJob, FineTuningJob.id, older_than=older_than)]


def model_name(*, base: str, team_name: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming: ft:<base>:<org>:<suffix>:<id>."""
    return f"ft:{base}:{team_name}:{suffix or ''}:{job_id}"


# -- auto_iterate ---------------------------------------------------------------------------

def _loop_parent(session: Session, job: FineTuningJob) -> FineTuningJob | None:
    if job.parent_job_id:
        return session.get(FineTuningJob, job.parent_job_id)
    return job if TrainingSpec.model_validate(job.spec).auto_iterate else None


def rounds_of(session: Session, parent: FineTuningJob) -> list[iteration.RoundResult]:
    """Round 1 (the parent) and its child rounds, in order, each with its target metric."""
    metric = TrainingSpec.model_validate(parent.spec).auto_iterate.target.metric
    jobs_ = [parent, *session.scalars(select(FineTuningJob).where(FineTuningJob.parent_job_id == parent.id)
                                      .order_by(FineTuningJob.round))]
    return [iteration.RoundResult(round=j.round or 1, job_id=j.id,
                                  score=iteration.metric_of((j.usage or {}).get("evaluation") or {}, metric)
                                  if j.status in ("succeeded", "evaluating") else None)
            for j in jobs_]


def after_evaluation(session: Session, *, job_id: str, evaluation: dict) -> str | None:
    """Record a job's evaluation. A plain job ends succeeded. In an auto_iterate loop, the round is
    recorded and the loop either ends (the parent succeeds, reporting every round) or the next round
    is created; returns that round's job id for the caller to enqueue after commit."""
    job = session.get(FineTuningJob, job_id)
    parent = _loop_parent(session, job)
    if parent is None or (parent.id != job.id and parent.status != "evaluating"):
        finish_evaluation(session, job_id=job_id, evaluation=evaluation)
        return None
    if job.id == parent.id:  # round 1 stays 'evaluating' while the loop runs
        job.usage = {**(job.usage or {}), "evaluation": evaluation}
        session.flush()
    else:
        finish_evaluation(session, job_id=job_id, evaluation=evaluation)
    return _next_round(session, parent)


def end_round(session: Session, *, job_id: str) -> None:
    """A round that failed or was cancelled ends its loop (the best round so far is reported)."""
    job = session.get(FineTuningJob, job_id)
    parent = _loop_parent(session, job) if job else None
    if parent is not None and parent.status == "evaluating":
        _next_round(session, parent)


def _next_round(session: Session, parent: FineTuningJob) -> str | None:
    # Status changes are conditional UPDATEs that bypass loaded objects: read the rounds afresh.
    session.expire_all()
    policy = TrainingSpec.model_validate(parent.spec).auto_iterate
    history = rounds_of(session, parent)
    last = history[-1]
    outcome = "failed or cancelled" if last.score is None else f"{policy.target.metric} {last.score:.3f}"
    add_event(session, parent.id, f"Round {last.round} ({last.job_id}): {outcome} (target {policy.target.min})",
              data={"round": last.round, "score": last.score})
    reason = iteration.decide(history, policy)
    if reason:
        _conclude(session, parent, history, reason)
        return None
    last_job = session.get(FineTuningJob, last.job_id)
    spec, change = iteration.adjust(TrainingSpec.model_validate(last_job.spec), last.round + 1)
    spec = spec.model_copy(update={"auto_iterate": None})
    child = FineTuningJob(
        id=new_id("ftjob"), team_id=parent.team_id, model=parent.model, training_file=parent.training_file,
        validation_file=parent.validation_file, status="queued", spec=spec.model_dump(mode="json"),
        suffix=parent.suffix, seed=parent.seed, metadata_=parent.metadata_, attempts=0,
        parent_job_id=parent.id, round=last.round + 1)
    session.add(child)
    session.flush()
    add_event(session, child.id, f"Round {child.round} of {parent.id}'s auto_iterate: {change}")
    add_event(session, parent.id, f"Round {child.round} started as {child.id}: {change}",
              data={"round": child.round, "job_id": child.id, "change": change})
    return child.id


def _conclude(session: Session, parent: FineTuningJob, history: list[iteration.RoundResult], reason: str) -> None:
    top = iteration.best(history)
    report = {"stop_reason": reason,
              "rounds": [{"round": r.round, "job_id": r.job_id, "score": r.score} for r in history],
              "best": None}
    if top is not None:
        best_job = session.get(FineTuningJob, top.job_id)
        adapter = adapters.for_job(session, top.job_id)
        report["best"] = {"round": top.round, "job_id": top.job_id, "score": top.score,
                          "fine_tuned_model": best_job.fine_tuned_model, "adapter_id": adapter.id if adapter else None}
    usage = {**(parent.usage or {}), "auto_iterate": report}
    best_text = f"best: round {top.round} ({top.score:.3f})" if top else "no round succeeded"
    transition(session, parent.id, ("evaluating",), "succeeded",
               f"auto_iterate finished after {len(history)} round(s): {reason}; {best_text}", data=report, usage=usage)
