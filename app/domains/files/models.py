from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class File(Base):
    """An uploaded file. Rows of fine-tune and evals files exist only for files that passed
    validation; user_data files are stored as sent, and fine-tune-results files are written by
    Tuneforge (a job's metrics CSV)."""

    __tablename__ = "file"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    examples: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # expires_after at upload: the reaper deletes the file (row and blob) once this passes, unless
    # an unfinished job or evaluation still reads it. None: kept until deleted.
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
