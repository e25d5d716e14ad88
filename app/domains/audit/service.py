"""The audit log: one row per mutating request made with a valid key, and per-minute counts of the
ones made without (app.api.audit decides which, and when).

A mutation's row is added to the transaction that commits the mutation, so both are written or
neither; a refused request's row is written by app.domains.audit.writer on its own connection. Rows
are only ever inserted: on Postgres a trigger refuses UPDATE, DELETE and TRUNCATE, except what
prune() deletes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import cast

from sqlalchemy import delete, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from app.core.db import unix
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.audit.models import AuditEvent, AuditUnauthenticated
from app.domains.audit.schemas import AuditEventList, AuditEventRead

# (minute, method, route, status_code, client_prefix): the key of one audit_unauthenticated row.
CountKey = tuple[dt.datetime, str, str, int, str]


def record(session: Session, *, team_id: str | None, key_id: str | None, action: str, object_id: str | None,
           status_code: int) -> AuditEvent:
    row = AuditEvent(id=new_id("audit"), team_id=team_id, key_id=key_id, action=action[:255],
                     object_id=object_id[:128] if object_id else None, status_code=status_code)
    session.add(row)
    session.flush()
    return row


def count_unauthenticated(session: Session, counts: Mapping[CountKey, int]) -> None:
    """Add `counts` to audit_unauthenticated, one upsert per key (INSERT ... ON CONFLICT DO UPDATE,
    so concurrent writers add up instead of failing)."""
    if not counts:
        return
    dialect = session.get_bind().dialect.name
    upsert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for (minute, method, route, status_code, client_prefix), n in counts.items():
        stmt = upsert(AuditUnauthenticated).values(minute=minute, method=method[:8], route=route[:255],
                                                   status_code=status_code, client_prefix=client_prefix[:64],
                                                   count=n)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["minute", "method", "route", "status_code", "client_prefix"],
            set_={"count": AuditUnauthenticated.count + stmt.excluded.count}))


def record_many(session: Session, rows: Iterable[Mapping]) -> int:
    """Insert several rows at once (keys as record()'s); returns how many."""
    values = [{"id": new_id("audit"), "team_id": r["team_id"], "key_id": r["key_id"], "action": r["action"][:255],
               "object_id": r["object_id"][:128] if r["object_id"] else None, "status_code": r["status_code"],
               "created_at": r["created_at"]} for r in rows]
    if values:
        session.execute(insert(AuditEvent), values)
    return len(values)


def prune(session: Session, *, before: dt.datetime) -> tuple[int, int]:
    """Delete audit rows created before `before`, and the unauthenticated counts of minutes before it:
    the retention an operator applies (`tuneforge audit prune`). Returns (events, counts) deleted.

    On Postgres the append-only trigger lets a DELETE through only for rows older than the cutoff this
    transaction sets (set_config(..., is_local=true)); every other UPDATE or DELETE is still refused."""
    if before.tzinfo is None:
        raise ValueError("naive datetime: give the cutoff in UTC")
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.set_config("tuneforge.audit_prune_before", before.isoformat(), True)))
    events = session.execute(delete(AuditEvent).where(AuditEvent.created_at < before))
    counts = session.execute(delete(AuditUnauthenticated).where(AuditUnauthenticated.minute < before))
    return cast(CursorResult, events).rowcount, cast(CursorResult, counts).rowcount


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
