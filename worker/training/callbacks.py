"""The Trainer callbacks that connect a training run to TrainingHooks.

ProgressEvents turns the Trainer's logs into metrics events. BestValidation follows the
validation loss: the best evaluation and its adapter weights, and early stopping. StopAndCheckpoint
polls hooks.should_stop() after every optimizer step and decides which steps write a checkpoint and
which checkpoints are handed to hooks.on_checkpoint; the two are one callback because a pause
is both (it stops, and it checkpoints first). All run after the Trainer's DefaultFlowCallback,
so their control flags win.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from worker import metrics
from worker.training.distributed import agree
from worker.training.hooks import CostLimits, Stopped, TrainingHooks

# What a DPO job logs beside its loss (worker.training.dpo), as TRL names it; validation logs prefix "eval_".
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

_STOP_LINES = {"cancel": "Stop requested", "pause": "Pause requested", "shutdown": "Worker shutting down"}


class StepAbandoned(Exception):
    """Raised between the rows of a step that StopAndCheckpoint.abandon_step ended (a cancel or a
    passed cost limit); the recipe catches it, the step's partial gradients are dropped."""


def last_logged(log_history: list[dict[str, float]], key: str) -> float | None:
    """The latest value of `key` in the Trainer's log history (state.log_history), or None."""
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


class ProgressEvents(TrainerCallback):
    """Forwards training and validation losses to hooks.on_event as metrics events.

    Token counts come from the Trainer's own non-padding counter
    (state.num_input_tokens_seen, the sum of attention masks), which is also
    saved in checkpoints and so survives a resume. The token rate covers
    training steps only: evaluations and epoch-end checkpointing are left out.
    """

    def __init__(self, hooks: TrainingHooks):
        self.hooks = hooks
        self._start_time = self._last_time = 0.0
        self._start_step = self._last_step = 0
        self._last_tokens = 0
        self._epoch_ended_at: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = self._last_time = time.perf_counter()
        self._start_step = self._last_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        if self._epoch_ended_at is not None:
            # Leave epoch-end evaluation and checkpointing out of the training token rate.
            self._last_time += time.perf_counter() - self._epoch_ended_at
            self._epoch_ended_at = None

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch_ended_at = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._epoch_ended_at is None:
            # An evaluation between steps (training.eval_every_steps): leave it out of the token rate too.
            self._last_time += (metrics or {}).get("eval_runtime", 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            line = f"Step {state.global_step}/{state.max_steps}: training loss {logs['loss']:.4f}"
            self.hooks.on_event("metrics", line + _rewards_line(logs, ""), self._train_metrics(state, logs))
        elif "eval_loss" in logs:
            data = {"valid_loss": logs["eval_loss"], "step": state.global_step,
                    **{f"valid_{key}": logs[f"eval_{key}"] for key in REWARD_METRICS if f"eval_{key}" in logs}}
            if "eval_mean_token_accuracy" in logs:
                data["valid_mean_token_accuracy"] = logs["eval_mean_token_accuracy"]
            line = f"Step {state.global_step}: validation loss {logs['eval_loss']:.4f}"
            self.hooks.on_event("metrics", line + _rewards_line(logs, "eval_"), data)

    def _train_metrics(self, state, logs: dict[str, float]) -> dict[str, Any]:
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        interval = now - self._last_time
        steps_done = state.global_step - self._start_step
        seconds_per_step = (now - self._start_time) / steps_done if steps_done else 0.0
        data = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch,
            # OpenAI's name, and the one this service had before it (clients may read either).
            "train_loss": logs["loss"],
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_second": (tokens - self._last_tokens) / interval if interval > 0 else 0.0,
            "trained_tokens": tokens,
            "eta_seconds": seconds_per_step * max(state.max_steps - state.global_step, 0),
            **{key: logs[key] for key in REWARD_METRICS if key in logs},
        }
        if "mean_token_accuracy" in logs:  # a supervised job's (RowTrainer.log), over the same interval as the loss
            data["train_mean_token_accuracy"] = logs["mean_token_accuracy"]
        metrics.record_training_step(steps=state.global_step - self._last_step, seconds=interval,
                                     tokens=tokens - self._last_tokens, tokens_per_second=data["tokens_per_second"])
        self._last_time, self._last_tokens, self._last_step = now, tokens, state.global_step
        return data


def _rewards_line(logs: dict[str, float], prefix: str) -> str:
    """", reward margin M, accuracy A" for a DPO log entry; "" for others."""
    margin, accuracy = logs.get(f"{prefix}rewards/margins"), logs.get(f"{prefix}rewards/accuracies")
    if margin is None or accuracy is None:
        return ""
    return f", reward margin {margin:.4f}, accuracy {accuracy:.2f}"


class BestValidation(TrainerCallback):
    """Follows the validation loss over a run's evaluations: the best one, and early stopping.

    best_step and best_loss are the evaluation with the lowest finite validation loss so far; with
    keep_weights, the adapter's trainable tensors at that step are copied to CPU memory (the LoRA
    weights: a few MB) and restore_best() puts them back into the model. With patience, training
    stops after that many evaluations in a row that do not lower the best loss by at least
    min_delta (a non-finite loss never does); stopped_at_step is then the step it stopped at. The
    Trainer evaluates before it saves at the same step, so a checkpoint written there sees this
    evaluation; each checkpoint gets the tracker's state (STATE_FILE, WEIGHTS_FILE), and load()
    reads it back from the checkpoint a run resumes from, so the best is that of the whole run.
    Must come before StopAndCheckpoint among the callbacks: that one hands the checkpoint over
    (and deletes it) in its own on_save.
    """

    STATE_FILE = "best_validation.json"
    WEIGHTS_FILE = "best_adapter.safetensors"

    def __init__(self, hooks: TrainingHooks, model: torch.nn.Module, *, patience: int | None, min_delta: float,
                 keep_weights: bool):
        self.hooks, self.model = hooks, model
        self.patience, self.min_delta, self.keep_weights = patience, min_delta, keep_weights
        self.best_step: int | None = None
        self.best_loss: float | None = None
        self.evaluations_without_improvement = 0
        self.stopped_at_step: int | None = None
        self._weights: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.stopped_at_step is not None:
            # Resumed from the checkpoint of the step an early stop ended the run at: nothing more to train.
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        finite = math.isfinite(loss)
        improved = finite and (self.best_loss is None or loss < self.best_loss - self.min_delta)
        if finite and (self.best_loss is None or loss < self.best_loss):
            self.best_step, self.best_loss = state.global_step, float(loss)
            if self.keep_weights:
                self._weights = {name: p.detach().to("cpu", copy=True)
                                 for name, p in self.model.named_parameters() if p.requires_grad}
        self.evaluations_without_improvement = 0 if improved else self.evaluations_without_improvement + 1
        if self.patience is None or self.evaluations_without_improvement < self.patience:
            return
        control.should_training_stop = True
        # At the schedule's last step there is nothing left to stop. A pause or shutdown at this very
        # step still records the stop, so the resumed run ends at once, as this one would have.
        if self.stopped_at_step is None and state.global_step < state.max_steps:
            self.stopped_at_step = state.global_step
            best = f"{self.best_loss:.4f} at step {self.best_step}" if self.best_step is not None else "none yet"
            self.hooks.on_event(
                "message",
                f"Early stopping at step {state.global_step}: {self.evaluations_without_improvement} evaluation(s) "
                f"in a row did not lower the best validation loss ({best}) by at least {self.min_delta} "
                f"(training.early_stopping_patience {self.patience})",
                {"step": state.global_step, "valid_loss": loss, "best_step": self.best_step,
                 "best_valid_loss": self.best_loss, "patience": self.patience, "min_delta": self.min_delta})

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at_step is not None:
            # The step that stopped was just evaluated (and checkpointed when due); the epoch's end adds nothing.
            control.should_evaluate = False
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not path.is_dir():
            return
        (path / self.STATE_FILE).write_text(json.dumps({
            "best_step": self.best_step, "best_valid_loss": self.best_loss,
            "evaluations_without_improvement": self.evaluations_without_improvement,
            "stopped_at_step": self.stopped_at_step,
        }))
        if self._weights is not None:
            save_file(self._weights, str(path / self.WEIGHTS_FILE))

    def load(self, checkpoint: Path) -> None:
        """Take over the state saved with a checkpoint; a checkpoint without one leaves a fresh tracker.

        Where the best weights should have been kept and were not saved, the best step is not
        taken over (its weights are unknown), only the count toward early stopping.
        """
        state_file = Path(checkpoint) / self.STATE_FILE
        if not state_file.is_file():
            return
        saved = json.loads(state_file.read_text())
        self.evaluations_without_improvement = int(saved.get("evaluations_without_improvement") or 0)
        self.stopped_at_step = saved.get("stopped_at_step")
        weights_file = Path(checkpoint) / self.WEIGHTS_FILE
        if self.keep_weights and not weights_file.is_file():
            return
        self.best_step, self.best_loss = saved.get("best_step"), saved.get("best_valid_loss")
        if self.keep_weights:
            self._weights = load_file(str(weights_file))

    def restore_best(self) -> bool:
        """Copy the best evaluation's weights back into the model; False when none were kept."""
        if self._weights is None:
            return False
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in self._weights.items():
                params[name].copy_(tensor.to(params[name].device))
        return True


class StopAndCheckpoint(TrainerCallback):
    """Stops training when hooks.should_stop() says so, and decides when to checkpoint.

    Checkpoints: with every_steps, at each multiple of it (overriding the
    Trainer's own end-of-training save) and handed to hooks.on_checkpoint;
    without, at epoch ends (the Trainer's save_strategy) and kept local. A
    "pause" or "shutdown" stop writes one at that step and hands it over too;
    a "cancel" stop writes none. A checkpoint due at an epoch's last step is
    written at the epoch's end, after that epoch's validation. Between
    micro-batches (abandon_step) a cancel or a passed cost limit ("limit",
    limit_message says which) ends training in mid-step, with no checkpoint.
    reason: why training stopped early, None while it has not.

    In data-parallel training every rank must leave the loop at the same step, so each decision
    (after every micro-batch and every step) is rank 0's, broadcast to the others (distributed.agree):
    only rank 0 has the job's hooks and limits. Only rank 0 hands checkpoints over.
    """

    def __init__(self, hooks: TrainingHooks, every_steps: int | None = None, limits: CostLimits | None = None):
        self.hooks = hooks
        self.every_steps = every_steps
        self.limits = limits or CostLimits()
        self.reason: Stopped | None = None
        self.limit_message: str | None = None
        self._began = time.monotonic()
        self._save_at_epoch_end = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._began = time.monotonic()

    def on_substep_end(self, args, state, control, **kwargs):
        abandon, self.reason, self.limit_message = agree((self.abandon_step(state), self.reason,
                                                          self.limit_message))
        if abandon:
            control.should_training_stop = True
            control.should_save = False

    def abandon_step(self, state) -> bool:
        """Whether the step in progress should be given up now: the run passed a cost limit, or
        hooks.cancel_requested(). A pause or shutdown waits for the step's end, where the
        checkpoint it writes holds a whole step (resume stays exact)."""
        if self.reason is not None:
            return self.reason in ("cancel", "limit")
        if self._passed_limit(state):
            return True
        asked = getattr(self.hooks, "cancel_requested", None)
        if asked is None or not asked():
            return False
        self.reason = "cancel"
        self.hooks.on_event("message", f"Stop requested; step {state.global_step + 1} is abandoned in mid-step and "
                                       f"training stops at step {state.global_step}", None)
        return True

    def _passed_limit(self, state) -> bool:
        tokens, seconds, limits = state.num_input_tokens_seen, time.monotonic() - self._began, self.limits
        if limits.trained_tokens is not None and tokens > limits.trained_tokens:
            self.limit_message = (f"the job trained on {tokens:,} tokens, past its limit of {limits.trained_tokens:,} "
                                  "tokens per job")
        elif limits.wall_seconds is not None and seconds > limits.wall_seconds:
            self.limit_message = (f"the job trained for {seconds:,.0f} s, past its limit of "
                                  f"{limits.wall_seconds:,.0f} s per run")
        else:
            return False
        self.reason = "limit"
        self.hooks.on_event("message", f"Cost limit passed: {self.limit_message}; training stops at step "
                                       f"{state.global_step}", None)
        return True

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_steps is not None:
            control.should_save = state.global_step % self.every_steps == 0
        if self.reason is None:
            self._check_stop(state, control)
        (self.reason, self.limit_message, control.should_training_stop, control.should_save) = agree(
            (self.reason, self.limit_message, control.should_training_stop, control.should_save))
        # At an epoch's last step the Trainer evaluates only after this step's save. A checkpoint
        # written there would miss the epoch's validation, and a run resumed from it (the epoch
        # counted as done) would never run it: the save waits for the epoch's end, after it.
        self._save_at_epoch_end = bool(control.should_save and args.eval_strategy == "epoch"
                                       and float(state.epoch or 0).is_integer())
        if self._save_at_epoch_end:
            control.should_save = False

    def _check_stop(self, state, control) -> None:
        """At a step's end: stop for a passed cost limit (no checkpoint), or for hooks.should_stop()."""
        if self._passed_limit(state):
            control.should_training_stop = True
            control.should_save = False
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
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            control.should_save = True
        elif self.reason is not None:
            # The Trainer still evaluates and checkpoints at the end of the epoch it was stopped
            # in; a job stopped in mid-epoch needs neither (a pause already saved at its step).
            control.should_evaluate = False
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return  # the other ranks' checkpoints are rank 0's (RowTrainer writes their RNG states there)
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
        for key in REWARD_METRICS:
            for logged, name in ((key, key), (f"eval_{key}", f"valid_{key}")):
                value = last_logged(state.log_history, logged)
                if value is not None:
                    metrics[name] = value
        for logged, name in (("mean_token_accuracy", "train_mean_token_accuracy"),
                             ("eval_mean_token_accuracy", "valid_mean_token_accuracy")):
            value = last_logged(state.log_history, logged)
            if value is not None:
                metrics[name] = value
        self.hooks.on_checkpoint(step, path, metrics)
        # Handed over (uploaded): the local copy only takes disk space from here on.
        shutil.rmtree(path, ignore_errors=True)
