from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class Adapter(Base):
    """A LoRA adapter a job produced: a peft directory plus a .tar.gz of it in storage."""

    __tablename__ = "adapter"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("fine_tuning_job.id", ondelete="SET NULL"), unique=True)
    base_model: Mapped[str] = mapped_column(ForeignKey("base_model.id"))
    name: Mapped[str] = mapped_column(String(255), unique=True)
    storage_prefix: Mapped[str] = mapped_column(String(512))
    archive_key: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
