from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class AuditEvent(Base):
    """One mutating request under /v1, refused ones included. Append-only: on Postgres a trigger
    refuses UPDATE and DELETE. No foreign keys, so the trail outlives the team and keys it names."""

    __tablename__ = "audit_event"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # NULL when the request was not authenticated (a 401).
    team_id: Mapped[str | None] = mapped_column(String(40), index=True)
    key_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(255))  # "POST /v1/files/{file_id}": method + route template
    object_id: Mapped[str | None] = mapped_column(String(128))
    status_code: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
