"""The recipe's only channel to the outside world while it trains.

Kept free of torch so that the task wrapper (which writes events to Postgres,
reads the job's cancel and pause requests and uploads checkpoints) can
implement it without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

EventType = Literal["message", "metrics"]
# Why training should stop: the user cancelled (no checkpoint), paused the job
# or the worker is shutting down (both checkpoint first, so the job can resume).
StopReason = Literal["cancel", "pause", "shutdown"]
# Why training stopped early: a stop reason, or "limit": the run passed one of its CostLimits.
Stopped = Literal["cancel", "pause", "shutdown", "limit"]


@dataclass(frozen=True)
class CostLimits:
    """What one run of the recipe may spend; None: no limit. trained_tokens counts the job's input
    tokens (state.num_input_tokens_seen, resumed runs included), wall_seconds this run's training
    time. Checked after every micro-batch (and between the rows of a CPU step, for the time):
    passing one stops training without a checkpoint."""

    trained_tokens: int | None = None
    wall_seconds: float | None = None


class TrainingHooks(Protocol):
    """Implemented by the caller of LoraRecipe.

    Every method is called from the training thread, between optimizer steps;
    they should return quickly (a short database write, a flag read) because the
    trainer waits for them, except on_checkpoint, which uploads. An exception
    raised by any of them aborts training.
    """

    def on_event(self, type: EventType, message: str, data: dict[str, Any] | None) -> None:
        """Record one job event.

        type "message": a human-readable line (data may be None).
        type "metrics": data holds numbers, either a training log
        {step, total_steps, epoch, train_loss, loss (the same value), learning_rate,
        tokens_per_second, trained_tokens, eta_seconds} or a validation result {valid_loss, step}.
        """

    def should_stop(self) -> StopReason | None:
        """Polled after every optimizer step; a reason stops training after that step, None continues.

        "pause" and "shutdown" write a checkpoint at that step first (passed to
        on_checkpoint); "cancel" stops without one. Truthy means stop, so
        callers that treat the answer as a bool keep working.
        """

    def cancel_requested(self) -> bool:
        """Polled between the micro-batches of a step (and between the rows of a CPU step); True
        abandons the step in progress: its partial gradients are dropped and no checkpoint is
        written, so a resumed run starts that step over. Optional: hooks without it are asked
        should_stop() at step ends only. A pause or shutdown waits for the step's end."""

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Called after a complete checkpoint directory was written at path for global step `step`.

        The callee uploads it (worker.training.checkpoint_store.upload); the recipe may
        delete the directory once this returns. metrics: {step, train_loss,
        valid_loss?} as known at that step (the step's own validation loss when it
        was evaluated there: evaluation runs before the checkpoint is written). Only called when the spec asks for
        checkpoints (training.checkpoint_every_steps) or on a pause/shutdown stop.
        """
