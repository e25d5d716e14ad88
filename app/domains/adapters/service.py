"""Adapters: the peft directories jobs produce, kept under the team's storage prefix
with a .tar.gz of the directory for download."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import get_owned, unix
from app.core.pagination import paginate
from app.domains.adapters.errors import AdapterNotFound
from app.domains.adapters.models import Adapter
from app.domains.adapters.schemas import AdapterList, AdapterRead


def storage_prefix(*, team_id: str, adapter_id: str) -> str:
    """Where an adapter lives: its peft directory under files_prefix(), its archive at archive_key()."""
    return f"teams/{team_id}/adapters/{adapter_id}"


def files_prefix(storage_prefix: str) -> str:
    """The adapter's peft directory (what inference and evaluation load)."""
    return f"{storage_prefix}/files"


def archive_key(storage_prefix: str) -> str:
    """The adapter's .tar.gz (what a download returns)."""
    return f"{storage_prefix}/adapter.tar.gz"


def create(session: Session, *, adapter_id: str, team_id: str, job_id: str, base_model: str, name: str,
           storage_prefix: str, archive_key: str, size: int, sha256: str) -> Adapter:
    row = Adapter(id=adapter_id, team_id=team_id, job_id=job_id, base_model=base_model, name=name,
                  storage_prefix=storage_prefix, archive_key=archive_key, bytes=size, sha256=sha256)
    session.add(row)
    session.flush()
    return row


def get(session: Session, *, team_id: str, adapter_id: str) -> Adapter:
    """The team's adapter. Raises AdapterNotFound for a missing id and for another team's, alike."""
    row = get_owned(session, Adapter, adapter_id, team_id)
    if row is None:
        raise AdapterNotFound(f"No such adapter: {adapter_id!r}.", param="adapter_id")
    return row


def get_by_name(session: Session, *, team_id: str, name: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.team_id == team_id, Adapter.name == name))


def for_job(session: Session, job_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.job_id == job_id))


def ids_for_jobs(session: Session, job_ids: list[str]) -> dict[str, str]:
    """{job id: its adapter's id} for those of the jobs that have one, in one query (a page of jobs)."""
    if not job_ids:
        return {}
    rows = session.execute(select(Adapter.job_id, Adapter.id).where(Adapter.job_id.in_(job_ids))).tuples()
    return {job_id: adapter_id for job_id, adapter_id in rows if job_id is not None}


def list_all(session: Session, *, team_id: str) -> list[Adapter]:
    return list(session.scalars(select(Adapter).where(Adapter.team_id == team_id).order_by(Adapter.id.desc())))


def list_page(session: Session, *, team_id: str, after: str | None, limit: int) -> AdapterList:
    rows, has_more = paginate(session, select(Adapter).where(Adapter.team_id == team_id), Adapter.id,
                              after=after, limit=limit)
    return AdapterList(data=[to_read(r) for r in rows], has_more=has_more)


def delete(session: Session, *, team_id: str, adapter_id: str) -> str:
    """Delete the row; its files are removed after commit. Returns their storage prefix."""
    row = get(session, team_id=team_id, adapter_id=adapter_id)
    session.delete(row)
    session.flush()
    queue.delete_after_commit(session, row.storage_prefix)
    return row.storage_prefix


def to_read(row: Adapter) -> AdapterRead:
    return AdapterRead(id=row.id, created_at=unix(row.created_at), name=row.name, base_model=row.base_model,
                       job_id=row.job_id, bytes=row.bytes, sha256=row.sha256)
