"""The Trainer callbacks that connect a training run to TrainingHooks.

ProgressEvents turns the Trainer's logs into metrics events. StopAndCheckpoint polls
hooks.should_stop() after every optimizer step and decides which steps write a checkpoint and
which checkpoints are handed to hooks.on_checkpoint; the two are one callback because a pause
is both (it stops, and it checkpoints first). Both run after the Trainer's DefaultFlowCallback,
so their control flags win.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from worker.training.hooks import StopReason, TrainingHooks

_STOP_LINES = {"cancel": "Stop requested", "pause": "Pause requested", "shutdown": "Worker shutting down"}


def last_logged(log_history: list[dict[str, float]], key: str) -> float | None:
    """The latest value of `key` in the Trainer's log history (state.log_history), or None."""
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


class ProgressEvents(TrainerCallback):
    """Forwards training and validation losses to hooks.on_event as metrics events.

    Token counts come from the Trainer's own non-padding counter
    (state.num_input_tokens_seen, the sum of attention masks), which is also
    saved in checkpoints and so survives a resume. The token rate covers
    training steps only: epoch-end evaluation and checkpointing are left out.
    """

    def __init__(self, hooks: TrainingHooks):
        self.hooks = hooks
        self._start_time = self._last_time = 0.0
        self._start_step = 0
        self._last_tokens = 0
        self._epoch_ended_at: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = self._last_time = time.perf_counter()
        self._start_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        if self._epoch_ended_at is not None:
            # Leave epoch-end evaluation and checkpointing out of the training token rate.
            self._last_time += time.perf_counter() - self._epoch_ended_at
            self._epoch_ended_at = None

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch_ended_at = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            line = f"Step {state.global_step}/{state.max_steps}: training loss {logs['loss']:.4f}"
            self.hooks.on_event("metrics", line, self._train_metrics(state, logs))
        elif "eval_loss" in logs:
            data = {"valid_loss": logs["eval_loss"], "step": state.global_step}
            self.hooks.on_event("metrics", f"Step {state.global_step}: validation loss {logs['eval_loss']:.4f}", data)

    def _train_metrics(self, state, logs: dict[str, float]) -> dict[str, Any]:
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        interval = now - self._last_time
        steps_done = state.global_step - self._start_step
        seconds_per_step = (now - self._start_time) / steps_done if steps_done else 0.0
        data = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_second": (tokens - self._last_tokens) / interval if interval > 0 else 0.0,
            "trained_tokens": tokens,
            "eta_seconds": seconds_per_step * max(state.max_steps - state.global_step, 0),
        }
        self._last_time, self._last_tokens = now, tokens
        return data


class StopAndCheckpoint(TrainerCallback):
    """Stops training when hooks.should_stop() says so, and decides when to checkpoint.

    Checkpoints: with every_steps, at each multiple of it (overriding the
    Trainer's own end-of-training save) and handed to hooks.on_checkpoint;
    without, at epoch ends (the Trainer's save_strategy) and kept local. A
    "pause" or "shutdown" stop writes one at that step and hands it over too;
    a "cancel" stop writes none. reason: why training stopped early, None
    while it has not.
    """

    def __init__(self, hooks: TrainingHooks, every_steps: int | None = None):
        self.hooks = hooks
        self.every_steps = every_steps
        self.reason: StopReason | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_steps is not None:
            control.should_save = state.global_step % self.every_steps == 0
        if self.reason is not None:
            return
        reason = self.hooks.should_stop()
        if not reason:
            return
        # Callers that answer with a bool only knew cancellation.
        self.reason = reason if reason in ("pause", "shutdown") else "cancel"
        control.should_training_stop = True
        control.should_save = self.reason != "cancel"
        self.hooks.on_event("message", f"{_STOP_LINES[self.reason]}; training stops at step {state.global_step}",
                            None)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.reason is not None:
            # The Trainer still evaluates and checkpoints at the end of the epoch it was
            # stopped in; a stopped job needs neither (a pause already saved at its step).
            control.should_evaluate = False
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        self.hooks.on_event("message", f"Checkpoint saved at step {step}", {"step": step})
        if self.every_steps is None and self.reason not in ("pause", "shutdown"):
            return
        path = Path(args.output_dir) / f"checkpoint-{step}"
        # The pickled TrainingArguments: never read on resume (the spec rebuilds them), so never shipped.
        (path / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        metrics: dict[str, Any] = {"step": step, "train_loss": last_logged(state.log_history, "loss")}
        valid_loss = last_logged(state.log_history, "eval_loss")
        if valid_loss is not None:
            metrics["valid_loss"] = valid_loss
        self.hooks.on_checkpoint(step, path, metrics)
        # Handed over (uploaded): the local copy only takes disk space from here on.
        shutil.rmtree(path, ignore_errors=True)
