"""The webhook event types: a job's and an evaluation's final states. The job ones are OpenAI's
names; the evaluation ones follow them with Tuneforge's object name."""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    JOB_SUCCEEDED = "fine_tuning.job.succeeded"
    JOB_FAILED = "fine_tuning.job.failed"
    JOB_CANCELLED = "fine_tuning.job.cancelled"
    EVALUATION_SUCCEEDED = "evaluation.succeeded"
    EVALUATION_FAILED = "evaluation.failed"
    EVALUATION_CANCELLED = "evaluation.cancelled"


# A final status (the same three words for jobs and evaluations) -> its event type.
JOB_EVENTS = {"succeeded": EventType.JOB_SUCCEEDED, "failed": EventType.JOB_FAILED,
              "cancelled": EventType.JOB_CANCELLED}
EVALUATION_EVENTS = {"succeeded": EventType.EVALUATION_SUCCEEDED, "failed": EventType.EVALUATION_FAILED,
                     "cancelled": EventType.EVALUATION_CANCELLED}


class DeliveryStatus(StrEnum):
    """webhook_delivery.status: pending (an attempt is due, or running), then delivered or failed
    (every attempt used)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
