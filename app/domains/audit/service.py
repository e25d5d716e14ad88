"""The audit log: one row per mutating request, written by the API's audit middleware.

Rows are only ever inserted (on Postgres a trigger refuses UPDATE, DELETE and TRUNCATE). A row is
written in its own short transaction after the request was handled, so a refused or failed request
is recorded too, and the request's own rollback cannot take the row with it.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import unix
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.audit.models import AuditEvent
from app.domains.audit.schemas import AuditEventList, AuditEventRead


def record(session: Session, *, team_id: str | None, key_id: str | None, action: str, object_id: str | None,
           status_code: int) -> AuditEvent:
    row = AuditEvent(id=new_id("audit"), team_id=team_id, key_id=key_id, action=action[:255],
                     object_id=object_id[:128] if object_id else None, status_code=status_code)
    session.add(row)
    session.flush()
    return row


def list_page(session: Session, *, team_id: str, after: str | None, limit: int,
              action: str | None = None, key_id: str | None = None) -> AuditEventList:
    """The team's events, newest first; unauthenticated requests (no team) are not listed to anyone."""
    stmt = select(AuditEvent).where(AuditEvent.team_id == team_id)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if key_id:
        stmt = stmt.where(AuditEvent.key_id == key_id)
    rows, has_more = paginate(session, stmt, AuditEvent.id, after=after, limit=limit)
    data = [to_read(r) for r in rows]
    return AuditEventList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


def to_read(row: AuditEvent) -> AuditEventRead:
    return AuditEventRead(id=row.id, team_id=row.team_id, key_id=row.key_id, action=row.action,
                          object_id=row.object_id, status_code=row.status_code, created_at=unix(row.created_at))
