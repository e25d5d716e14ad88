from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class InferenceEndpoint(Base):
    """A running `tuneforge inference` process: the base model it serves and the URL the API
    forwards to. The process writes its row at start and refreshes heartbeat_at while it runs;
    a row whose heartbeat is stale is ignored (the process died without removing it)."""

    __tablename__ = "inference_endpoint"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    base_model: Mapped[str] = mapped_column(ForeignKey("base_model.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(512), unique=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
