"""Settings: one pydantic-settings class, prefix TUNEFORGE_, read once.

With no database or broker URL set, Tuneforge runs on one machine with nothing
installed: SQLite in the data dir and kombu's filesystem transport as the broker
(it works across processes on one host). Production sets both URLs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEFORGE_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    data_dir: Path = Field(default=Path(".tuneforge"), description="Root of storage, SQLite and the embedded broker.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in data_dir when unset.")
    broker_url: str | None = Field(default=None, description="Celery broker URL; filesystem broker in data_dir when unset.")

    upload_max_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="Largest accepted upload, in bytes.")
    upload_max_line_bytes: int = Field(default=8 * 1024 * 1024, gt=0, description="Longest accepted JSONL line.")
    upload_max_errors: int = Field(default=10, gt=0, description="How many line errors a refused upload reports.")

    training_queue: str = Field(default="training", min_length=1)
    evaluation_queue: str = Field(default="evaluation", min_length=1,
                                  description="Queue of the CPU workers that run model-written code.")
    allow_weak_sandbox: bool = Field(default=False, description=(
        "Run evaluations without bubblewrap (resource limits only) where it cannot start. Off: refuse."))
    worker_heartbeat_seconds: float = Field(default=2.0, gt=0)
    # How long a queued job may wait undelivered before a worker re-dispatches it
    # (covers an enqueue that failed after the job's row was committed).
    redispatch_after_seconds: float = Field(default=30.0, gt=0)

    admin_token: SecretStr | None = Field(default=None, description="Reserved for operator routes.")

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
