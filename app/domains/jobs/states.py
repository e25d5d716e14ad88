"""A job's states, their groups, and the one way a job changes state.

validating_files -> queued -> running -> (evaluating) -> succeeded | failed | cancelled, and
running <-> paused (through queued on resume). Every status change is one conditional UPDATE plus
its event, in the caller's transaction: a change from a state the job is no longer in matches no
row and is refused, so two actors (a worker finishing, a user cancelling) can never both win.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from app.core import leases, queue
from app.core.db import utcnow
from app.core.ids import new_id
from app.domains.jobs.models import FineTuningJob, FineTuningJobEvent
from app.domains.webhooks import service as webhooks


class JobStatus(StrEnum):
    """fine_tuning_job.status; the values are OpenAI's names plus evaluating and paused."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    EVALUATING = "evaluating"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StopRequest(StrEnum):
    """fine_tuning_job.stop_request: what the API asked of a running job's lease holder."""

    CANCEL = "cancel"
    PAUSE = "pause"


# Why a holder's trainer stopped early: a request, or its worker shutting down.
StopReason = Literal["cancel", "pause", "shutdown"]

# Not ended yet.
ACTIVE = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.EVALUATING, JobStatus.PAUSED)
FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
CANCELLABLE = ACTIVE
# States with no lease holder, which the API may end directly.
UNHELD = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.EVALUATING, JobStatus.PAUSED)
# Those that fail() may end without a lease token (a paused job is not failed, it is resumed or cancelled).
FAILABLE_UNHELD = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.EVALUATING)
# Counted against the team's queued_jobs quota, and its running_jobs quota.
WAITING = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED)
RUNNING = (JobStatus.RUNNING,)


def existing_job(session: Session, job_id: str) -> FineTuningJob:
    """The job, for a caller that knows it exists (it holds the job's lease, or read the id from
    another of its rows). Raises LookupError when it does not."""
    job = session.get(FineTuningJob, job_id)
    if job is None:
        raise LookupError(f"job {job_id!r} does not exist")
    return job


def enqueue_after_commit(session: Session, job_id: str) -> None:
    """Send the job to the training queue of the device its spec asks for, once the session commits.
    The spec never changes, so the job the session already holds (creation, resume) is read as it is."""
    device = existing_job(session, job_id).spec.get("device", "any")  # absent from jobs made before devices
    queue.after_commit(session, queue.enqueue_training, job_id, device)


def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict | None = None) -> FineTuningJobEvent:
    event = FineTuningJobEvent(id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message,
                               data=data)
    session.add(event)
    session.flush()
    return event


def transition(session: Session, job_id: str, from_states: tuple[JobStatus, ...], to_state: JobStatus, message: str,
               *, level: str = "info", data: dict | None = None, where: tuple[ColumnElement[bool], ...] = (),
               **values: Any) -> bool:
    """Move the job to `to_state` only if it is in one of `from_states` (and `where` holds); write
    the event. Returns False (and writes nothing) when it did not match. Leaving running always
    drops the lease, any pending stop request and the training ETA (estimated_finish). A final
    state also sends the team's webhooks, after commit."""
    if to_state in FINAL:
        values.setdefault("finished_at", utcnow())
    if to_state != JobStatus.RUNNING:
        values.setdefault("estimated_finish", None)
        values.update(leases.no_lease(), stop_request=None)
    result = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.status.in_(from_states), *where)
        .values(status=to_state, **values)
        .returning(FineTuningJob.team_id)
        .execution_options(synchronize_session=False)
    ).first()
    if result is None:
        return False
    add_event(session, job_id, message, level=level, data=data)
    webhooks.job_ended(session, team_id=result.team_id, job_id=job_id, status=to_state)
    return True
