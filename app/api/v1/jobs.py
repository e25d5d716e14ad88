from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api import sse
from app.api.deps import IdempotencyKey, PageDep, PrincipalDep, SessionDep, in_unit_of_work
from app.api.idempotent import create_once
from app.api.request_checks import QueryFamily
from app.core.config import get_settings
from app.core.errors import InvalidRequest
from app.domains.checkpoints import service as checkpoints
from app.domains.checkpoints.schemas import CheckpointList
from app.domains.jobs import service as jobs
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.schemas import EventList, EventRead, JobCreate, JobList, JobRead, metadata_key_problem
from app.domains.jobs.states import JobStatus

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])
MetadataFilter = Annotated[dict[str, str], Depends(QueryFamily("metadata", metadata_key_problem))]


@router.post("", response_model=JobRead)
def create_job(body: JobCreate, session: SessionDep, principal: PrincipalDep,
               idempotency_key: IdempotencyKey = None) -> JobRead:
    """Validates the spec and files, stores the job as queued, then enqueues its id (after commit).
    The answer is built inside the transaction that creates the job: once it commits, nothing is left
    that needs a connection (and could time out with 503 for a job that exists)."""
    job, _ = create_once(
        session, principal, endpoint="jobs", key=idempotency_key,
        create=lambda: jobs.to_read(session, jobs.create(session, team_id=principal.team_id, body=body)),
        fetch=lambda job_id: jobs.to_read(session, jobs.get(session, team_id=principal.team_id, job_id=job_id)))
    return job


@router.get("", response_model=JobList)
def list_jobs(session: SessionDep, principal: PrincipalDep, page: PageDep, metadata: MetadataFilter,
              no_metadata: Annotated[str | None, Query(alias="metadata", description="'null': only jobs created "
                                                                                    "without metadata")] = None,
              ) -> JobList:
    """Newest first. Filter by metadata with metadata[key]=value query parameters (all must match),
    or, as OpenAI's metadata=null, to the jobs created without metadata; a malformed filter answers 400."""
    if no_metadata is not None and no_metadata != "null":
        raise InvalidRequest(f"metadata={no_metadata!r} is not a filter: give metadata=null for the jobs without "
                             "metadata, or metadata[key]=value pairs.", param="metadata", code="invalid_filter")
    if no_metadata is not None and metadata:
        raise InvalidRequest("metadata=null (jobs without metadata) contradicts the metadata[key]=value filters "
                             "given with it; give one or the other.", param="metadata", code="invalid_filter")
    return jobs.list_page(session, team_id=principal.team_id, after=page.after, limit=page.limit, metadata=metadata,
                          without_metadata=no_metadata is not None)


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobRead:
    return jobs.to_read(session, jobs.get(session, team_id=principal.team_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
async def cancel_job(job_id: str, principal: PrincipalDep) -> JobRead:
    """409 when the job already ended. A running job's worker stops it at its next step; the answer
    waits a few seconds (stop_wait_seconds) for that, else shows the job still running."""
    return await _ask_holder(jobs.cancel, principal.team_id, job_id)


@router.post("/{job_id}/pause", response_model=JobRead)
async def pause_job(job_id: str, principal: PrincipalDep) -> JobRead:
    """Pause a queued job at once, or a running one at a checkpoint its worker writes at its next step
    (the answer waits a few seconds for that, as cancel does). 409 from any other state."""
    return await _ask_holder(jobs.pause, principal.team_id, job_id)


@router.post("/{job_id}/resume", response_model=JobRead)
def resume_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobRead:
    """Queue a paused job again; it continues from its latest checkpoint, its step count going on.
    409 unless the job is paused (or still running with its pause pending, which is withdrawn)."""
    return jobs.to_read(session, jobs.resume(session, team_id=principal.team_id, job_id=job_id))


async def _ask_holder(verb: Callable[..., FineTuningJob], team_id: str, job_id: str) -> JobRead:
    """Run verb (cancel or pause) in a unit of work of its own, so its request is committed before
    the answer waits: a running job's request is carried out by its worker, so poll briefly, each
    time in a short read, for the worker to act and the answer usually shows the new state."""
    def ask(session: Session) -> tuple[JobRead, bool]:
        job = verb(session, team_id=team_id, job_id=job_id)
        return jobs.to_read(session, job), job.status == JobStatus.RUNNING and job.stop_request is not None

    def read(session: Session) -> JobRead:
        return jobs.to_read(session, jobs.get(session, team_id=team_id, job_id=job_id))

    job, waiting = await in_unit_of_work(ask)
    deadline = time.monotonic() + get_settings().stop_wait_seconds
    while waiting and job.status == JobStatus.RUNNING and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        job = await in_unit_of_work(read)
    return job


@router.get("/{job_id}/events", response_model=EventList, responses=sse.RESPONSES)
def list_events(job_id: str, request: Request, session: SessionDep, principal: PrincipalDep, page: PageDep,
                stream: Annotated[bool, Query(description=(
                    "true: the events as server-sent events, oldest first, then each new one as it is written, "
                    "until the job ends. Each message has the event's id (id:) and its JSON (data:)."))] = False,
                last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64, description=(
                    "With stream=true: resume after this event (EventSource sends it on reconnecting)."))] = None,
                ) -> EventList | StreamingResponse:
    """Newest first, like OpenAI's; page with after=<last id>. With stream=true, a live stream
    (text/event-stream) instead: the events after Last-Event-ID (or all, from the first), then new
    ones as they are written, with keep-alive comments, closed once the job has ended; after and
    limit do not apply to it (400)."""
    if not stream:
        return jobs.events_page(session, team_id=principal.team_id, job_id=job_id, after=page.after,
                                limit=page.limit)
    team_id = principal.team_id
    # Checked here, before the stream starts, and before the parameters: another team's job answers 404
    # whatever else the request holds (a 400 first would tell that the job exists), and a bad id 400.
    jobs.events_after(session, team_id=team_id, job_id=job_id, after=last_event_id, limit=0)
    for name in ("after", "limit"):
        if name in request.query_params:
            raise InvalidRequest(f"{name} pages the list; a stream (stream=true) starts after the Last-Event-ID "
                                 "header instead. Drop it, or drop stream=true.", param=name)

    async def fetch(after: str | None, limit: int) -> tuple[list[EventRead], bool]:
        return await in_unit_of_work(
            lambda s: jobs.events_after(s, team_id=team_id, job_id=job_id, after=after, limit=limit))

    return sse.stream(fetch, after=last_event_id)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, session: SessionDep, principal: PrincipalDep, page: PageDep) -> CheckpointList:
    """The job's stored training checkpoints (the latest keep_checkpoints), newest first; page with after=<last id>."""
    return checkpoints.list_page(session, team_id=principal.team_id, job_id=job_id, after=page.after,
                                 limit=page.limit)
