from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow
from app.core.leases import LeaseColumns


class Evaluation(LeaseColumns, Base):
    """pass@k of one model (a base, or a base + adapter) on code tasks, or of completions a team brought.
    A job's evaluations carry its id and a role (roles.EvaluationRole). Status is an EvaluationStatus;
    workers hold a running evaluation under a lease, as they hold jobs (LeaseColumns): the reaper
    requeues or fails a running evaluation whose lease expired, and queued evaluations whose message
    may be lost are re-sent, at most once per redispatch interval."""

    __tablename__ = "evaluation"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("fine_tuning_job.id", ondelete="CASCADE"), index=True)
    role: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(32), index=True)
    # What the API asked of a running evaluation's lease holder: "cancel", or None.
    stop_request: Mapped[str | None] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(255))
    base_model: Mapped[str | None] = mapped_column(ForeignKey("base_model.id"))
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapter.id", ondelete="SET NULL"))
    tasks: Mapped[str] = mapped_column(String(64))
    completions_file: Mapped[str | None] = mapped_column(String(40))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    results_key: Mapped[str | None] = mapped_column(String(512))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
