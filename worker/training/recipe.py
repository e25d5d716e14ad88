"""The LoRA / QLoRA training recipe: setup -> train -> save -> cleanup (paper steps 1-6, 8).

The spec is the whole configuration; nothing here reads the environment. The
caller (the jobs.train task) owns the job's state: it passes in local files and
a work folder, receives progress through TrainingHooks, and records the result.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from app.domains.jobs.spec import TrainingSpec
from worker.training.data import CausalLMCollator, TokenizedExamples, load_examples
from worker.training.hooks import TrainingHooks
from worker.training.model import Device, load_base_model, select_device

# bitsandbytes optimizers need CUDA; this is what CPU runs use instead.
_CPU_OPTIMIZER = "adamw_torch"


@dataclass(frozen=True)
class TrainResult:
    """What one train() call did.

    final_loss is the last logged training loss (None when no step was logged);
    valid_loss the last validation loss (None without a validation file or
    when no epoch ended). tokens_per_second counts real (non-pad) tokens over
    wall_seconds, which include epoch-end evaluation and checkpoint writes
    (the metrics events' rate covers training steps only). peak_memory_bytes is CUDA's max allocated memory on GPU and
    the process's peak RSS on CPU.
    """

    steps: int
    total_steps: int
    trained_tokens: int
    final_loss: float | None
    valid_loss: float | None
    tokens_per_second: float
    wall_seconds: float
    peak_memory_bytes: int
    device: str
    precision: str
    quantization: str
    stopped_early: bool


class _HooksCallback(TrainerCallback):
    """Forwards the Trainer's logs, saves and stop checks to TrainingHooks.

    Token counts come from the Trainer's own non-padding counter
    (state.num_input_tokens_seen, the sum of attention masks), which is also
    saved in checkpoints and so survives a resume.
    """

    def __init__(self, hooks: TrainingHooks):
        self.hooks = hooks
        self.stop_requested = False
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

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stop_requested and self.hooks.should_stop():
            self.stop_requested = True
            control.should_training_stop = True
            self.hooks.on_event("message", f"Stop requested; training stops at step {state.global_step}", None)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch_ended_at = time.perf_counter()
        if self.stop_requested:
            # The Trainer still evaluates and checkpoints at the end of the epoch
            # it was stopped in; a cancelled job needs neither, only a fast exit.
            control.should_evaluate = False
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        self.hooks.on_event("message", f"Checkpoint saved at step {state.global_step}", {"step": state.global_step})

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.hooks.on_event("metrics", _step_line(state.global_step, state.max_steps, logs["loss"]),
                                self._train_metrics(state, logs))
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


def _step_line(step: int, total: int, loss: float) -> str:
    return f"Step {step}/{total}: training loss {loss:.4f}"


def _optimizer_for(name: str, device: Device) -> tuple[str, str | None]:
    """(optimizer to use, message explaining a substitution or None)."""
    if device == "cpu" and name != _CPU_OPTIMIZER:
        return _CPU_OPTIMIZER, f"Optimizer {name} needs CUDA (bitsandbytes); using {_CPU_OPTIMIZER} on CPU"
    return name, None


def _peak_memory_bytes(device: Device) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024


def _last_logged(log_history: list[dict[str, float]], key: str) -> float | None:
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def _as_dataset(examples: TokenizedExamples) -> list[dict[str, list[int]]]:
    # A list of dicts is a map-style dataset for the Trainer; the collator pads per batch.
    return [{"input_ids": ids} for ids in examples.input_ids]


class LoraRecipe:
    """Fine-tunes a LoRA adapter on a local base model from a TrainingSpec.

    Lifecycle: setup() once, train() once, save() any number of times, then
    cleanup(). Checkpoints (adapter, optimizer, scheduler, RNG and trainer
    state, keeping spec.training.save_total_limit of them) are written at each
    epoch end under work_dir/checkpoints; the caller owns work_dir and deletes
    it. Progress and messages go to hooks; hooks.should_stop() is polled after
    every optimizer step. The instance is not thread-safe and not reusable
    after cleanup().
    """

    def __init__(
        self,
        *,
        spec: TrainingSpec,
        base_model_path: Path,
        train_file: Path,
        validation_file: Path | None,
        work_dir: Path,
        hooks: TrainingHooks,
    ):
        """Stores the inputs only; nothing is loaded until setup()."""
        self.spec = spec
        self.base_model_path = Path(base_model_path)
        self.train_file = Path(train_file)
        self.validation_file = Path(validation_file) if validation_file is not None else None
        self.work_dir = Path(work_dir)
        self.hooks = hooks
        self._device: Device = select_device()
        self._model: Any = None
        self._tokenizer: Any = None
        self._trainer: Trainer | None = None
        self._callback: _HooksCallback | None = None
        self._info: dict[str, Any] = {}

    def setup(self) -> None:
        """Seed, load base model + tokenizer, attach LoRA, tokenize the data, build the Trainer.

        Emits message events (device, quantization, optimizer, data sizes).
        Raises DataFormatError for a bad record (with file and line),
        ValueError for a file with no usable record or a LoRA target module
        the model lacks, OSError for a missing file or model folder.
        """
        set_seed(self.spec.seed)
        self._model, self._tokenizer, self._info = load_base_model(self.base_model_path, self.spec, self._device)
        self._announce_model()
        max_len = self.spec.training.max_seq_length
        train = load_examples(self.train_file, self._tokenizer, max_len)
        self._announce_data("Training", train, max_len)
        valid = None
        if self.validation_file is not None:
            valid = load_examples(self.validation_file, self._tokenizer, max_len)
            self._announce_data("Validation", valid, max_len)
        optim, note = _optimizer_for(self.spec.training.optimizer, self._device)
        if note:
            self.hooks.on_event("message", note, None)
        self._callback = _HooksCallback(self.hooks)
        self._trainer = Trainer(
            model=self._model,
            args=self._training_arguments(optim=optim, has_validation=valid is not None),
            data_collator=CausalLMCollator(self._tokenizer),
            train_dataset=_as_dataset(train),
            eval_dataset=_as_dataset(valid) if valid is not None else None,
            processing_class=self._tokenizer,
            callbacks=[self._callback],
        )
        # With tqdm disabled the Trainer prints every log dict to stdout; progress goes to hooks instead.
        self._trainer.remove_callback(PrinterCallback)

    def train(self) -> TrainResult:
        """Run training to the end of the schedule, or until hooks.should_stop().

        Emits metrics events at every logging step and epoch-end validation,
        and a message per checkpoint. Raises RuntimeError when setup() has not
        run; exceptions from the model or the hooks propagate (the job fails).
        """
        if self._trainer is None or self._callback is None:
            raise RuntimeError("call setup() before train()")
        if self._device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.hooks.on_event("message", "Training started", None)
        start = time.perf_counter()
        self._trainer.train()
        wall = time.perf_counter() - start
        result = self._result(wall)
        verb = "stopped early" if result.stopped_early else "finished"
        self.hooks.on_event("message", f"Training {verb} at step {result.steps} after {wall:.1f} s", None)
        return result

    def save(self, out_dir: Path) -> None:
        """Write the adapter (adapter_config.json, adapter_model.safetensors) and the
        tokenizer files (with its chat template) into out_dir, creating it.

        Overwrites files of the same names. Raises RuntimeError before setup() or after cleanup().
        """
        if self._model is None:
            raise RuntimeError("call setup() before save()")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._model.save_pretrained(out_dir, safe_serialization=True)
        self._tokenizer.save_pretrained(out_dir)

    def cleanup(self) -> None:
        """Release the model, optimizer and Trainer (and cached GPU memory). Idempotent.

        Files (checkpoints in work_dir, saved adapters) are left in place.
        """
        self._trainer = self._model = self._tokenizer = self._callback = None
        gc.collect()
        if self._device == "cuda":
            torch.cuda.empty_cache()

    def _training_arguments(self, *, optim: str, has_validation: bool) -> TrainingArguments:
        t = self.spec.training
        precision = self._info["precision"]
        on_cpu = self._device == "cpu"
        return TrainingArguments(
            output_dir=str(self.work_dir / "checkpoints"),
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps if t.max_steps is not None else -1,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            # transformers 5 has no warmup_ratio: a float below 1 here is a ratio of total steps.
            warmup_steps=float(t.warmup_ratio),
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim=optim,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=on_cpu,
            seed=self.spec.seed,
            data_seed=self.spec.seed,
            logging_strategy="steps",
            logging_steps=t.logging_steps,
            save_strategy="epoch",
            save_total_limit=t.save_total_limit,
            eval_strategy="epoch" if has_validation else "no",
            # Evaluation needs only the loss; otherwise the Trainer keeps every
            # batch's logits (batch x length x vocab floats) in memory.
            prediction_loss_only=True,
            include_num_input_tokens_seen="non_padding",
            # Length-grouped batches cut padding waste; with batch 1 there is none.
            train_sampling_strategy="group_by_length" if t.batch_size > 1 else "random",
            # Data is pre-tokenized in memory: worker processes would only add
            # start-up cost and compete for the CPU cores the model uses.
            dataloader_num_workers=0,
            dataloader_pin_memory=not on_cpu,
            report_to="none",
            disable_tqdm=True,
        )

    def _announce_model(self) -> None:
        info = self._info
        self.hooks.on_event(
            "message",
            f"Loaded base model on {info['device']} ({info['dtype']} weights, {info['precision']} training, "
            f"quantization {info['quantization']}); {info['trainable_parameters']:,} of "
            f"{info['total_parameters']:,} parameters trainable",
            dict(info),
        )
        if info["quantization_skipped"]:
            self.hooks.on_event("message", f"Quantization skipped: {info['quantization_skipped']}", None)
        if info["pad_token_added"]:
            self.hooks.on_event("message", "The tokenizer has no pad token; using its eos token for padding", None)

    def _announce_data(self, name: str, examples: TokenizedExamples, max_len: int) -> None:
        data = {
            "examples": len(examples.input_ids),
            "tokens": examples.num_tokens,
            "truncated": examples.num_truncated,
            "skipped": examples.num_skipped,
        }
        line = f"{name} data: {data['examples']} examples, {data['tokens']:,} tokens"
        if examples.num_truncated:
            line += f"; {examples.num_truncated} truncated to {max_len} tokens"
        if examples.num_skipped:
            line += f"; {examples.num_skipped} skipped (under 2 tokens)"
        self.hooks.on_event("message", line, data)

    def _result(self, wall_seconds: float) -> TrainResult:
        state = self._trainer.state
        tokens = state.num_input_tokens_seen
        return TrainResult(
            steps=state.global_step,
            total_steps=state.max_steps,
            trained_tokens=tokens,
            final_loss=_last_logged(state.log_history, "loss"),
            valid_loss=_last_logged(state.log_history, "eval_loss"),
            tokens_per_second=tokens / wall_seconds if wall_seconds > 0 else 0.0,
            wall_seconds=wall_seconds,
            peak_memory_bytes=_peak_memory_bytes(self._device),
            device=self._info["device"],
            precision=self._info["precision"],
            quantization=self._info["quantization"],
            stopped_early=self._callback.stop_requested,
        )
