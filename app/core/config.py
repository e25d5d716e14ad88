"""Settings: one pydantic-settings class, prefix TUNEFORGE_, read once.

With no database or broker URL set, Tuneforge runs on one machine with nothing
installed: SQLite in the data dir and kombu's filesystem transport as the broker
(it works across processes on one host). Production sets both URLs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class QuotaDefaults(BaseModel):
    """Per-team limits; a team's row in team_quota overrides each one (`tuneforge admin set-quota`)."""

    model_config = ConfigDict(frozen=True)

    running_jobs: int = Field(default=4, ge=0, description="Jobs of one team training at once.")
    queued_jobs: int = Field(default=100, ge=0, description="Jobs of one team waiting to start.")
    storage_bytes: int = Field(default=50 * 1024**3, ge=0, description="Total size of a team's files.")
    files: int = Field(default=10_000, ge=0, description="Number of a team's files.")


class RateLimitSettings(BaseModel):
    """Token bucket per API key: `burst` requests at once, refilled at `per_second`. Shared across
    API processes through Redis when the broker is Redis, per process otherwise."""

    model_config = ConfigDict(frozen=True)

    per_second: float = Field(default=200.0, gt=0)
    burst: int = Field(default=2000, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEFORGE_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    data_dir: Path = Field(default=Path(".tuneforge"), description="Root of storage, SQLite and the embedded broker.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in data_dir when unset.")
    broker_url: str | None = Field(default=None,
                                   description="Celery broker URL; filesystem broker in data_dir when unset.")

    upload_max_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="Largest accepted upload, in bytes.")
    upload_max_line_bytes: int = Field(default=8 * 1024 * 1024, gt=0, description="Longest accepted JSONL line.")
    upload_max_errors: int = Field(default=10, gt=0, description="How many line errors a refused upload reports.")
    request_max_bytes: int = Field(default=1024 * 1024, gt=0, description=(
        "Largest request body of every route except uploads (JSON), in bytes; enforced on the raw stream."))

    training_queue: str = Field(default="training", min_length=1)
    evaluation_queue: str = Field(default="evaluation", min_length=1,
                                  description="Queue of the CPU workers that run model-written code.")
    allow_weak_sandbox: bool = Field(default=False, description=(
        "Run evaluations without bubblewrap (resource limits only) where it cannot start. Off: refuse."))
    worker_heartbeat_seconds: float = Field(default=2.0, gt=0)
    # How long a queued job may wait undelivered before a worker re-dispatches it
    # (covers an enqueue that failed after the job's row was committed).
    redispatch_after_seconds: float = Field(default=30.0, gt=0)
    # Leases (README, "Leases and recovery"): a running job's worker renews its lease every
    # worker_heartbeat_seconds; the reaper requeues a job whose lease is lease_seconds stale.
    lease_seconds: float = Field(default=30.0, gt=0, description="How long a running job's lease lasts unrenewed.")
    reaper_interval_seconds: float = Field(default=5.0, gt=0, description="How often each worker reaps expired leases.")
    max_attempts: int = Field(default=3, ge=1, description="Claims of a job whose worker died before it is failed.")
    visibility_timeout_seconds: int = Field(default=6 * 3600, gt=0, description=(
        "Redis redelivers an unacknowledged message after this long; leases, not this, recover jobs."))
    stop_wait_seconds: float = Field(default=5.0, ge=0, description=(
        "How long cancel/pause of a running job waits for its worker to act before answering."))

    quotas: QuotaDefaults = Field(default_factory=QuotaDefaults)  # TUNEFORGE_QUOTAS__STORAGE_BYTES, ...
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)  # TUNEFORGE_RATE_LIMIT__PER_SECOND

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'tuneforge.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_transport_options(self) -> dict:
        if self.broker_url:
            return {}
        folder = self.data_dir / "broker"
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # kombu's default control folder is relative to the working directory.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
