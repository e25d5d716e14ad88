from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class AuditEvent(Base):
    """One mutating request under /v1 made with a valid key, refused ones included. Append-only: on
    Postgres a trigger refuses UPDATE, DELETE and TRUNCATE, except the deletion of rows older than the
    cutoff that `tuneforge audit prune` sets for its own transaction. No foreign keys, so the trail
    outlives the team and keys it names."""

    __tablename__ = "audit_event"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # NULL only in rows written before unauthenticated requests were counted in audit_unauthenticated.
    team_id: Mapped[str | None] = mapped_column(String(40), index=True)
    key_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(255))  # "POST /v1/files/{file_id}": method + route template
    object_id: Mapped[str | None] = mapped_column(String(128))
    status_code: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class AuditUnauthenticated(Base):
    """Mutating /v1 requests without a valid key, counted, not written one by one: per minute, method,
    route template ("unmatched" for a path no route serves, so a junk path is never stored), status and
    client address prefix (IPv4 /24, IPv6 /48). Its size is bounded by those keys, not by the traffic."""

    __tablename__ = "audit_unauthenticated"

    minute: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    method: Mapped[str] = mapped_column(String(8), primary_key=True)
    route: Mapped[str] = mapped_column(String(255), primary_key=True)
    status_code: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_prefix: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
