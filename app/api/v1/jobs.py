from __future__ import annotations

import re

from fastapi import APIRouter, Request

from app.api.deps import IdempotencyKey, PageDep, PrincipalDep, SessionDep
from app.api.idempotent import create_once
from app.core import queue
from app.domains.jobs import service as jobs
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
    """409 when the job already ended. A running trainer stops at its next step."""
    return jobs.to_read(session, jobs.cancel(session, team_id=principal.team_id, job_id=job_id))


@router.get("/{job_id}/events", response_model=EventList)
def list_events(job_id: str, session: SessionDep, principal: PrincipalDep, page: PageDep) -> EventList:
    """Newest first, like OpenAI's; page with after=<last id>."""
    return jobs.events_page(session, team_id=principal.team_id, job_id=job_id, after=page.after, limit=page.limit)
