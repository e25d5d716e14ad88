"""An evaluation's states: queued -> running -> succeeded | failed (running -> queued when the
reaper takes back an expired lease)."""

from __future__ import annotations

from enum import StrEnum


class EvaluationStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
