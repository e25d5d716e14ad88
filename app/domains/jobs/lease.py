"""What workers do with jobs: claim one under a lease, record progress as its holder, finish or
hand it back; and the reaper's verbs.

A running job has exactly one holder: the worker whose claim wrote its lease_token
(app.core.leases). Only the holder renews the lease and writes what follows running (a final
state, evaluating, paused, or queued on hand-back); the API asks a running job to cancel or
pause through stop_request, and the reaper takes over jobs whose lease expired (their holder
died): requeued up to max_attempts, then failed. Each function is one transaction's worth of
work in the caller's session; whatever it decides to enqueue is sent after that commits.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from app.core import leases, queue
from app.core.db import utcnow
from app.domains.adapters import service as adapters
from app.domains.evaluations import service as evaluations
from app.domains.files import service as files
from app.domains.jobs import results
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.rounds import end_round
from app.domains.jobs.service import counts, model_name
from app.domains.jobs.spec import TrainingSpec
from app.domains.jobs.states import (FAILABLE_UNHELD, FINAL, JobStatus, StopReason, StopRequest, add_event,
                                     enqueue_after_commit, existing_job, transition)
from app.domains.base_models import service as base_models
from app.domains.quotas import service as quotas
from app.domains.teams.models import Team
from app.domains.webhooks import service as webhooks

RUNNING = JobStatus.RUNNING


def _held(job_id: str, lease_token: str) -> tuple[ColumnElement[bool], ...]:
    return (FineTuningJob.id == job_id, *leases.held(FineTuningJob, running=RUNNING, lease_token=lease_token))


def _held_without_cancel(job_id: str, lease_token: str) -> tuple[ColumnElement[bool], ...]:
    return (*_held(job_id, lease_token), FineTuningJob.stop_request.is_distinct_from(StopRequest.CANCEL))


# -- claiming --------------------------------------------------------------------------------

def may_start(session: Session, team_id: str) -> bool:
    """Whether one more of the team's jobs may start running now. Call it in the claim's transaction,
    right before the claiming UPDATE: it locks the team's row until that transaction ends, so two
    workers claiming jobs of one team at once cannot both take the last running slot."""
    return quotas.may_start(session, team_id, jobs=counts(team_id))


def claim(session: Session, *, job_id: str, worker_id: str, lease_seconds: float,
          max_attempts: int) -> FineTuningJob | None:
    """Atomically move a queued job to running for this worker with a new lease (the returned row's
    lease_token) and count the attempt. Returns None when the job is not queued (claimed and still
    leased, finished, cancelled, paused or unknown), has used its attempts, or its team may not start
    another job yet (it stays queued; re-dispatch retries it): a redelivered message does nothing."""
    team_id = session.scalar(select(FineTuningJob.team_id).where(FineTuningJob.id == job_id,
                                                                  FineTuningJob.status == JobStatus.QUEUED))
    if team_id is None or not may_start(session, team_id):
        return None
    now = utcnow()
    if not transition(session, job_id, (JobStatus.QUEUED,), RUNNING, f"Claimed by worker {worker_id}",
                      data={"worker_id": worker_id},
                      where=leases.claimable(FineTuningJob, max_attempts=max_attempts),
                      worker_id=worker_id, started_at=func.coalesce(FineTuningJob.started_at, now),
                      heartbeat_at=now, stop_request=None,
                      **leases.new_lease(FineTuningJob, lease_seconds=lease_seconds)):
        return None
    return session.get(FineTuningJob, job_id, populate_existing=True)


@dataclass(frozen=True)
class TrainingInputs:
    """Everything the training task needs to run a claimed job, read in one transaction."""

    job_id: str
    team_id: str
    spec: TrainingSpec
    base_model: str  # the registered name, which the adapter records
    base_path: Path
    train_key: str  # storage keys of the training and validation files: the worker stages them
    valid_key: str | None
    fine_tuned_model: str  # the name the adapter gets if training succeeds
    trained_tokens_limit: int  # the team's cost limits (quotas): tokens per job, wall seconds per run
    wall_seconds_limit: int
    init_adapter_prefix: str | None = None  # storage prefix of the peft directory to start from (spec.init_adapter)


def training_inputs(session: Session, *, job_id: str) -> TrainingInputs:
    """Read a claimed job's inputs. Raises LookupError when its base model is no longer
    registered or the adapter it starts from was deleted, FileNotFound when one of its files was deleted."""
    job = existing_job(session, job_id)
    base = base_models.get_base(session, job.model)
    if base is None:
        raise LookupError(f"base model {job.model!r} is no longer registered")
    train_key = files.get(session, team_id=job.team_id, file_id=job.training_file).storage_key
    valid_key = (files.get(session, team_id=job.team_id, file_id=job.validation_file).storage_key
                 if job.validation_file else None)
    team_name = session.get_one(Team, job.team_id).name  # a job's team exists (the job cascades with it)
    limits = quotas.limits(session, job.team_id)
    spec = TrainingSpec.model_validate(job.spec)
    init_prefix = None
    if spec.init_adapter is not None:
        start = adapters.get_by_name(session, team_id=job.team_id, name=spec.init_adapter.model)
        if start is None or start.id != spec.init_adapter.id:
            raise LookupError(f"the model this job continues from, {spec.init_adapter.model!r}, was deleted")
        init_prefix = adapters.files_prefix(start.storage_prefix)
    return TrainingInputs(
        job_id=job.id, team_id=job.team_id, spec=spec, base_model=job.model,
        base_path=Path(base.path), train_key=train_key, valid_key=valid_key,
        fine_tuned_model=model_name(base=job.model, team_name=team_name, suffix=job.suffix, job_id=job.id),
        trained_tokens_limit=limits.trained_tokens, wall_seconds_limit=limits.job_wall_seconds,
        init_adapter_prefix=init_prefix)


# -- what the holder records -------------------------------------------------------------------

def renew(session: Session, *, job_id: str, lease_token: str, lease_seconds: float) -> bool:
    """Extend the holder's lease from now. False when the lease is no longer this holder's (the
    reaper requeued the job, or it ended): the holder must stop and write nothing more."""
    return leases.renew(session, FineTuningJob, ids=[job_id], running=RUNNING, lease_token=lease_token,
                        lease_seconds=lease_seconds, heartbeat_at=utcnow())


def holds(session: Session, *, job_id: str, lease_token: str) -> bool:
    """Whether this holder still holds the lease; locks the row until the caller's transaction ends,
    so what the holder writes in that transaction cannot interleave with a reap."""
    return leases.holds(session, FineTuningJob, id=job_id, running=RUNNING, lease_token=lease_token)


def holder_view(session: Session, *, job_id: str, lease_token: str) -> Literal["lost", "cancel", "pause"] | None:
    """What the holder should do now: "lost" (stop, write nothing), "cancel" or "pause" (requested
    by the API), or None (keep training)."""
    row = session.execute(select(FineTuningJob.status, FineTuningJob.lease_token, FineTuningJob.stop_request)
                          .where(FineTuningJob.id == job_id)).first()
    if row is None or row.status != RUNNING or row.lease_token != lease_token:
        return "lost"
    return row.stop_request


def record_event(session: Session, *, job_id: str, lease_token: str, message: str, data: dict | None = None) -> bool:
    """A message event, only by the lease holder: returns False (and writes nothing) otherwise."""
    if not holds(session, job_id=job_id, lease_token=lease_token):
        return False
    add_event(session, job_id, message, data=data)
    return True


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


def release(session: Session, *, job_id: str, lease_token: str, reason: StopReason,
            message: str | None = None) -> JobStatus | None:
    """The holder stopped training early: settle the job and drop the lease. A pending cancel
    request wins (cancelled, which ends an auto_iterate loop), then a pause request (paused), then
    a shutdown (queued again, and enqueued after commit). A pause or a hand-back does not use up an
    attempt. Returns the new status, or None when the lease is no longer held (nothing is written)."""
    row = session.execute(select(FineTuningJob.stop_request).where(*_held(job_id, lease_token))
                          .with_for_update()).first()
    if row is None:
        return None
    # A pause withdrawn after the trainer already stopped for it: hand the job back instead.
    request = row.stop_request or ("shutdown" if reason != StopRequest.CANCEL else None)
    if request == StopRequest.CANCEL:
        transition(session, job_id, (RUNNING,), JobStatus.CANCELLED, "Job cancelled", where=_held(job_id, lease_token))
        status = JobStatus.CANCELLED
    elif request in (StopRequest.PAUSE, "shutdown"):
        status = JobStatus.PAUSED if request == StopRequest.PAUSE else JobStatus.QUEUED
        text = ("Job paused at its latest checkpoint" if status == JobStatus.PAUSED
                else "Worker shutting down; job handed back and queued to continue from its latest checkpoint")
        transition(session, job_id, (RUNNING,), status, text, where=_held(job_id, lease_token),
                   attempts=FineTuningJob.attempts - 1, enqueued_at=utcnow())
    else:  # "cancel" with no request: the lease was lost in between; leave it to the new owner
        return None
    if message:
        add_event(session, job_id, message)
    if status == JobStatus.CANCELLED:
        end_round(session, job_id=job_id)
    elif status == JobStatus.QUEUED:
        enqueue_after_commit(session, job_id)
    return status


def succeed(session: Session, *, job_id: str, lease_token: str, fine_tuned_model: str, trained_tokens: int,
            usage: dict) -> bool:
    """Final state, only by the lease holder of a running job. Returns False when the lease is lost
    or a cancel was requested meanwhile."""
    return transition(session, job_id, (RUNNING,), JobStatus.SUCCEEDED,
                      f"The job has successfully completed; fine-tuned model: {fine_tuned_model}",
                      data=usage, where=_held_without_cancel(job_id, lease_token), fine_tuned_model=fine_tuned_model,
                      trained_tokens=trained_tokens, usage=usage)


def start_evaluating(session: Session, *, job_id: str, lease_token: str, fine_tuned_model: str,
                     trained_tokens: int, usage: dict) -> bool:
    """running -> evaluating once the adapter is saved, by the lease holder. False as for succeed()."""
    return transition(session, job_id, (RUNNING,), JobStatus.EVALUATING,
                      f"Training done; evaluating the base and the tuned model ({fine_tuned_model})",
                      data=usage, where=_held_without_cancel(job_id, lease_token), fine_tuned_model=fine_tuned_model,
                      trained_tokens=trained_tokens, usage=usage)


@dataclass(frozen=True)
class StoredAdapter:
    """A trained adapter already in blob storage, not yet recorded."""

    id: str
    storage_prefix: str
    archive_key: str
    bytes: int
    sha256: str


def finish_training(session: Session, *, inputs: TrainingInputs, lease_token: str, adapter: StoredAdapter,
                    trained_tokens: int, usage: dict) -> JobStatus | None:
    """Record a trained job, by its lease holder, in one transaction: succeeded (or evaluating, when
    its spec asks for an evaluation: the evaluations of the roles its eval spec asks for, base and
    tuned, and tuned_4bit with compare_quantization, are created and enqueued after commit) with its
    adapter row and its metrics CSV in result_files (jobs.results). When a cancel arrived after the
    last step (it wins) the job ends cancelled, and when the lease was lost nothing is recorded;
    either way the adapter's files are deleted after commit. Returns the new status, or None when
    the lease was lost."""
    spec, job_id = inputs.spec, inputs.job_id
    evaluation = spec.evaluation
    done = start_evaluating if evaluation is not None else succeed
    if not done(session, job_id=job_id, lease_token=lease_token, fine_tuned_model=inputs.fine_tuned_model,
                trained_tokens=trained_tokens, usage=usage):
        queue.delete_after_commit(session, adapter.storage_prefix)
        return release(session, job_id=job_id, lease_token=lease_token, reason="cancel",
                       message="Training finished, but the job was cancelled first; no adapter was kept.")
    results.attach(session, job_id=job_id, team_id=inputs.team_id)
    adapters.create(session, adapter_id=adapter.id, team_id=inputs.team_id, job_id=job_id,
                    base_model=inputs.base_model, name=inputs.fine_tuned_model, storage_prefix=adapter.storage_prefix,
                    archive_key=adapter.archive_key, size=adapter.bytes, sha256=adapter.sha256)
    if evaluation is None:
        return JobStatus.SUCCEEDED
    evaluations.create_for_job(session, team_id=inputs.team_id, job_id=job_id, base_model=inputs.base_model,
                               adapter_id=adapter.id, fine_tuned_model=inputs.fine_tuned_model, spec=evaluation)
    return JobStatus.EVALUATING


def fail(session: Session, *, job_id: str, code: str, message: str, param: str | None = None,
         lease_token: str | None = None) -> bool:
    """Final state. A running job fails only by its lease holder (pass lease_token); without one,
    only a job with no holder (validating_files, queued, evaluating) fails. A job failed by its
    holder gets the metrics CSV of the steps it logged (jobs.results). A failed round ends its
    auto_iterate loop. Returns False (nothing written) otherwise."""
    states: tuple[JobStatus, ...] = FAILABLE_UNHELD
    where: tuple[ColumnElement[bool], ...] = ()
    if lease_token is not None:
        states, where = (RUNNING,), _held(job_id, lease_token)
    if not transition(session, job_id, states, JobStatus.FAILED, f"The job failed: {message}", level="error",
                      where=where, error={"code": code, "message": message, "param": param}):
        return False
    if lease_token is not None:  # failed while training: the steps it logged go to its result_files
        job = existing_job(session, job_id)
        results.attach(session, job_id=job_id, team_id=job.team_id)
    end_round(session, job_id=job_id)
    return True


# -- the reaper ------------------------------------------------------------------------------

def reap(session: Session, *, max_attempts: int) -> list[str]:
    """Take over running jobs whose lease expired (their worker died or lost the database): a
    pending cancel ends them cancelled, a pending pause paused; otherwise they are queued again
    (and enqueued after commit) while attempts remain, else failed with code lease_expired. Each is
    one conditional UPDATE, so a holder renewing at the same moment either wins or loses cleanly.
    Returns the requeued ids."""
    now = utcnow()
    lost = "its worker stopped renewing its lease"
    # (the further condition, the status it leads to, the columns set alongside), tried in order.
    outcomes: tuple[tuple[tuple[ColumnElement[bool], ...], JobStatus, dict[str, Any]], ...] = (
        ((FineTuningJob.stop_request == StopRequest.CANCEL,), JobStatus.CANCELLED, {}),
        ((FineTuningJob.stop_request == StopRequest.PAUSE,), JobStatus.PAUSED, {}),
        ((FineTuningJob.attempts >= max_attempts,), JobStatus.FAILED, {}),
        ((), JobStatus.QUEUED, {"enqueued_at": now}),
    )
    requeued: list[str] = []
    for where, status, values in outcomes:
        values = {**values, "estimated_finish": None}  # none of them is running: no training ETA
        if status in FINAL:
            values["finished_at"] = now
        rows = leases.reap(session, FineTuningJob, running=RUNNING, status=status, where=where,
                           returning=(FineTuningJob.attempts, FineTuningJob.worker_id, FineTuningJob.team_id),
                           stop_request=None, **values)
        for job_id, attempts, worker, team_id in rows:
            if status == JobStatus.FAILED:
                text = f"{lost} on all {attempts} attempts (max_attempts {max_attempts})"
                session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(
                    error={"code": "lease_expired", "message": f"The job was given up: {text}.", "param": None})
                    .execution_options(synchronize_session=False))
                add_event(session, job_id, f"The job failed: {text}", level="error")
            elif status == JobStatus.QUEUED:
                add_event(session, job_id, f"Requeued: worker {worker} stopped renewing its lease "
                                           f"(attempt {attempts} of {max_attempts} used)")
                requeued.append(job_id)
                enqueue_after_commit(session, job_id)
            else:
                add_event(session, job_id, f"Job {status} ({lost}; it had been asked to "
                                           f"{'cancel' if status == JobStatus.CANCELLED else 'pause'})")
            if status in FINAL:
                webhooks.job_ended(session, team_id=team_id, job_id=job_id, status=status)
                end_round(session, job_id=job_id)
    return requeued


def give_up_evaluation(session: Session, *, job_id: str, evaluation_id: str) -> bool:
    """A job whose evaluation the reaper gave up (evaluations.reap) fails with code lease_expired."""
    return fail(session, job_id=job_id, code="lease_expired",
                message=f"its evaluation {evaluation_id} was given up: its worker stopped renewing its lease on "
                        f"every attempt")


def redispatch_stale(session: Session, *, older_than: dt.datetime) -> list[str]:
    """Re-send, after commit, queued jobs last enqueued (or created) before `older_than` (a lost
    enqueue, a message lost with the broker, a claim the quota deferred). Marks them enqueued now,
    so one job is re-sent at most once per interval. Returns their ids."""
    ids = [r.id for r in leases.take_stale(session, FineTuningJob, queued=JobStatus.QUEUED, older_than=older_than)]
    for job_id in ids:
        enqueue_after_commit(session, job_id)
    return ids
