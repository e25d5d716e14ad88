from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class CheckpointMetrics(BaseModel):
    """OpenAI's checkpoint metrics. Tuneforge fills step, train_loss and, once the job has a validation loss (a
    validation_file or training.validation_split), valid_loss: that of the checkpoint's own step when it was
    evaluated there (a checkpoint is written after the same step's evaluation), else the latest before it."""

    model_config = ConfigDict(extra="allow")

    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class CheckpointRead(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointRead]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
