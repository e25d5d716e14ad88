"""An evaluation's states: queued -> running -> succeeded | failed | cancelled (running -> queued
when the reaper takes back an expired lease). A queued one is cancelled at once; a running one is
asked through stop_request, and its worker stops at its next batch or program and records it."""

from __future__ import annotations

from enum import StrEnum


class EvaluationStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# stop_request's one value: what the API asked of a running evaluation's lease holder.
CANCEL_REQUEST = "cancel"
