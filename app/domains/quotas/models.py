from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Integer
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base


class TeamQuota(Base):
    """A team's overrides of the quota and rate-limit defaults in settings; NULL keeps the default."""

    __tablename__ = "team_quota"

    team_id: Mapped[str] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), primary_key=True)
    running_jobs: Mapped[int | None] = mapped_column(Integer)
    queued_jobs: Mapped[int | None] = mapped_column(Integer)
    storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    files: Mapped[int | None] = mapped_column(Integer)
    rate_per_second: Mapped[float | None] = mapped_column(Float)
    rate_burst: Mapped[int | None] = mapped_column(Integer)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    job_wall_seconds: Mapped[int | None] = mapped_column(Integer)
    evaluation_wall_seconds: Mapped[int | None] = mapped_column(Integer)
