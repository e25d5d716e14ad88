"""Idempotency-Key: the same key on the same endpoint returns the object the first request created.

The key row is inserted in the same transaction as the object, so either both exist or neither;
a concurrent duplicate loses on the primary key and the caller returns the winner's object."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.domains.idempotency.models import IdempotencyKey


def lookup(session: Session, *, team_id: str, endpoint: str, key: str | None) -> str | None:
    if not key:
        return None
    row = session.get(IdempotencyKey, (team_id, endpoint, key))
    return row.object_id if row else None


def remember(session: Session, *, team_id: str, endpoint: str, key: str | None, object_id: str) -> None:
    if key:
        session.add(IdempotencyKey(team_id=team_id, endpoint=endpoint, key=key, object_id=object_id))
        session.flush()
