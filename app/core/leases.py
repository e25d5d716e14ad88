"""Leases: how a worker holds a queued row (a job, an evaluation) while it works on it.

A claim is one conditional UPDATE ... RETURNING that moves a queued row with attempts left to
running under a new random lease_token and counts the attempt; a redelivered message matches no
row and does nothing. The holder renews lease_expires_at while it works, and every write it makes
afterwards is conditional on still holding the token. The reaper takes back running rows whose
lease expired (their worker died or lost the database), and queued rows whose message may have
been lost are re-sent, at most once per interval (enqueued_at).

This module knows the columns and the SQL, not the states: each domain passes in its own
status values (queued, running, ...) and any columns of its own to set alongside.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, ColumnExpressionArgument, Integer, Row, String, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.core.db import UTCDateTime, utcnow


class LeaseColumns:
    """Mixin for a model whose rows workers claim: it also has id, status and created_at."""

    if TYPE_CHECKING:
        # Each model declares these columns itself; named here so that the functions below may use them.
        id: Mapped[str]
        status: Mapped[str]
        created_at: Mapped[dt.datetime]

    # Claims used so far; a row that used max_attempts is failed instead of requeued.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The running holder's lease: only the worker holding lease_token renews it or writes a final
    # state; the reaper takes back a running row whose lease_expires_at has passed.
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # When the row's id was last sent to the queue (None: at creation); paces re-dispatch.
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


def _expiry(lease_seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=lease_seconds)


def claimable(model: type[LeaseColumns], *, max_attempts: int) -> tuple[ColumnElement[bool], ...]:
    """Conditions (besides the queued status) for a claim: attempts left and no live lease."""
    live = model.lease_expires_at.is_not(None) & (model.lease_expires_at > utcnow())
    return (model.attempts < max_attempts, ~live)


def new_lease(model: type[LeaseColumns], *, lease_seconds: float) -> dict[str, Any]:
    """The values a claim sets: one more attempt and a fresh lease."""
    return {"attempts": model.attempts + 1, "lease_token": secrets.token_hex(16),
            "lease_expires_at": _expiry(lease_seconds)}


def no_lease() -> dict[str, Any]:
    """The values that drop a lease (the row leaves running)."""
    return {"lease_token": None, "lease_expires_at": None}


def held(model: type[LeaseColumns], *, running: str, lease_token: str) -> tuple[ColumnElement[bool], ...]:
    """Conditions under which the holder of lease_token may write: running and still its lease."""
    return (model.status == running, model.lease_token == lease_token)


def expired(model: type[LeaseColumns], *, running: str) -> tuple[ColumnElement[bool], ...]:
    return (model.status == running, model.lease_expires_at < utcnow())


def claim(session: Session, model: type[LeaseColumns], *, ids: list[str], queued: str, running: str,
          lease_seconds: float, max_attempts: int, **values: Any) -> tuple[str, list[str]]:
    """Move the queued ones of `ids` with attempts left to running under one new lease, setting
    `values` too. Returns (the lease token, the ids this caller won)."""
    lease = new_lease(model, lease_seconds=lease_seconds)
    won = session.execute(
        update(model).where(model.id.in_(ids), model.status == queued, *claimable(model, max_attempts=max_attempts))
        .values(status=running, **lease, **values)
        .returning(model.id).execution_options(synchronize_session=False)).scalars().all()
    return lease["lease_token"], list(won)


def renew(session: Session, model: type[LeaseColumns], *, ids: list[str], running: str, lease_token: str,
          lease_seconds: float, **values: Any) -> bool:
    """Extend the lease of the ones of `ids` still held with lease_token from now. False when none
    is (the reaper took them back, or they ended): the holder must stop and write nothing more."""
    renewed = session.execute(
        update(model).where(model.id.in_(ids), *held(model, running=running, lease_token=lease_token))
        .values(lease_expires_at=_expiry(lease_seconds), **values)
        .returning(model.id).execution_options(synchronize_session=False)).all()
    return bool(renewed)


def holds(session: Session, model: type[LeaseColumns], *, id: str, running: str, lease_token: str) -> bool:
    """Whether lease_token still holds the row; locks it until the caller's transaction ends, so
    what the holder writes in that transaction cannot interleave with a reap."""
    return session.execute(select(model.id).where(model.id == id, *held(model, running=running,
                                                                        lease_token=lease_token))
                           .with_for_update()).first() is not None


def finish(session: Session, model: type[LeaseColumns], *, id: str, running: str, lease_token: str, status: str,
           **values: Any) -> bool:
    """The holder's final write: the row moves to `status` (with `values`) and its lease is dropped.
    False (nothing written) when lease_token no longer holds it."""
    done = session.execute(
        update(model).where(model.id == id, *held(model, running=running, lease_token=lease_token))
        .values(status=status, **no_lease(), **values)
        .returning(model.id).execution_options(synchronize_session=False)).first()
    return done is not None


def reap(session: Session, model: type[LeaseColumns], *, running: str, status: str,
         where: tuple[ColumnElement[bool], ...] = (), returning: tuple[ColumnExpressionArgument[Any], ...] = (),
         **values: Any) -> Sequence[Row[*tuple[Any, ...]]]:
    """Move running rows whose lease expired (and `where` holds) to `status`, dropping the lease.
    One conditional UPDATE, so a holder renewing at the same moment either wins or loses cleanly.
    Returns the rows of (id, *returning) it moved."""
    return session.execute(
        update(model).where(*expired(model, running=running), *where)
        .values(status=status, **no_lease(), **values)
        .returning(model.id, *returning).execution_options(synchronize_session=False)).all()


def take_stale(session: Session, model: type[LeaseColumns], *columns: ColumnExpressionArgument[Any], queued: str,
               older_than: dt.datetime) -> Sequence[Row[*tuple[Any, ...]]]:
    """Rows (id and `columns`) still queued and last enqueued, or created, before older_than: their
    message may have been lost. Marks them enqueued now, so each is re-sent at most once per
    interval."""
    rows = session.execute(select(model.id, *columns).where(
        model.status == queued, func.coalesce(model.enqueued_at, model.created_at) < older_than)).all()
    if rows:
        session.execute(update(model).where(model.id.in_([r.id for r in rows])).values(enqueued_at=utcnow())
                        .execution_options(synchronize_session=False))
    return rows
