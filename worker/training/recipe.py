"""The LoRA / QLoRA training recipe: setup -> train -> save -> cleanup.

setup loads the base model (quantized as the spec says), attaches a fresh LoRA adapter, tokenizes
the data and plans the batches; train runs the Trainer to the end of the schedule or until the
caller asks it to stop, checkpointing so the job can resume; save writes the adapter and
tokenizer. The spec is the whole configuration; nothing here reads the environment. The caller
(the jobs.train task) owns the job's state: it passes in local files and a work folder, receives
progress through TrainingHooks, and records the result.

The pieces: model (loading), data and batching (examples to batches), trainer (the Trainer and
its arguments), callbacks (events, stops, checkpoints), optimizers (resuming across optimizer
families) and memory (the job's peak).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, PrinterCallback, set_seed

from app.domains.jobs.spec import TrainingSpec, processes_conflict, validation_conflict
from worker.training.batching import BatchPlan, as_dataset, collator_for, cuda_step_fits, per_process, plan_batches
from worker.training.callbacks import BestValidation, ProgressEvents, StepAbandoned, StopAndCheckpoint, last_logged
from worker.training.data import TokenizedExamples, load_examples, prompt_style_for, record_lines, split_lines
from worker.training.distributed import RankGroup, RankInputs, barrier, check_processes
from worker.training.dpo import DpoTrainer, PairCollator, PreferencePairs, as_pair_dataset, load_pairs, reference_logps
from worker.training.hooks import CostLimits, Stopped, TrainingHooks
from worker.training.memory import PeakMemory
from worker.training.model import Device, Precision, load_base_model, select_device
from worker.training.optimizers import fit_optimizer_state, optimizer_for
from worker.training.trainer import RowTrainer, training_arguments


@dataclass(frozen=True)
class TrainResult:
    """What one train() call did.

    final_loss is the last logged training loss (None when no step was logged);
    valid_loss the last validation loss (None without a validation set or
    before the first evaluation). tokens_per_second counts real (non-pad) tokens over
    wall_seconds, which include evaluations and checkpoint writes
    (the metrics events' rate covers training steps only). peak_memory_bytes
    covers this job from setup() to the end of train(): CUDA's max allocated
    memory on GPU; on CPU the process's peak resident set size, reset at
    setup() where Linux allows it (/proc/self/clear_refs), else the peak since
    the process started. The other fields say how the job ran: quantization
    loaded, precision (autocast dtype), attention kernel, packing, micro-batch
    and accumulation (their product is the effective batch), optimizer,
    whether gradient checkpointing was on, the prompt style code tasks were
    laid out in (training.prompt_style resolved), and row_tokens: when set, each
    packed micro-batch ran as forward/backward passes over rows of at most
    that many tokens (whole examples), the gradients summed. stopped is why
    hooks.should_stop() ended training early (None: the schedule ran out;
    a plain True counts as "cancel"), or "limit" when the run passed one of
    its CostLimits (limit_message says which), resumed_from_step the checkpoint's step
    when training continued from one (steps and total_steps count the whole
    job, not this call).

    Validation: validation_source is "file" (validation_file), "split"
    (training.validation_split of the training file) or None; validation_records
    the records of the validation set (held out by the split, or in the file).
    best_step and best_valid_loss are the evaluation with the lowest validation
    loss over the whole run (resumes included); early_stopped_at_step the step
    training.early_stopping_patience ended training at (a normal end: stopped
    stays None). select_best is training.select_best resolved, adapter_step
    the step whose weights the model holds after train(), and save() writes:
    best_step under "valid_loss", the last step under "last".
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
    prompt_style: str = "completion"
    stopped: Stopped | None = None
    limit_message: str | None = None
    resumed_from_step: int | None = None
    validation_source: str | None = None
    validation_records: int | None = None
    best_step: int | None = None
    best_valid_loss: float | None = None
    early_stopped_at_step: int | None = None
    select_best: str = "last"
    adapter_step: int | None = None


@dataclass(frozen=True)
class _Setup:
    """What setup() settled on for this device; the result reports it."""

    device: str  # the GPU's name, or "cpu"
    precision: Precision
    attention: str
    quantization: str
    gradient_checkpointing: bool
    optimizer: str
    batches: BatchPlan
    prompt_style: str
    validation_source: str | None
    validation_records: int | None
    select_best: str  # training.select_best resolved: "last" or "valid_loss"


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
    stops; "cancel" stops without one, and so do a hooks.cancel_requested()
    between the micro-batches of a step and a passed cost limit (limits), both
    abandoning the step in progress. With resume_from (such a checkpoint
    directory) training continues at its step with the same total steps, the
    same batches and the same random draws as a run that was never stopped.
    With a validation set (validation_file, or training.validation_split of the
    training file) the validation loss is computed at each epoch end or every
    training.eval_every_steps; training.early_stopping_patience ends training
    when it stops improving, and under training.select_best "valid_loss" (the
    default with a validation set) the model ends train() holding the weights
    of the best evaluation, which save() then writes. The caller owns work_dir
    and deletes it. The instance is not thread-safe and not reusable after
    cleanup().

    With spec.training.processes > 1 the recipe trains data-parallel
    (worker.training.distributed): setup() starts the other ranks, which run
    this recipe on the same files (rank gives a child its place) and write
    nothing, each process taking its share of every step's examples; this
    one stays rank 0, the only one that calls the hooks with effect, and
    cleanup() ends the other ranks and restores this process's state.
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
        limits: CostLimits | None = None,
        init_adapter: Path | None = None,
        rank: RankInputs | None = None,
    ):
        """Stores the inputs only; nothing is loaded until setup(). init_adapter: the peft directory of
        spec.init_adapter, trained on from where it is instead of a fresh adapter. rank: set only in the
        processes of ranks 1..N-1 that rank 0 started (worker.training.distributed.run_rank).

        Raises TypeError when the spec asks for periodic checkpoints and hooks
        has no on_checkpoint to hand them to; DeviceUnavailable when it asks for
        more CUDA processes than there are GPUs.
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
        self.limits = limits or CostLimits()
        self.init_adapter = Path(init_adapter) if init_adapter is not None else None
        self._device: Device = select_device(spec.device)
        check_processes(self._device, spec.training.processes)
        self._rank = rank
        self._ranks: RankGroup | None = None
        self._finished = False
        self._memory = PeakMemory(self._device)
        self._model: PeftModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._trainer: RowTrainer | None = None
        self._stopper: StopAndCheckpoint | None = None
        self._best: BestValidation | None = None
        self._setup: _Setup | None = None
        self._adapter_step: int | None = None
        self._resumed_from_step: int | None = None

    @property
    def model(self) -> Any:
        """The peft model (base + adapter) between setup() and cleanup(), else None."""
        return self._model

    def setup(self) -> None:
        """Seed, load base model + tokenizer, attach LoRA, tokenize the data, plan batches, build the Trainer.

        Emits message events (device, quantization, batches, optimizer, data
        sizes, the validation split). Peak memory is measured from here. Raises
        DataFormatError for a bad record (with file and line), ValueError for a
        file with no usable record, a validation split that leaves either side
        empty, validation settings without a validation set (see
        spec.validation_conflict), a LoRA target module the model lacks, or a
        precision/attention setting the device cannot run; MemoryError when not
        even a micro-batch of 1 fits on the GPU; OSError for a missing file or
        model folder. With spec.training.processes > 1 it first starts (or, in
        a child rank, joins) the other ranks; RankFailed when one does not
        start, and a failed setup ends them.
        """
        t = self.spec.training
        conflict = (validation_conflict(t, has_validation_file=self.validation_file is not None)
                    or processes_conflict(t, dpo=self.spec.dpo is not None))
        if conflict is not None:
            raise ValueError(conflict[0])
        self._memory.reset()
        if t.processes > 1:
            self._start_ranks()
        try:
            self._load_and_plan()
        except BaseException:
            self._close_ranks()
            raise

    def _start_ranks(self) -> None:
        """Set this process up as its rank (rank 0 starts the others first) and say so in an event."""
        t = self.spec.training
        if self._rank is not None:
            self._ranks = RankGroup.join(self._rank, self._device)
            return
        self._ranks = RankGroup.start(RankInputs(
            spec=self.spec.model_dump(mode="json"), base_model_path=str(self.base_model_path),
            train_file=str(self.train_file),
            validation_file=str(self.validation_file) if self.validation_file is not None else None,
            work_dir=str(self.work_dir), resume_from=str(self.resume_from) if self.resume_from is not None else None,
            init_adapter=str(self.init_adapter) if self.init_adapter is not None else None,
            rank=0, world_size=t.processes, port=0, threads=0, parent_pid=0), self._device)
        backend = "NCCL, one GPU each" if self._device == "cuda" else f"gloo, {torch.get_num_threads()} thread(s) each"
        self.hooks.on_event("message", f"Training in {t.processes} processes (data parallel over {backend}); "
                                       "this one writes the events, checkpoints and adapter",
                            {"processes": t.processes, "threads_per_process": torch.get_num_threads()})

    def _close_ranks(self) -> None:
        if self._ranks is not None:
            self._ranks.close(finished=self._finished)
            self._ranks = None

    def _load_and_plan(self) -> None:
        t = self.spec.training
        set_seed(self.spec.seed)
        self._model, self._tokenizer, loaded = load_base_model(self.base_model_path, self.spec, self._device,
                                                               init_adapter=self.init_adapter)
        self._announce_model(loaded)

        style = prompt_style_for(self._tokenizer, t.prompt_style)
        train, valid, source, valid_records = self._load_data(style)
        select_best = t.select_best if t.select_best != "auto" else ("valid_loss" if valid is not None else "last")

        precision: Precision = loaded["precision"]
        model = self._model
        if self.spec.dpo is not None:
            # Padded micro-batches of batch_size answer pairs (see worker.training.dpo): never packed.
            plan = BatchPlan(t.batch_size, t.gradient_accumulation_steps, packing=False)
        else:
            plan = plan_batches(t, [len(ids) for ids in train.input_ids], self._device,
                                fits=lambda lengths, packing: cuda_step_fits(model, lengths, packing, precision))
        plan = per_process(plan, t.processes)
        self._announce_batches(plan)
        optimizer, note = optimizer_for(t.optimizer, self._device)
        if note:
            self.hooks.on_event("message", note, None)
        self._setup = _Setup(device=loaded["device"], precision=precision, attention=loaded["attention"],
                             quantization=loaded["quantization"],
                             gradient_checkpointing=loaded["gradient_checkpointing"], optimizer=optimizer,
                             batches=plan, prompt_style=style, validation_source=source,
                             validation_records=valid_records, select_best=select_best)

        self._trainer = self._build_trainer(train, valid, plan=plan, optimizer=optimizer, precision=precision,
                                            select_best=select_best)

    def _build_trainer(self, train: Any, valid: Any, *, plan: BatchPlan,
                       optimizer: str, precision: Precision, select_best: str) -> RowTrainer:
        """The Trainer with the hooks' callbacks: progress events, the best validation loss (with a
        validation set), stop requests and checkpoints. A DPO job's (DpoTrainer) trains on answer pairs
        with their reference log-probabilities, computed here from the weights the job starts with."""
        t = self.spec.training
        trainer_class: Any = RowTrainer
        extra: dict[str, Any] = {}
        collator: Any = collator_for(plan, self._tokenizer)
        train_set, valid_set = as_dataset(train), as_dataset(valid) if valid is not None else None
        if self.spec.dpo is not None:
            trainer_class, extra = DpoTrainer, {"beta": self.spec.dpo.beta}
            collator = PairCollator(self._tokenizer.pad_token_id or 0)
            train_set, valid_set = self._with_reference(train, collator, precision), (
                self._with_reference(valid, collator, precision) if valid is not None else None)
        self._stopper = StopAndCheckpoint(self.hooks, t.checkpoint_every_steps, self.limits)
        callbacks: list[Any] = [ProgressEvents(self.hooks)]
        if valid is not None:
            # Before the stopper: it hands each checkpoint over in its on_save, this one adds its state first.
            self._best = BestValidation(self.hooks, self._model, patience=t.early_stopping_patience,
                                        min_delta=t.early_stopping_min_delta,
                                        keep_weights=select_best == "valid_loss")
            callbacks.append(self._best)
        callbacks.append(self._stopper)
        args = training_arguments(self.spec, plan=plan, optimizer=optimizer, precision=precision,
                                  device=self._device, output_dir=self.work_dir / "checkpoints",
                                  has_validation=valid is not None)
        if self.spec.dpo is not None:
            args.remove_unused_columns = False  # the pairs' columns are the collator's, not the model's inputs
        trainer = trainer_class(
            model=self._model,
            args=args,
            data_collator=collator,
            train_dataset=train_set,
            eval_dataset=valid_set,
            processing_class=self._tokenizer,
            callbacks=callbacks,
            row_tokens=plan.row_tokens,
            row_multiple=t.row_length_multiple,
            pad_token_id=self._tokenizer.pad_token_id or 0,
            # Between rows only in one process: the ranks' rows differ in number, so no rank can decide there for all.
            abandon_step=self._stopper.abandon_step if t.processes == 1 else None,
            **extra,
        )
        # With tqdm disabled the Trainer prints every log dict to stdout; progress goes to hooks instead.
        trainer.remove_callback(PrinterCallback)
        return trainer

    def _with_reference(self, pairs: PreferencePairs, collator: PairCollator, precision: Precision) -> list[Any]:
        """The pairs as a dataset, with the reference's log-probabilities: the base (the adapter disabled)
        for a fresh adapter, the adapter the job continues from otherwise."""
        start = time.perf_counter()
        reference = reference_logps(self._model, as_pair_dataset(pairs, [(0.0, 0.0)] * len(pairs.input_ids)),
                                    collator, device=self._device, precision=precision,
                                    base_only=self.init_adapter is None)
        start_model = self.spec.init_adapter.model if self.spec.init_adapter is not None else str(self.init_adapter)
        which = "the base model" if self.init_adapter is None else f"the model it continues from, {start_model}"
        self.hooks.on_event("message", f"DPO reference: log-probabilities of {len(reference)} answer pairs from "
                                       f"{which} in {time.perf_counter() - start:.1f} s (beta {self.spec.dpo.beta})",
                            {"pairs": len(reference), "beta": self.spec.dpo.beta})
        return as_pair_dataset(pairs, reference)

    def _load(self, path: Path, style: str, lines: Any) -> Any:
        """A file's TokenizedExamples, or for a DPO job its PreferencePairs (with `lines`, those records only)."""
        t = self.spec.training
        if self.spec.dpo is not None:
            return load_pairs(path, self._tokenizer, t.max_seq_length, lines=lines)
        return load_examples(path, self._tokenizer, t.max_seq_length, completion_only=t.completion_only_loss,
                             prompt_style=style, lines=lines)

    def _load_data(self, style: str) -> tuple[Any, Any, str | None, int | None]:
        """(training examples, validation examples or None, where the validation set came from: "file",
        "split" or None, how many records it holds); for a DPO job answer pairs (see _load). A
        validation_split holds out records of the training file, drawn by the job's seed, and says so
        in an event."""
        t = self.spec.training
        max_len = t.max_seq_length
        train_lines = valid_lines = None
        if t.validation_split is not None:
            lines = record_lines(self.train_file)
            split = split_lines(lines, t.validation_split, self.spec.seed, name=self.train_file.name)
            train_lines, valid_lines = split.train_lines, split.valid_lines
            self.hooks.on_event(
                "message",
                f"Validation split: {len(valid_lines)} of the training file's {len(lines)} records held out for "
                f"validation (training.validation_split {t.validation_split}, seed {self.spec.seed}); "
                f"{len(train_lines)} train",
                {"validation_split": t.validation_split, "validation_records": len(valid_lines),
                 "training_records": len(train_lines), "seed": self.spec.seed})
        train = self._load(self.train_file, style, train_lines)
        self._announce_data("Training", train, max_len)
        if self.validation_file is None and valid_lines is None:
            return train, None, None, None
        source = "file" if self.validation_file is not None else "split"
        valid_path = self.validation_file if self.validation_file is not None else self.train_file
        valid = self._load(valid_path, style, valid_lines)
        valid_records = len(valid_lines) if valid_lines is not None else len(record_lines(valid_path))
        self._announce_data("Validation", valid, max_len)
        return train, valid, source, valid_records

    def train(self) -> TrainResult:
        """Run training to the end of the schedule, or until hooks.should_stop().

        Continues from resume_from when given. Emits metrics events at every
        logging step and validation, a message per checkpoint, one for an
        early stop, and at the end one naming the step whose weights the
        adapter holds. Raises RuntimeError when setup() has not run, ValueError
        when resume_from is not a checkpoint this recipe wrote; exceptions from
        the model or the hooks propagate (the job fails).
        """
        if self._trainer is None or self._stopper is None or self._setup is None:
            raise RuntimeError("call setup() before train()")
        if self.resume_from is not None:
            self._resumed_from_step = _checkpoint_step(self.resume_from)
            self.hooks.on_event("message", f"Resuming from the checkpoint at step {self._resumed_from_step}",
                                {"step": self._resumed_from_step})
            if self._rank is None:
                self._fit_optimizer_state(self.resume_from)
            barrier()  # the other ranks read the optimizer state this one may have just rewritten
            if self._best is not None:
                self._best.load(self.resume_from)
        self.hooks.on_event("message", "Training started", None)
        start = time.perf_counter()
        try:
            self._trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from is not None
                                else None)
        except StepAbandoned:
            pass  # between the rows of a step; the stopper recorded why, and the partial step is dropped
        except Exception as exc:
            if self._ranks is not None:  # a collective fails when a rank died: report that rank's error instead
                self._ranks.raise_if_failed(exc, wait_seconds=10.0)
            raise
        self._finished = True
        wall = time.perf_counter() - start
        self._adapter_step = self._trainer.state.global_step
        if self._stopper.reason is None:
            self._select_adapter()
        result = self._result(wall)
        verb = {None: "finished", "cancel": "stopped early", "pause": "paused",
                "shutdown": "stopped for the worker's shutdown", "limit": "stopped at a cost limit"}[result.stopped]
        if result.stopped is None and result.early_stopped_at_step is not None:
            verb = "stopped early by early_stopping_patience"
        self.hooks.on_event("message", f"Training {verb} at step {result.steps} after {wall:.1f} s", None)
        return result

    def _select_adapter(self) -> None:
        """Under select_best "valid_loss", put the best evaluation's weights back into the model; say
        which step's weights the adapter holds."""
        best, last = self._best, self._trainer.state.global_step
        if best is None or best.best_step is None:
            return
        data = {"select_best": self._setup.select_best, "best_step": best.best_step,
                "best_valid_loss": best.best_loss, "last_step": last}
        if self._setup.select_best == "valid_loss" and best.best_step != last and best.restore_best():
            self._adapter_step = best.best_step
            line = (f"The adapter holds the weights of step {best.best_step}, the lowest validation loss "
                    f"({best.best_loss:.4f}); the last step was {last} (training.select_best valid_loss)")
        else:
            line = (f"The adapter holds the weights of the last step, {last}; the lowest validation loss was "
                    f"{best.best_loss:.4f} at step {best.best_step} (training.select_best "
                    f"{self._setup.select_best})")
        self.hooks.on_event("message", line, {**data, "adapter_step": self._adapter_step})

    def save(self, out_dir: Path) -> None:
        """Write the adapter (adapter_config.json, adapter_model.safetensors) and the
        tokenizer files (with its chat template) into out_dir, creating it.

        Overwrites files of the same names. Raises RuntimeError before setup() or after cleanup().
        """
        if self._model is None or self._tokenizer is None:
            raise RuntimeError("call setup() before save()")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._model.save_pretrained(out_dir, safe_serialization=True)
        self._tokenizer.save_pretrained(out_dir)

    def cleanup(self) -> None:
        """Release the model, optimizer and Trainer (and cached GPU memory). Idempotent.

        Files (checkpoints in work_dir, saved adapters) are left in place. With
        several processes, ends the other ranks (waited for after a finished
        train(), killed otherwise) and restores this process's state.
        """
        self._close_ranks()
        self._trainer = self._model = self._tokenizer = self._stopper = self._best = None
        gc.collect()
        if self._device == "cuda":
            torch.cuda.empty_cache()

    def _fit_optimizer_state(self, checkpoint: Path) -> None:
        """Resume a checkpoint of the other optimizer family with fresh moments (see
        optimizers.fit_optimizer_state), and say so in the events."""
        optimizer = self._setup.optimizer
        found = fit_optimizer_state(checkpoint, self._trainer, optimizer)
        if found is None:
            return
        self.hooks.on_event(
            "message",
            f"The checkpoint's optimizer state is {found}'s and this worker trains with {optimizer}: the optimizer "
            "moments start afresh; the adapter, learning-rate schedule and data position are resumed",
            {"checkpoint_optimizer": found, "optimizer": optimizer},
        )

    def _announce_model(self, loaded: dict[str, Any]) -> None:
        self.hooks.on_event(
            "message",
            f"Loaded base model on {loaded['device']} (quantization {loaded['quantization']}, {loaded['dtype']} "
            f"unquantized weights, {loaded['precision']} training, {loaded['attention']} attention, gradient "
            f"checkpointing {'on' if loaded['gradient_checkpointing'] else 'off'}); "
            f"{loaded['trainable_parameters']:,} of {loaded['total_parameters']:,} parameters trainable",
            dict(loaded),
        )
        for note in loaded.get("notes", ()):
            self.hooks.on_event("message", note, None)
        if loaded["pad_token_added"]:
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

    def _announce_batches(self, plan: BatchPlan) -> None:
        multiple = self.spec.training.row_length_multiple
        micro, accumulation = plan.micro_batch_size, plan.gradient_accumulation_steps
        processes = self.spec.training.processes
        rows = ""
        if plan.row_tokens:
            rows = f", run as rows of at most {plan.row_tokens} tokens"
            if multiple:
                rows += f" padded to a multiple of {multiple}"
        self.hooks.on_event(
            "message",
            f"Batches: {micro} example(s) per micro-batch x {accumulation} accumulation step(s)"
            + (f" x {processes} processes" if processes > 1 else "")
            + f" = {micro * accumulation * processes} per optimizer step; packing {'on' if plan.packing else 'off'}"
            + rows,
            {"micro_batch_size": micro, "gradient_accumulation_steps": accumulation, "packing": plan.packing,
             "processes": processes,
             "row_tokens": plan.row_tokens, "row_length_multiple": multiple if plan.row_tokens else None},
        )

    def _result(self, wall_seconds: float) -> TrainResult:
        state, setup, best = self._trainer.state, self._setup, self._best
        tokens = state.num_input_tokens_seen
        return TrainResult(
            steps=state.global_step,
            total_steps=state.max_steps,
            trained_tokens=tokens,
            final_loss=last_logged(state.log_history, "loss"),
            valid_loss=last_logged(state.log_history, "eval_loss"),
            tokens_per_second=tokens / wall_seconds if wall_seconds > 0 else 0.0,
            wall_seconds=wall_seconds,
            peak_memory_bytes=self._memory.peak_bytes(),
            device=setup.device,
            precision=setup.precision,
            quantization=setup.quantization,
            attention=setup.attention,
            packing=setup.batches.packing,
            micro_batch_size=setup.batches.micro_batch_size,
            gradient_accumulation_steps=setup.batches.gradient_accumulation_steps,
            optimizer=setup.optimizer,
            gradient_checkpointing=setup.gradient_checkpointing,
            row_tokens=setup.batches.row_tokens,
            prompt_style=setup.prompt_style,
            stopped=self._stopper.reason,
            limit_message=self._stopper.limit_message,
            resumed_from_step=self._resumed_from_step,
            validation_source=setup.validation_source,
            validation_records=setup.validation_records,
            best_step=best.best_step if best is not None else None,
            best_valid_loss=best.best_loss if best is not None else None,
            early_stopped_at_step=best.stopped_at_step if best is not None else None,
            select_best=setup.select_best,
            adapter_step=self._adapter_step,
        )


def _checkpoint_step(path: Path) -> int:
    """The global step of a checkpoint directory the Trainer wrote; ValueError if it is not one."""
    state_file = Path(path) / "trainer_state.json"
    try:
        return int(json.loads(state_file.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a training checkpoint (no readable {state_file.name}): {exc}") from exc
