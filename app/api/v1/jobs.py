from __future__ import annotations

import re
import time

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from app.api.deps import IdempotencyKey, PageDep, PrincipalDep, SessionDep
from app.api.idempotent import create_once
from app.core import queue
from app.core.config import get_settings
from app.domains.checkpoints import service as checkpoints
from app.domains.checkpoints.schemas import CheckpointList
from app.domains.jobs import service as jobs
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.schemas import EventList, JobCreate, JobList, JobRead

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])
_META_PARAM = re.compile(r"^metadata\[(.{1,64})\]$")


@router.post("", response_model=JobRead)
def create_job(body: JobCreate, session: SessionDep, principal: PrincipalDep,
               idempotency_key: IdempotencyKey = None) -> JobRead:
    """Validates the spec and files, stores the job as queued, then enqueues its id (after commit)."""
    job, created = create_once(
        session, principal, endpoint="jobs", key=idempotency_key,
        create=lambda: jobs.create(session, team_id=principal.team_id, body=body),
        fetch=lambda job_id: jobs.get(session, team_id=principal.team_id, job_id=job_id))
    if created:
        queue.enqueue_training(job.id)
    return jobs.to_read(session, job)


@router.get("", response_model=JobList)
def list_jobs(request: Request, session: SessionDep, principal: PrincipalDep, page: PageDep) -> JobList:
    """Newest first. Filter by metadata with metadata[key]=value query parameters."""
    metadata = {m.group(1): v for k, v in request.query_params.multi_items() if (m := _META_PARAM.match(k))}
    return jobs.list_page(session, team_id=principal.team_id, after=page.after, limit=page.limit, metadata=metadata)


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobRead:
    return jobs.to_read(session, jobs.get(session, team_id=principal.team_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobRead:
    """409 when the job already ended. A running job's worker stops it at its next step; the answer
    waits a few seconds (stop_wait_seconds) for that, else shows the job still running."""
    job = jobs.cancel(session, team_id=principal.team_id, job_id=job_id)
    return jobs.to_read(session, _await_holder(session, job, principal.team_id))


@router.post("/{job_id}/pause", response_model=JobRead)
def pause_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobRead:
    """Pause a queued job at once, or a running one at a checkpoint its worker writes at its next step
    (the answer waits a few seconds for that, as cancel does). 409 from any other state."""
    job = jobs.pause(session, team_id=principal.team_id, job_id=job_id)
    return jobs.to_read(session, _await_holder(session, job, principal.team_id))


@router.post("/{job_id}/resume", response_model=JobRead)
def resume_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobRead:
    """Queue a paused job again; it continues from its latest checkpoint, its step count going on.
    409 unless the job is paused (or still running with its pause pending, which is withdrawn)."""
    job, requeued = jobs.resume(session, team_id=principal.team_id, job_id=job_id)
    if requeued:
        session.commit()  # the worker must find the job queued when the message arrives
        queue.enqueue_training(job.id)
    return jobs.to_read(session, job)


def _await_holder(session: Session, job: FineTuningJob, team_id: str) -> FineTuningJob:
    """A running job's stop request is carried out by its worker: commit the request, then poll
    briefly for the worker to act so the answer usually shows the new state."""
    if job.status != "running" or job.stop_request is None:
        return job
    session.commit()
    deadline = time.monotonic() + get_settings().stop_wait_seconds
    while job.status == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        session.expire_all()
        job = jobs.get(session, team_id=team_id, job_id=job.id)
    return job


@router.get("/{job_id}/events", response_model=EventList)
def list_events(job_id: str, session: SessionDep, principal: PrincipalDep, page: PageDep) -> EventList:
    """Newest first, like OpenAI's; page with after=<last id>."""
    return jobs.events_page(session, team_id=principal.team_id, job_id=job_id, after=page.after, limit=page.limit)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, session: SessionDep, principal: PrincipalDep, page: PageDep) -> CheckpointList:
    """The job's stored training checkpoints (the latest keep_checkpoints), newest first; page with after=<last id>."""
    return checkpoints.list_page(session, team_id=principal.team_id, job_id=job_id, after=page.after,
                                 limit=page.limit)
