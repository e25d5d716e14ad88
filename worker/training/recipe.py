"""The LoRA / QLoRA training recipe: setup -> train -> save -> cleanup (paper steps 1-6, 8).

The spec is the whole configuration; nothing here reads the environment. The
caller (the jobs.train task) owns the job's state: it passes in local files and
a work folder, receives progress through TrainingHooks, and records the result.
"""

from __future__ import annotations

import gc
import json
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import OPTIMIZER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler

from app.domains.jobs.spec import TrainingSpec
from worker.training.data import CausalLMCollator, PackedCollator, TokenizedExamples, load_examples
from worker.training.hooks import StopReason, TrainingHooks
from worker.training.model import Device, load_base_model, select_device
from worker.training.packing import split_packed_batch

# bitsandbytes' optimizers on CPU: paging does not exist there (they fall back,
# with a warning) and the 8-bit step measured 61 ms against torch's fused
# AdamW's 4 ms for the LoRA parameters of a 30M model; optimizer states of
# LoRA-sized parameters are too small for 8 bits to save memory that matters.
_CPU_OPTIMIZER = "adamw_torch_fused"
_BNB_OPTIMIZERS = frozenset({"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"})
# Share of GPU memory the micro-batch probe may use; the rest is headroom for
# the optimizer states, allocator fragmentation and longer-than-probed batches.
_GPU_MEMORY_BUDGET = 0.85


@dataclass(frozen=True)
class TrainResult:
    """What one train() call did.

    final_loss is the last logged training loss (None when no step was logged);
    valid_loss the last validation loss (None without a validation file or
    when no epoch ended). tokens_per_second counts real (non-pad) tokens over
    wall_seconds, which include epoch-end evaluation and checkpoint writes
    (the metrics events' rate covers training steps only). peak_memory_bytes
    covers this job from setup() to the end of train(): CUDA's max allocated
    memory on GPU; on CPU the process's peak resident set size, reset at
    setup() where Linux allows it (/proc/self/clear_refs), else the peak since
    the process started. The other fields say how the job ran: quantization
    loaded, precision (autocast dtype), attention kernel, packing, micro-batch
    and accumulation (their product is the effective batch), optimizer,
    whether gradient checkpointing was on, and row_tokens: when set, each
    packed micro-batch ran as forward/backward passes over rows of at most
    that many tokens (whole examples), the gradients summed. stopped is why
    hooks.should_stop() ended training early (None: the schedule ran out;
    a plain True counts as "cancel"), resumed_from_step the checkpoint's step
    when training continued from one (steps and total_steps count the whole
    job, not this call).
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
    attention: str = "sdpa"
    packing: bool = False
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    row_tokens: int | None = None
    stopped: StopReason | None = None
    resumed_from_step: int | None = None


class _HooksCallback(TrainerCallback):
    """Forwards the Trainer's logs, saves and stop checks to TrainingHooks, and decides when to checkpoint.

    Token counts come from the Trainer's own non-padding counter
    (state.num_input_tokens_seen, the sum of attention masks), which is also
    saved in checkpoints and so survives a resume.

    Checkpoints: with every_steps, at each multiple of it (overriding the
    Trainer's own end-of-training save) and handed to hooks.on_checkpoint;
    without, at epoch ends (the Trainer's save_strategy) and kept local. A
    "pause" or "shutdown" stop writes one at that step and hands it over too;
    a "cancel" stop writes none. Runs after the Trainer's DefaultFlowCallback,
    so its control flags win.
    """

    def __init__(self, hooks: TrainingHooks, every_steps: int | None = None):
        self.hooks = hooks
        self.every_steps = every_steps
        self.stop_requested = False
        self.stop_reason: StopReason | None = None
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
        if self.every_steps is not None:
            control.should_save = state.global_step % self.every_steps == 0
        if self.stop_requested:
            return
        reason = self.hooks.should_stop()
        if not reason:
            return
        # Callers that answer with a bool only knew cancellation.
        self.stop_reason = reason if reason in ("pause", "shutdown") else "cancel"
        self.stop_requested = True
        control.should_training_stop = True
        control.should_save = self.stop_reason != "cancel"
        why = {"cancel": "Stop requested", "pause": "Pause requested", "shutdown": "Worker shutting down"}
        self.hooks.on_event("message", f"{why[self.stop_reason]}; training stops at step {state.global_step}", None)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch_ended_at = time.perf_counter()
        if self.stop_requested:
            # The Trainer still evaluates and checkpoints at the end of the epoch it was
            # stopped in; a stopped job needs neither (a pause already saved at its step).
            control.should_evaluate = False
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        self.hooks.on_event("message", f"Checkpoint saved at step {step}", {"step": step})
        if self.every_steps is None and self.stop_reason not in ("pause", "shutdown"):
            return
        path = Path(args.output_dir) / f"checkpoint-{step}"
        # The pickled TrainingArguments: never read on resume (the spec rebuilds them), so never shipped.
        (path / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        metrics: dict[str, Any] = {"step": step, "train_loss": _last_logged(state.log_history, "loss")}
        valid_loss = _last_logged(state.log_history, "eval_loss")
        if valid_loss is not None:
            metrics["valid_loss"] = valid_loss
        self.hooks.on_checkpoint(step, path, metrics)
        # Handed over (uploaded): the local copy only takes disk space from here on.
        shutil.rmtree(path, ignore_errors=True)

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
    if device == "cpu" and name in _BNB_OPTIMIZERS:
        return _CPU_OPTIMIZER, (f"Optimizer {name} is a bitsandbytes GPU optimizer (no paging on CPU, and its 8-bit "
                                f"step is slower there); using {_CPU_OPTIMIZER} on CPU")
    return name, None


class PeakMemory:
    """Peak memory of this process from reset() on, in bytes.

    CUDA: torch's max allocated bytes. CPU: the resident set's high-water mark
    (VmHWM), which writing "5" to /proc/self/clear_refs resets (Linux >= 4.0);
    where that is not allowed, the process's lifetime peak (ru_maxrss), which
    may include earlier jobs of the same worker process.
    """

    def __init__(self, device: Device):
        self.device = device
        self.per_job = False

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.per_job = True
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.per_job = True
        except OSError:
            self.per_job = False

    def peak_bytes(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
            if match:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        return peak if sys.platform == "darwin" else peak * 1024


def divisors_descending(n: int) -> list[int]:
    """Every positive divisor of n, largest first."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def choose_micro_batch(effective_batch: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of effective_batch for which fits(micro_batch) is True.

    Trying divisors only keeps micro-batch x accumulation equal to the
    effective batch, so the optimizer sees the same batches whatever is picked.
    fits is called largest first and not again after the first True. Raises
    MemoryError when not even a micro-batch of 1 fits.
    """
    for micro in divisors_descending(effective_batch):
        if fits(micro):
            return micro
    raise MemoryError("a micro-batch of one example at the longest example's length does not fit in GPU memory; "
                      "set training.gradient_checkpointing to true, lower training.max_seq_length, or use a "
                      "larger GPU")


class _EpochSeededLengthSampler(LengthGroupedSampler):
    """The Trainer's length-grouped sampler, its shuffle seeded by (seed + epoch).

    The Trainer's own draws from the global RNG, whose state at an epoch's start
    depends on everything before it (dropout included), so a run resumed in
    the middle of an epoch would see that epoch in another order. Seeded per
    epoch (like accelerate's SeedableRandomSampler for the random strategy),
    the order is a function of the epoch alone and skipping the trained
    batches lands on the same data position. The Trainer calls set_epoch.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class _RowTrainer(Trainer):
    """Trainer that runs a packed micro-batch as rows of at most row_tokens tokens (None: whole),
    and resumes exactly (a per-epoch seeded length-grouped sampler, no step past max_steps).

    Each row's loss is its summed token losses over the step's target count
    (num_items_in_batch), so the rows' gradients add up to the micro-batch's.
    Without that count (a model that takes no loss kwargs) rows are not used.
    """

    row_tokens: int | None = None
    row_multiple: int | None = None
    pad_token_id: int = 0

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint at max_steps in mid-epoch (the last step's): the Trainer would skip
        # the trained batches and run one step more before it checks the limit.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None:
            return super()._get_train_sampler(train_dataset)
        return _EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                         [len(row["input_ids"]) for row in dataset], self.args.data_seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.row_tokens is None or num_items_in_batch is None or "cu_seq_lens_q" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        rows = split_packed_batch(inputs, self.row_tokens, pad_to_multiple_of=self.row_multiple,
                                  pad_token_id=self.pad_token_id)
        return sum(super(_RowTrainer, self).training_step(model, row, num_items_in_batch) for row in rows)


def _optimizer_family(state: dict[Any, dict[str, Any]]) -> str | None:
    """Which optimizer wrote this optimizer state: "torch" (AdamW's exp_avg/exp_avg_sq),
    "bitsandbytes" (its state1/state2, or its quantization-state entry), or None (no state yet)."""
    first = next((entry for entry in state.values() if entry), None)
    if first is None:
        return None
    return "torch" if "exp_avg" in first else "bitsandbytes"


def _last_logged(log_history: list[dict[str, float]], key: str) -> float | None:
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def _checkpoint_step(path: Path) -> int:
    """The global step of a checkpoint directory the Trainer wrote; ValueError if it is not one."""
    state_file = Path(path) / "trainer_state.json"
    try:
        return int(json.loads(state_file.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a training checkpoint (no readable {state_file.name}): {exc}") from exc


def _as_dataset(examples: TokenizedExamples) -> list[dict[str, list[int]]]:
    # A list of dicts is a map-style dataset for the Trainer; the collator pads or packs per batch.
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(examples.input_ids, examples.labels, strict=True)]


class LoraRecipe:
    """Fine-tunes a LoRA adapter on a local base model from a TrainingSpec.

    Lifecycle: setup() once, train() once, save() any number of times, then
    cleanup(). Checkpoints (adapter, optimizer, scheduler, RNG and trainer
    state with the global step, from which the data position follows) are
    written under work_dir/checkpoints: with spec.training.checkpoint_every_steps
    at every multiple of it, each handed to hooks.on_checkpoint and then
    deleted; otherwise at each epoch end, kept locally (save_total_limit of
    them). A "pause" or "shutdown" from hooks.should_stop() (polled after every
    optimizer step) writes one at that step and hands it over before training
    stops; "cancel" stops without one. With resume_from (such a checkpoint
    directory) training continues at its step with the same total steps, the
    same batches and the same random draws as a run that was never stopped.
    The caller owns work_dir and deletes it. The instance is not thread-safe
    and not reusable after cleanup().
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
        resume_from: Path | None = None,
    ):
        """Stores the inputs only; nothing is loaded until setup().

        Raises TypeError when the spec asks for periodic checkpoints and hooks
        has no on_checkpoint to hand them to.
        """
        if spec.training.checkpoint_every_steps is not None and not hasattr(hooks, "on_checkpoint"):
            raise TypeError("training.checkpoint_every_steps is set but the hooks have no on_checkpoint method")
        self.spec = spec
        self.base_model_path = Path(base_model_path)
        self.train_file = Path(train_file)
        self.validation_file = Path(validation_file) if validation_file is not None else None
        self.work_dir = Path(work_dir)
        self.hooks = hooks
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self._resumed_from_step: int | None = None
        self._device: Device = select_device()
        self._memory = PeakMemory(self._device)
        self._model: Any = None
        self._tokenizer: Any = None
        self._trainer: Trainer | None = None
        self._callback: _HooksCallback | None = None
        self._info: dict[str, Any] = {}

    @property
    def model(self) -> Any:
        """The peft model (base + adapter) between setup() and cleanup(), else None."""
        return self._model

    def setup(self) -> None:
        """Seed, load base model + tokenizer, attach LoRA, tokenize the data, plan batches, build the Trainer.

        Emits message events (device, quantization, batches, optimizer, data
        sizes). Peak memory is measured from here. Raises DataFormatError for a
        bad record (with file and line), ValueError for a file with no usable
        record, a LoRA target module the model lacks, or a precision/attention
        setting the device cannot run; MemoryError when not even a micro-batch
        of 1 fits on the GPU; OSError for a missing file or model folder.
        """
        self._memory.reset()
        set_seed(self.spec.seed)
        t = self.spec.training
        self._model, self._tokenizer, self._info = load_base_model(self.base_model_path, self.spec, self._device)
        self._announce_model()
        max_len = t.max_seq_length
        train = load_examples(self.train_file, self._tokenizer, max_len, completion_only=t.completion_only_loss)
        self._announce_data("Training", train, max_len)
        valid = None
        if self.validation_file is not None:
            valid = load_examples(self.validation_file, self._tokenizer, max_len,
                                  completion_only=t.completion_only_loss)
            self._announce_data("Validation", valid, max_len)
        micro, accumulation, packing, row_tokens = self._plan_batches(train)
        self._info.update(micro_batch_size=micro, gradient_accumulation_steps=accumulation, packing=packing,
                          row_tokens=row_tokens)
        rows = ""
        if row_tokens:
            rows = f", run as rows of at most {row_tokens} tokens"
            if t.row_length_multiple:
                rows += f" padded to a multiple of {t.row_length_multiple}"
        self.hooks.on_event(
            "message",
            f"Batches: {micro} example(s) per micro-batch x {accumulation} accumulation step(s) "
            f"= {micro * accumulation} per optimizer step; packing {'on' if packing else 'off'}{rows}",
            {"micro_batch_size": micro, "gradient_accumulation_steps": accumulation, "packing": packing,
             "row_tokens": row_tokens, "row_length_multiple": t.row_length_multiple if row_tokens else None},
        )
        optim, note = _optimizer_for(t.optimizer, self._device)
        self._info["optimizer"] = optim
        if note:
            self.hooks.on_event("message", note, None)
        # Packed batches carry their example boundaries (cu_seq_lens): flash-attention and the
        # per-example SDPA read them, and rows are cut along them.
        collator = PackedCollator(with_flash_attn_kwargs=True) if packing else CausalLMCollator(self._tokenizer)
        self._callback = _HooksCallback(self.hooks, t.checkpoint_every_steps)
        self._trainer = _RowTrainer(
            model=self._model,
            args=self._training_arguments(optim=optim, has_validation=valid is not None),
            data_collator=collator,
            train_dataset=_as_dataset(train),
            eval_dataset=_as_dataset(valid) if valid is not None else None,
            processing_class=self._tokenizer,
            callbacks=[self._callback],
        )
        self._trainer.row_tokens = row_tokens
        self._trainer.row_multiple = t.row_length_multiple
        self._trainer.pad_token_id = self._tokenizer.pad_token_id or 0
        # With tqdm disabled the Trainer prints every log dict to stdout; progress goes to hooks instead.
        self._trainer.remove_callback(PrinterCallback)

    def train(self) -> TrainResult:
        """Run training to the end of the schedule, or until hooks.should_stop().

        Continues from resume_from when given. Emits metrics events at every
        logging step and epoch-end validation, and a message per checkpoint.
        Raises RuntimeError when setup() has not run, ValueError when
        resume_from is not a checkpoint this recipe wrote; exceptions from the
        model or the hooks propagate (the job fails).
        """
        if self._trainer is None or self._callback is None:
            raise RuntimeError("call setup() before train()")
        resume = None
        if self.resume_from is not None:
            self._resumed_from_step = _checkpoint_step(self.resume_from)
            resume = str(self.resume_from)
            self.hooks.on_event("message", f"Resuming from the checkpoint at step {self._resumed_from_step}",
                                {"step": self._resumed_from_step})
            self._fit_optimizer_state(Path(self.resume_from))
        self.hooks.on_event("message", "Training started", None)
        start = time.perf_counter()
        self._trainer.train(resume_from_checkpoint=resume)
        wall = time.perf_counter() - start
        result = self._result(wall)
        verb = {None: "finished", "cancel": "stopped early", "pause": "paused",
                "shutdown": "stopped for the worker's shutdown"}[result.stopped]
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

    def _fit_optimizer_state(self, checkpoint: Path) -> None:
        """Make the checkpoint's optimizer state loadable by this run's optimizer.

        A checkpoint written by the other optimizer family (bitsandbytes' on a GPU worker, torch's
        AdamW on a CPU one) cannot be loaded into this one: torch and bitsandbytes keep their
        moments under different keys, and the first step would fail. Its moments are dropped then,
        keeping each parameter group's learning rate, so the job resumes its adapter, schedule,
        RNG and data position with fresh moments instead of failing; the events say so. Rewrites
        optimizer.pt in the checkpoint folder (the worker's local copy).
        """
        path = checkpoint / OPTIMIZER_NAME
        if not path.is_file():
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        optim = self._info["optimizer"]
        wanted = "bitsandbytes" if optim in _BNB_OPTIMIZERS else "torch"
        found = _optimizer_family(saved["state"])
        if found in (None, wanted):
            return
        optimizer = self._trainer.create_optimizer()
        groups = optimizer.state_dict()["param_groups"]
        self._trainer.optimizer = None  # the Trainer builds its own in train(), and loads the file into it
        if len(groups) != len(saved["param_groups"]):
            raise ValueError(f"{checkpoint} holds {len(saved['param_groups'])} optimizer parameter groups; "
                             f"this run has {len(groups)}: not a checkpoint of this job's adapter")
        for group, old in zip(groups, saved["param_groups"], strict=True):
            for key in ("lr", "initial_lr"):
                if key in old:
                    group[key] = old[key]
        torch.save({"state": {}, "param_groups": groups}, path)
        self.hooks.on_event(
            "message",
            f"The checkpoint's optimizer state is {found}'s and this worker trains with {optim}: the optimizer "
            "moments start afresh; the adapter, learning-rate schedule and data position are resumed",
            {"checkpoint_optimizer": found, "optimizer": optim},
        )

    def _plan_batches(self, train: TokenizedExamples) -> tuple[int, int, bool, int | None]:
        """(micro-batch size, accumulation steps, packing, row tokens) for this device.

        The effective batch (batch_size x gradient_accumulation_steps) is kept,
        and with it what the optimizer sees. With auto_micro_batch and packing:
        on CUDA the micro-batch is the largest divisor of it that a forward +
        backward at the longest examples fits in (choose_micro_batch); on CPU it
        is the whole effective batch, run as packed rows no longer than the
        longest example, so activation memory stays that of one example while
        short examples share a pass (measured 1.1x the tokens/s of one example
        per pass on a 30M model). Otherwise the spec's batch_size as given.
        """
        t = self.spec.training
        effective = t.batch_size * t.gradient_accumulation_steps

        def packing_for(micro: int) -> bool:
            if micro == 1:
                return False  # one example per micro-batch: nothing to pack, nothing padded
            return True if t.packing == "auto" else bool(t.packing)

        if not t.auto_micro_batch or not packing_for(effective):
            return t.batch_size, t.gradient_accumulation_steps, packing_for(t.batch_size), None
        lengths = sorted((len(ids) for ids in train.input_ids), reverse=True)
        if self._device == "cpu":
            return effective, 1, True, lengths[0]
        micro = choose_micro_batch(effective, lambda m: self._cuda_step_fits(lengths[:m], packing_for(m)))
        self._memory.reset()  # the job's peak is training's, not the probe's
        return micro, effective // micro, packing_for(micro), None

    def _cuda_step_fits(self, lengths: list[int], packing: bool) -> bool:
        """Whether a forward + backward on a worst-case micro-batch stays within the GPU memory budget.

        The batch has the given example lengths (the longest of the data),
        padded to the longest or packed into one row. Runs under the training
        autocast, restores the RNG state and leaves no gradients behind, so the
        probe changes nothing about the training that follows.
        """
        model, vocab = self._model, self._model.config.vocab_size
        device = next(p for p in model.parameters() if p.device.type == "cuda").device
        precision = self._info["precision"]
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        batch: dict[str, torch.Tensor] = {}
        try:
            if packing:
                ids = torch.randint(0, vocab, (1, sum(lengths)), device=device)
                positions = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
                edges = torch.tensor([0, *lengths], device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                batch = {"input_ids": ids, "labels": ids, "position_ids": positions, "cu_seq_lens_q": edges,
                         "cu_seq_lens_k": edges, "max_length_q": max(lengths), "max_length_k": max(lengths)}
            else:
                ids = torch.randint(0, vocab, (len(lengths), max(lengths)), device=device)
                batch = {"input_ids": ids, "labels": ids}
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                                enabled=precision != "fp32"):
                loss = model(**batch).loss
            loss.backward()
            fits = torch.cuda.max_memory_allocated(device) <= _GPU_MEMORY_BUDGET * torch.cuda.get_device_properties(
                device).total_memory
        except torch.cuda.OutOfMemoryError:
            fits = False
        finally:
            loss = None
            batch.clear()
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            torch.set_rng_state(rng[0])
            torch.cuda.set_rng_state(rng[1], device)
        return fits

    def _training_arguments(self, *, optim: str, has_validation: bool) -> TrainingArguments:
        t = self.spec.training
        info = self._info
        precision = info["precision"]
        micro, packing = info["micro_batch_size"], info["packing"]
        # Periodic checkpoints by step, else the recipe's local epoch-end ones; _HooksCallback has the last word.
        every = t.checkpoint_every_steps
        saving = {"save_strategy": "steps", "save_steps": every} if every is not None else {"save_strategy": "epoch"}
        on_cpu = self._device == "cpu"
        return TrainingArguments(
            output_dir=str(self.work_dir / "checkpoints"),
            per_device_train_batch_size=micro,
            # Evaluation keeps no activations but does keep each pass's logits (tokens x vocabulary);
            # on CPU, where the micro-batch is a whole optimizer step, it goes by the spec's batch_size.
            per_device_eval_batch_size=micro if self._device == "cuda" else t.batch_size,
            gradient_accumulation_steps=info["gradient_accumulation_steps"],
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
            **saving,
            save_total_limit=t.save_total_limit,
            eval_strategy="epoch" if has_validation else "no",
            # Evaluation needs only the loss; otherwise the Trainer keeps every
            # batch's logits (batch x length x vocab floats) in memory.
            prediction_loss_only=True,
            # Packed rows have no padding (and no attention mask to count by):
            # every input token is real. Padded batches count the attention mask.
            include_num_input_tokens_seen="all" if packing else "non_padding",
            # Length-grouped batches cut padding waste; with one example per
            # micro-batch, or packed rows, there is none to cut.
            train_sampling_strategy="group_by_length" if t.group_by_length and micro > 1 and not packing
            else "random",
            # The Trainer's gradient checkpointing stays at its default (off): load_base_model applied the spec's.
            dataloader_num_workers=t.dataloader_workers,
            dataloader_pin_memory=not on_cpu,
            report_to="none",
            disable_tqdm=True,
        )

    def _announce_model(self) -> None:
        info = self._info
        self.hooks.on_event(
            "message",
            f"Loaded base model on {info['device']} (quantization {info['quantization']}, {info['dtype']} "
            f"unquantized weights, {info['precision']} training, {info['attention']} attention, gradient "
            f"checkpointing {'on' if info['gradient_checkpointing'] else 'off'}); "
            f"{info['trainable_parameters']:,} of {info['total_parameters']:,} parameters trainable",
            dict(info),
        )
        if info["pad_token_added"]:
            self.hooks.on_event("message", "The tokenizer has no pad token; using its eos token for padding", None)

    def _announce_data(self, name: str, examples: TokenizedExamples, max_len: int) -> None:
        data = {
            "examples": len(examples.input_ids),
            "tokens": examples.num_tokens,
            "target_tokens": examples.num_target_tokens,
            "truncated": examples.num_truncated,
            "skipped": examples.num_skipped,
        }
        line = f"{name} data: {data['examples']} examples, {data['tokens']:,} tokens"
        if examples.num_target_tokens < examples.num_tokens - len(examples.input_ids):
            line += f" ({examples.num_target_tokens:,} of them completion tokens the loss is computed on)"
        if examples.num_truncated:
            line += f"; {examples.num_truncated} truncated to {max_len} tokens"
        if examples.num_skipped:
            line += f"; {examples.num_skipped} skipped (under 2 tokens, or no completion token)"
        self.hooks.on_event("message", line, data)

    def _result(self, wall_seconds: float) -> TrainResult:
        state = self._trainer.state
        tokens = state.num_input_tokens_seen
        info = self._info
        return TrainResult(
            steps=state.global_step,
            total_steps=state.max_steps,
            trained_tokens=tokens,
            final_loss=_last_logged(state.log_history, "loss"),
            valid_loss=_last_logged(state.log_history, "eval_loss"),
            tokens_per_second=tokens / wall_seconds if wall_seconds > 0 else 0.0,
            wall_seconds=wall_seconds,
            peak_memory_bytes=self._memory.peak_bytes(),
            device=info["device"],
            precision=info["precision"],
            quantization=info["quantization"],
            attention=info["attention"],
            packing=info["packing"],
            micro_batch_size=info["micro_batch_size"],
            gradient_accumulation_steps=info["gradient_accumulation_steps"],
            optimizer=info["optimizer"],
            gradient_checkpointing=info["gradient_checkpointing"],
            row_tokens=info["row_tokens"],
            stopped=self._callback.stop_reason,
            resumed_from_step=self._resumed_from_step,
        )
