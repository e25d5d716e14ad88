from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow
from app.core.leases import LeaseColumns


class FineTuningJob(LeaseColumns, Base):
    """A job's truth. Celery carries only its id; status (a JobStatus) moves only through
    jobs.states.transition. The lease columns (attempts, lease_token, lease_expires_at,
    enqueued_at) come from LeaseColumns: a running job has one holder, the worker that claimed it."""

    __tablename__ = "fine_tuning_job"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(ForeignKey("base_model.id"))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(32), index=True)
    # The validated, frozen TrainingSpec (app.domains.jobs.spec) the worker trains with.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    # Ids of the files (purpose fine-tune-results) written when training ended: the metrics CSV.
    result_files: Mapped[list[str] | None] = mapped_column(JSON)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    # auto_iterate: later rounds are child jobs of the job the user submitted (round 1).
    parent_job_id: Mapped[str | None] = mapped_column(ForeignKey("fine_tuning_job.id", ondelete="SET NULL"), index=True)
    round: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # A StopRequest ("cancel" or "pause"), asked by the API of a running job; the lease holder acts on it.
    stop_request: Mapped[str | None] = mapped_column(String(16))
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    estimated_finish: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class FineTuningJobEvent(Base):
    __tablename__ = "fine_tuning_job_event"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_job.id", ondelete="CASCADE"), index=True)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
