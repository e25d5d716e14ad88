from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class Upload(Base):
    """A file sent in parts (OpenAI's Upload). Its parts' blobs live until it completes (they become
    one File), is cancelled or expires; then they are deleted and only this row stays."""

    __tablename__ = "upload"
    # The reaper's scan: pending uploads by expiry.
    __table_args__ = (Index("ix_upload_status_expires_at", "status", "expires_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)  # what the assembled file must hold
    mime_type: Mapped[str] = mapped_column(String(255))
    # expires_after of the File it becomes (seconds after that File's creation); None: kept until deleted.
    file_expires_after_seconds: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # UploadStatus
    file_id: Mapped[str | None] = mapped_column(ForeignKey("file.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class UploadPart(Base):
    """One part's bytes in storage; rows exist only while their upload is pending."""

    __tablename__ = "upload_part"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("upload.id", ondelete="CASCADE"), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
