"""An upload's states: pending -> completed | cancelled | expired, OpenAI's four names."""

from __future__ import annotations

from enum import StrEnum


class UploadStatus(StrEnum):
    """upload.status. Only a pending upload takes parts, completes or cancels; the other three are final."""

    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
