from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


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
