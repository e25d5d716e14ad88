from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class QuotaItem(BaseModel):
    limit: int
    usage: int


class QuotaRead(BaseModel):
    """The calling team's limits (its overrides, else the defaults) and what it uses now."""

    object: Literal["quota"] = "quota"
    running_jobs: QuotaItem
    queued_jobs: QuotaItem
    storage_bytes: QuotaItem
    files: QuotaItem
    rate_limit_per_second: float
    rate_limit_burst: int
    trained_tokens_per_job: int = Field(description="Tokens one job may train on, epochs included.")
    job_wall_seconds: int = Field(description="Wall time one run of a job may train.")
    evaluation_wall_seconds: int = Field(description="Wall time one evaluation may run.")
