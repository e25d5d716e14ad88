"""The transformers Trainer as the recipe runs it: its arguments from the spec, and a subclass for
packed rows and exact mid-epoch resume.

Written against transformers==5.24.0 (the pinned version). Three private Trainer methods are
overridden because no public hook reaches what they decide; each says why. Re-read them when
the pin moves: a renamed or re-signed private method would silently stop being called.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from app.domains.jobs.spec import TrainingSpec
from worker.training.batching import BatchPlan
from worker.training.callbacks import StepAbandoned
from worker.training.model import Device, Precision
from worker.training.ops import IGNORE_INDEX, count_correct
from worker.training.packing import split_packed_batch


def training_arguments(spec: TrainingSpec, *, plan: BatchPlan, optimizer: str, precision: Precision, device: Device,
                       output_dir: Path, has_validation: bool) -> TrainingArguments:
    """The Trainer's arguments for this spec, batch plan and device; checkpoints go to output_dir."""
    t = spec.training
    micro, packing = plan.micro_batch_size, plan.packing
    # Periodic checkpoints by step, else the recipe's local epoch-end ones; StopAndCheckpoint has the last word.
    every = t.checkpoint_every_steps
    saving = {"save_strategy": "steps", "save_steps": every} if every is not None else {"save_strategy": "epoch"}
    on_cpu = device == "cpu"
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        # Evaluation keeps no activations but does keep each pass's logits (tokens x vocabulary);
        # on CPU, where the micro-batch is a whole optimizer step, it goes by the spec's batch_size.
        per_device_eval_batch_size=micro if device == "cuda" else t.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        # transformers 5 has no warmup_ratio: a float below 1 here is a ratio of total steps.
        warmup_steps=float(t.warmup_ratio),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=on_cpu,
        seed=spec.seed,
        data_seed=spec.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        **saving,
        save_total_limit=t.save_total_limit,
        **_evaluation(t.eval_every_steps, has_validation),
        # Evaluation needs only the loss; otherwise the Trainer keeps every
        # batch's logits (batch x length x vocab floats) in memory.
        prediction_loss_only=True,
        # Packed rows have no padding (and no attention mask to count by):
        # every input token is real. Padded batches count the attention mask.
        include_num_input_tokens_seen="all" if packing else "non_padding",
        # Length-grouped batches cut padding waste; with one example per
        # micro-batch, or packed rows, there is none to cut.
        train_sampling_strategy="group_by_length" if t.group_by_length and micro > 1 and not packing else "random",
        # The Trainer's gradient checkpointing stays at its default (off): load_base_model applied the spec's.
        dataloader_num_workers=t.dataloader_workers,
        dataloader_pin_memory=not on_cpu,
        report_to="none",
        disable_tqdm=True,
        **_data_parallel(t.processes),
    )


def _data_parallel(processes: int) -> dict[str, object]:
    """DDP settings for several training processes (worker.training.distributed)."""
    if processes == 1:
        return {}
    return {
        # Every LoRA weight gets a gradient each step: no search for unused ones (a graph walk per step).
        "ddp_find_unused_parameters": False,
        # The ranks run different numbers of forward passes per step (a CPU step's packed rows differ in
        # number), so a broadcast of buffers at each forward would pair up wrongly and hang. The only
        # buffers (rotary frequencies) are constants, the same on every rank.
        "ddp_broadcast_buffers": False,
    }


def _evaluation(every_steps: int | None, has_validation: bool) -> dict[str, object]:
    """Validation every N optimizer steps (and at the last, the Trainer's own rule), else at each epoch end."""
    if not has_validation:
        return {"eval_strategy": "no"}
    if every_steps is None:
        return {"eval_strategy": "epoch"}
    return {"eval_strategy": "steps", "eval_steps": every_steps}


class EpochSeededLengthSampler(LengthGroupedSampler):
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


class RowTrainer(Trainer):
    """Trainer that runs a packed micro-batch as rows of at most row_tokens tokens (None: whole),
    and resumes exactly (a per-epoch seeded length-grouped sampler, no step past max_steps).

    Each row's loss is its summed token losses over the step's target count
    (num_items_in_batch), so the rows' gradients add up to the micro-batch's.
    Without that count (a model that takes no loss kwargs) rows are not used.
    row_multiple and pad_token_id: each row is padded to a multiple of row_multiple tokens with
    pad_token_id (see packing.split_packed_batch). abandon_step(state), asked between rows, ends a
    step in the middle by raising StepAbandoned (a CPU step is one micro-batch of many rows, so
    the Trainer's between-micro-batch callbacks never run inside it). Other arguments are the
    Trainer's.

    In data-parallel training (several processes) every row of a step but the last runs without
    DDP's gradient all-reduce (no_sync), so each rank syncs once per micro-batch however many rows it
    has, and the token-accuracy counts are summed over the ranks when logged.
    """

    def __init__(self, *args, row_tokens: int | None = None, row_multiple: int | None = None,
                 pad_token_id: int = 0, abandon_step: Callable[[TrainerState], bool] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_tokens = row_tokens
        self.row_multiple = row_multiple
        self.pad_token_id = pad_token_id
        self.abandon_step = abandon_step
        # (correct, labelled) token counts since the last log, per mode; tensors until logged (no sync per step).
        self._token_counts: dict[str, tuple[torch.Tensor | int, torch.Tensor | int]] = {"train": (0, 0),
                                                                                         "eval": (0, 0)}

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint at max_steps in mid-epoch (the last step's): the Trainer would skip
        # the trained batches and run one step more before it checks the limit. Private because the
        # limit is only checked after a step (DefaultFlowCallback.on_step_end), and no callback
        # runs between the skipped batches and that step; the recipe needs the Trainer's own
        # resume (adapter, state) even when nothing is left to train. transformers 5.24.0.
        # The same holds for a checkpoint of the step an early stop ended the run at (BestValidation
        # asks to stop in on_train_begin): the Trainer would otherwise train its next step.
        if self.state.global_step >= self.state.max_steps > 0 or self.control.should_training_stop:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # Private because the Trainer builds its LengthGroupedSampler here without a generator and
        # takes no sampler argument; the public alternative, get_train_dataloader, would mean
        # copying the private _get_dataloader it calls. transformers 5.24.0.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None:
            return super()._get_train_sampler(train_dataset)
        # Grouped by the whole optimizer step (every rank's share), so several processes deal out the
        # same global order as one.
        return EpochSeededLengthSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            [len(row["input_ids"]) for row in dataset], self.args.data_seed)

    def _save_rng_state(self, output_dir: str) -> None:
        # Private because the Trainer has every rank write its own rng_state_<rank>.pth into the
        # checkpoint folder, and only rank 0 writes here: the ranks' states are gathered to it, which
        # writes them all (under the names _load_rng_state reads back on every rank), and rank 0's
        # also as rng_state.pth for a run resumed in one process. transformers 5.24.0.
        if self.args.world_size <= 1:
            return super()._save_rng_state(output_dir)
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.random.get_rng_state_all()
        states: list[dict | None] | None = [None] * self.args.world_size if self.args.should_save else None
        dist.gather_object(state, states, dst=0)
        if states is None:
            return None
        os.makedirs(output_dir, exist_ok=True)
        for rank, rank_state in enumerate(states):
            torch.save(rank_state, os.path.join(output_dir, f"rng_state_{rank}.pth"))
        torch.save(states[0], os.path.join(output_dir, "rng_state.pth"))
        return None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.row_tokens is None or num_items_in_batch is None or "cu_seq_lens_q" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        rows = split_packed_batch(inputs, self.row_tokens, pad_to_multiple_of=self.row_multiple,
                                  pad_token_id=self.pad_token_id)
        loss = None
        for i, row in enumerate(rows):
            if i and self.abandon_step is not None and self.abandon_step(self.state):
                raise StepAbandoned(f"step {self.state.global_step + 1} abandoned after {i} of {len(rows)} rows")
            # The gradients of the earlier rows wait in .grad and join the last row's all-reduce.
            local = self.args.world_size > 1 and i < len(rows) - 1
            with self.accelerator.no_sync(model) if local else contextlib.nullcontext():
                row_loss = super().training_step(model, row, num_items_in_batch)
            loss = row_loss if loss is None else loss + row_loss
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")  # the Trainer may pop labels
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        counts = _token_counts(outputs, labels, shift_labels)
        if counts is not None:
            mode = "train" if model.training else "eval"
            (correct, labelled), (more_correct, more_labelled) = self._token_counts[mode], counts
            self._token_counts[mode] = correct + more_correct, labelled + more_labelled
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "eval_loss" in logs:
            evaluation = "eval_loss" in logs
            mode, key = ("eval", "eval_mean_token_accuracy") if evaluation else ("train", "mean_token_accuracy")
            correct, labelled = self._token_counts[mode]
            self._token_counts[mode] = 0, 0
            if self.args.world_size > 1:  # every rank logs at the same steps: the whole step's counts
                counts = torch.tensor([int(correct), int(labelled)], dtype=torch.long, device=self.args.device)
                dist.all_reduce(counts)
                correct, labelled = int(counts[0]), int(counts[1])
            if int(labelled) > 0:
                logs[key] = int(correct) / int(labelled)
        super().log(logs, start_time)


def _token_counts(outputs, labels: torch.Tensor | None,
                  shift_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(correct, labelled) tokens of one forward pass: the chunked loss's own counts, else counted from
    its logits (batch, length, vocabulary) against the labels shifted by one as transformers' causal-LM
    loss shifts them; None for an output with neither (a custom loss's)."""
    if not isinstance(outputs, dict):
        return None
    if outputs.get("correct_tokens") is not None:
        return outputs["correct_tokens"], outputs["labelled_tokens"]
    logits = outputs.get("logits")
    if logits is None:
        return None
    if shift_labels is None:
        if labels is None:
            return None
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return (count_correct(logits.detach().reshape(-1, logits.shape[-1]), shift_labels),
            (shift_labels != IGNORE_INDEX).sum())
