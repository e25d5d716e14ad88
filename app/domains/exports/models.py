from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow
from app.core.leases import LeaseColumns


class AdapterExport(LeaseColumns, Base):
    """An adapter written out as another artifact: merged safetensors or a GGUF file. Status is an
    ExportStatus; a worker holds a running export under a lease (LeaseColumns), as it holds jobs.
    `precision` is the merged dtype (bfloat16, ...) or the GGUF quantization (f16, q8_0). The blob
    lives under the adapter's storage prefix, so deleting the adapter deletes its exports too; its
    bytes count toward the team's storage quota once it has succeeded."""

    __tablename__ = "adapter_export"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapter.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(16))
    precision: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    storage_key: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
