"""Creating an object at most once per Idempotency-Key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domains.idempotency import service as idempotency
from app.domains.teams.service import Principal


class _HasId(Protocol):
    """A created row: its id is what the key remembers."""

    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)


def create_once(session: Session, principal: Principal, *, endpoint: str, key: str | None,
                create: Callable[[], T], fetch: Callable[[str], T]) -> tuple[T, bool]:
    """Return (object, created). A key seen before returns the object its first request made; a
    concurrent request with the same key that commits first wins, and its object is returned.
    Commits on creation (what create() registered to run after commit, such as an enqueue, runs
    then), so that a concurrent request with the same key is caught here, as an IntegrityError:
    at the key's INSERT (Postgres holds it until the first request's transaction ends, then
    refuses it; SQLite refuses it once the first one has committed) or at the commit. The loser's
    object is rolled back with its key, so the team keeps one object per key."""
    existing = idempotency.lookup(session, team_id=principal.team_id, endpoint=endpoint, key=key)
    if existing:
        return fetch(existing), False
    obj = create()
    try:
        idempotency.remember(session, team_id=principal.team_id, endpoint=endpoint, key=key, object_id=obj.id)
        session.commit()
    except IntegrityError:
        session.rollback()
        winner = idempotency.lookup(session, team_id=principal.team_id, endpoint=endpoint, key=key)
        if winner is None:  # the conflict was not over this key, so there is no first object to return
            raise
        return fetch(winner), False
    return obj, True
