"""The recipe's only channel to the outside world while it trains.

Kept free of torch so that the task wrapper (which writes events to Postgres and
reads the job's cancel flag) can implement it without importing the trainer.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

EventType = Literal["message", "metrics"]


class TrainingHooks(Protocol):
    """Implemented by the caller of LoraRecipe.

    Both methods are called from the training thread, between optimizer steps;
    they should return quickly (a short database write, a flag read) because the
    trainer waits for them. An exception raised by either aborts training.
    """

    def on_event(self, type: EventType, message: str, data: dict[str, Any] | None) -> None:
        """Record one job event.

        type "message": a human-readable line (data may be None).
        type "metrics": data holds numbers, either a training log
        {step, total_steps, epoch, loss, learning_rate, tokens_per_second,
        trained_tokens, eta_seconds} or a validation result {valid_loss, step}.
        """

    def should_stop(self) -> bool:
        """Polled after every optimizer step; True stops training after that step (user cancel)."""
