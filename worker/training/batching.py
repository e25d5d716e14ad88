"""How examples become batches: the micro-batch plan for this device and the probe behind it.

The effective batch (batch_size x gradient_accumulation_steps) is the spec's and never changes:
only how it is split into micro-batches (and, on CPU, into packed rows) depends on the device.
Cutting packed micro-batches into rows is worker.training.packing's.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from app.domains.jobs.spec import TrainingSettings
from worker.training.data import CausalLMCollator, PackedCollator, TokenizedExamples
from worker.training.model import Device, Precision

# Share of GPU memory the micro-batch probe may use; the rest is headroom for
# the optimizer states, allocator fragmentation and longer-than-probed batches.
_GPU_MEMORY_BUDGET = 0.85

# CPU rows: the most tokens one forward pass runs unless training.row_tokens says otherwise. On a 2-core
# Xeon, SmolLM2-135M, bf16: rows of 1,500 tokens ran at 1.4x the tokens/s of rows of 300 (per-pass costs
# of its 30 layers paid once for more examples); activations of 2,048 tokens there are about 1 GB.
CPU_ROW_TOKENS = 2048

# fits(example lengths, packed): whether one forward + backward on such a micro-batch fits.
StepFits = Callable[[list[int], bool], bool]


@dataclass(frozen=True)
class BatchPlan:
    """How each optimizer step's examples run.

    micro_batch_size x gradient_accumulation_steps is the effective batch. packing: the
    micro-batch is one packed row (no padding) instead of a padded batch. row_tokens: when set,
    each packed micro-batch runs as forward/backward passes over rows of at most that many
    tokens (whole examples), the gradients summed.
    """

    micro_batch_size: int
    gradient_accumulation_steps: int
    packing: bool
    row_tokens: int | None = None


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


def plan_batches(t: TrainingSettings, lengths: Sequence[int], device: Device, fits: StepFits) -> BatchPlan:
    """The batch plan for training examples of these token lengths on `device`.

    The effective batch (batch_size x gradient_accumulation_steps) is kept,
    and with it what the optimizer sees. With auto_micro_batch and packing:
    on CUDA the micro-batch is the largest divisor of it that a forward +
    backward at the longest examples fits in (fits, via choose_micro_batch); on
    CPU it is the whole effective batch, run as packed rows of at most
    training.row_tokens tokens (default CPU_ROW_TOKENS), whole examples each.
    Otherwise the spec's batch_size as given.
    fits is only called on CUDA. Raises MemoryError from choose_micro_batch.
    """
    effective = t.batch_size * t.gradient_accumulation_steps

    def packing_for(micro: int) -> bool:
        if micro == 1:
            return False  # one example per micro-batch: nothing to pack, nothing padded
        return True if t.packing == "auto" else bool(t.packing)

    if not t.auto_micro_batch or not packing_for(effective):
        return BatchPlan(t.batch_size, t.gradient_accumulation_steps, packing_for(t.batch_size))
    longest_first = sorted(lengths, reverse=True)
    if device == "cpu":
        return BatchPlan(effective, 1, True, row_tokens=t.row_tokens or CPU_ROW_TOKENS)
    micro = choose_micro_batch(effective, lambda m: fits(longest_first[:m], packing_for(m)))
    return BatchPlan(micro, effective // micro, packing_for(micro))


def per_process(plan: BatchPlan, processes: int) -> BatchPlan:
    """The plan one of `processes` data-parallel processes runs, so that together they make the same
    optimizer step: each takes 1/processes of the effective batch (micro_batch_size x accumulation).

    The micro-batch is divided by its common factor with the process count and the accumulation by
    the rest: the per-process micro-batches, dealt out in turn from the one global order (the
    distributed sampler's), cover exactly the examples of the single-process step. A micro-batch of
    one example is not packed (as in plan_batches). Raises ValueError when processes does not
    divide the effective batch (spec.processes_conflict refuses such a job at creation).
    """
    if processes == 1:
        return plan
    micro, accumulation = plan.micro_batch_size, plan.gradient_accumulation_steps
    common = math.gcd(micro, processes)
    if accumulation % (processes // common):
        raise ValueError(f"{processes} processes cannot share an effective batch of {micro * accumulation} "
                         "examples evenly; training.processes must divide it")
    micro //= common
    packing = plan.packing and micro > 1
    return BatchPlan(micro, accumulation // (processes // common), packing, plan.row_tokens if packing else None)


def cuda_step_fits(model: torch.nn.Module, lengths: list[int], packing: bool, precision: Precision) -> bool:
    """Whether a forward + backward on a worst-case micro-batch stays within the GPU memory budget.

    The batch has the given example lengths (the longest of the data),
    padded to the longest or packed into one row. Runs under the training
    autocast (precision), restores the RNG state and leaves no gradients
    behind, so the probe changes nothing about the training that follows. It
    leaves CUDA's peak-memory counter reset, so a job's peak is training's, not
    the probe's.
    """
    vocab = model.config.vocab_size
    device = next(p for p in model.parameters() if p.device.type == "cuda").device
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
        torch.cuda.reset_peak_memory_stats(device)
    return fits


def collator_for(plan: BatchPlan, tokenizer: PreTrainedTokenizerBase) -> CausalLMCollator | PackedCollator:
    """Packed rows, or right-padded batches with the tokenizer's pad token."""
    # Packed batches carry their example boundaries (cu_seq_lens): flash-attention and the
    # per-example SDPA read them, and rows are cut along them.
    return PackedCollator(with_flash_attn_kwargs=True) if plan.packing else CausalLMCollator(tokenizer)


def as_dataset(examples: TokenizedExamples) -> list[dict[str, list[int]]]:
    """A map-style dataset for the Trainer (a list of dicts); the collator pads or packs per batch."""
    return [{"input_ids": ids, "labels": labels}
            for ids, labels in zip(examples.input_ids, examples.labels, strict=True)]
