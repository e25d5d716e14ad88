"""Fine-tuning jobs: creation, the state machine, and what workers record.

Every status change is one conditional UPDATE plus its event, in the caller's
transaction: a change from a state the job is no longer in matches no row and
is refused, so two actors (a worker finishing, a user cancelling) can never
both win. States: validating_files -> queued -> running -> succeeded | failed
| cancelled; cancel is allowed from validating_files, queued, running, paused.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import get_owned, unix, utcnow
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

ACTIVE = ("validating_files", "queued", "running", "evaluating", "paused")
FINAL = ("succeeded", "failed", "cancelled")
CANCELLABLE = ("validating_files", "queued", "running", "evaluating", "paused")
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
               level: str = "info", data: dict | None = None, **values: Any) -> bool:
    """Move the job to `to_state` only if it is in one of `from_states`; write the event.
    Returns False (and writes nothing) when the job was not in those states."""
    now = utcnow()
    if to_state in FINAL:
        values.setdefault("finished_at", now)
        values.setdefault("estimated_finish", None)
    result = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.status.in_(from_states))
        .values(status=to_state, **values)
        .returning(FineTuningJob.id)
        .execution_options(synchronize_session=False)
    ).first()
    if result is None:
        return False
    add_event(session, job_id, message, level=level, data=data)
    return True


def cancel(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """Cancel a queued, running or paused job; a running trainer stops at its next step.
    Idempotent for an already cancelled job. Raises JobNotFound, IllegalTransition."""
    job = get(session, team_id=team_id, job_id=job_id)
    if job.status != "cancelled":
        if not transition(session, job_id, CANCELLABLE, "cancelled", "Job cancelled"):
            session.refresh(job)
            raise IllegalTransition(
                f"Job {job_id} is {job.status}; only jobs that are {', '.join(CANCELLABLE)} can be cancelled.",
                param="fine_tuning_job_id")
        # auto_iterate: cancelling the loop cancels its running round; cancelling a round ends the loop.
        for child in session.scalars(select(FineTuningJob.id).where(FineTuningJob.parent_job_id == job_id)):
            transition(session, child, CANCELLABLE, "cancelled", f"Cancelled with its parent job {job_id}")
        if job.parent_job_id:
            end_round(session, job_id=job_id)
    session.refresh(job)
    return job


# -- what workers record ---------------------------------------------------------------

def claim(session: Session, *, job_id: str, worker_id: str) -> FineTuningJob | None:
    """Atomically move a queued job to running for this worker. Returns None when the job is not
    queued (already claimed, finished, cancelled or unknown): a redelivered message does nothing."""
    now = utcnow()
    if not transition(session, job_id, ("queued",), "running", f"Claimed by worker {worker_id}",
                      data={"worker_id": worker_id}, worker_id=worker_id, started_at=now, heartbeat_at=now,
                      attempts=FineTuningJob.attempts + 1):
        return None
    return session.get(FineTuningJob, job_id, populate_existing=True)


def status_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))


def record_metrics(session: Session, *, job_id: str, message: str, data: dict) -> None:
    """A training-progress event; also refreshes trained_tokens, the ETA and the heartbeat."""
    add_event(session, job_id, message, type="metrics", data=data)
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if data.get("trained_tokens") is not None:
        values["trained_tokens"] = int(data["trained_tokens"])
    if data.get("eta_seconds") is not None:
        values["estimated_finish"] = utcnow() + dt.timedelta(seconds=float(data["eta_seconds"]))
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status == "running")
                    .values(**values).execution_options(synchronize_session=False))


def succeed(session: Session, *, job_id: str, fine_tuned_model: str, trained_tokens: int,
            usage: dict) -> bool:
    """Final state, only from running. Returns False when the job was cancelled meanwhile."""
    return transition(session, job_id, ("running",), "succeeded",
                      f"The job has successfully completed; fine-tuned model: {fine_tuned_model}",
                      data=usage, fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, usage=usage)


def start_evaluating(session: Session, *, job_id: str, fine_tuned_model: str, trained_tokens: int,
                     usage: dict) -> bool:
    """running -> evaluating once the adapter is saved. Returns False when the job was cancelled meanwhile."""
    return transition(session, job_id, ("running",), "evaluating",
                      f"Training done; evaluating the base and the tuned model ({fine_tuned_model})",
                      data=usage, fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, usage=usage)


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


def fail(session: Session, *, job_id: str, code: str, message: str, param: str | None = None) -> bool:
    """Final state, only from an unfinished state. Returns False when the job already ended."""
    return transition(session, job_id, ("validating_files", "queued", "running", "evaluating"), "failed",
                      f"The job failed: {message}", level="error",
                      error={"code": code, "message": message, "param": param})


def stale_queued(session: Session, *, older_than: dt.datetime) -> list[str]:
    """Queued jobs created before `older_than`: candidates for re-dispatch (a lost enqueue)."""
    return list(session.scalars(select(FineTuningJob.id).where(
        FineTuningJob.status == "queued", FineTuningJob.created_at < older_than)))


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
