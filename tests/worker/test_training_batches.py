"""Batch planning (micro-batch, accumulation, packing), per-job peak memory, and the spec's new switches."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch

from app.domains.jobs.spec import LoraSpec, TrainingSettings, TrainingSpec
from tests.worker.test_training_recipe import RecordingHooks, code_task_records, write_jsonl
from worker.training.batching import choose_micro_batch, divisors_descending
from worker.training.model import cpu_has_bf16, resolve_precision
from worker.training.recipe import LoraRecipe


def test_micro_batch_is_the_largest_fitting_divisor_of_the_effective_batch():
    tried: list[int] = []

    def fits(micro: int) -> bool:
        tried.append(micro)
        return micro <= 3

    assert choose_micro_batch(8, fits) == 2
    assert tried == [8, 4, 2]
    assert divisors_descending(12) == [12, 6, 4, 3, 2, 1]


def test_micro_batch_that_never_fits_says_how_to_fix_it():
    with pytest.raises(MemoryError, match="gradient_checkpointing"):
        choose_micro_batch(8, lambda micro: False)


# Run in a fresh process: how much of an allocation shows up as new resident memory depends on what
# the allocator already holds, and a test process that has loaded a 500 MB model holds a lot.
_PEAK_PER_JOB = """
import json, torch
from worker.training.memory import PeakMemory
memory = PeakMemory("cpu")
earlier_job = torch.ones(160 * 2**20 // 4)  # an earlier job's peak, 160 MiB resident
del earlier_job
memory.reset()
before = memory.peak_bytes()
this_job = torch.ones(48 * 2**20 // 4)
peak = memory.peak_bytes()
del this_job
print(json.dumps({"per_job": memory.per_job, "grew": peak - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_is_reset_per_job_on_cpu():
    # Both sizes are above glibc's largest mmap threshold (32 MiB): fresh pages, returned on free.
    out = subprocess.run([sys.executable, "-c", _PEAK_PER_JOB], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["per_job"]:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 44 * 2**20 <= result["grew"] < 120 * 2**20


def test_spec_switches_are_validated():
    settings = TrainingSettings(packing=False, dataloader_workers=2, optimizer="adamw_torch_fused")
    assert settings.packing is False and settings.gradient_checkpointing is False
    assert TrainingSettings().packing == "auto" and TrainingSettings().completion_only_loss is True
    with pytest.raises(pydantic.ValidationError, match="packing"):
        TrainingSettings(packing="sometimes")
    with pytest.raises(pydantic.ValidationError, match="dataloader_workers"):
        TrainingSettings(dataloader_workers=-1)


def test_precision_auto_on_cpu_is_bf16_exactly_where_the_cpu_has_it():
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")


def _run(base_path: Path, tmp: Path, name: str, **training) -> tuple[RecordingHooks, object]:
    train_file = write_jsonl(tmp / "train.jsonl", code_task_records(16, seed=8))
    # No LoRA dropout and fp32: two batch layouts of the same examples must give the same numbers.
    spec = TrainingSpec(lora=LoraSpec(dropout=0.0), seed=7, training=TrainingSettings(**{
        "max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
        "max_seq_length": 128, "precision": "fp32", "group_by_length": False, **training}))
    hooks = RecordingHooks()
    recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train_file, validation_file=None,
                        work_dir=tmp / name, hooks=hooks)
    recipe.setup()
    result = recipe.train()
    recipe.cleanup()
    return hooks, result


def test_packed_rows_and_padded_batches_train_identically_and_count_real_tokens(base_path, tmp_path):
    padded_hooks, padded = _run(base_path, tmp_path, "padded", packing=False)
    packed_hooks, packed = _run(base_path, tmp_path, "packed", packing=True, auto_micro_batch=False)
    # Rows as long as the longest example: each 4-example step runs as several forward passes.
    longest = max(len(ids) for ids in _tokenized(base_path, tmp_path))
    rows_hooks, rows = _run(base_path, tmp_path, "rows", packing=True, row_tokens=longest)
    unpadded_hooks, unpadded = _run(base_path, tmp_path, "unpadded-rows", packing=True, row_length_multiple=None,
                                    row_tokens=longest)
    assert (padded.packing, packed.packing, rows.packing) == (False, True, True)
    # On CPU auto_micro_batch runs each 4-example step as rows of at most row_tokens tokens.
    assert (packed.row_tokens, rows.micro_batch_size, rows.gradient_accumulation_steps) == (None, 4, 1)
    assert rows.row_tokens == longest
    padded_losses = [m["loss"] for m in padded_hooks.train_metrics()]
    assert len(padded_losses) == 4 and all(math.isfinite(x) for x in padded_losses)
    for hooks in (packed_hooks, rows_hooks):
        assert [m["loss"] for m in hooks.train_metrics()] == pytest.approx(padded_losses, rel=2e-3)
    # Rows padded to a multiple of 128 (the default) train as the rows as cut.
    assert [m["loss"] for m in rows_hooks.train_metrics()] == pytest.approx(
        [m["loss"] for m in unpadded_hooks.train_metrics()], rel=1e-5)
    assert any("padded to a multiple of 128" in m for m in rows_hooks.messages())
    assert not any("padded to a multiple" in m for m in unpadded_hooks.messages())
    # Padding is counted in no layout: all saw the same 16 examples' tokens.
    assert packed.trained_tokens == rows.trained_tokens == padded.trained_tokens == unpadded.trained_tokens


def _tokenized(base_path: Path, tmp: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from worker.training.data import load_examples

    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    return load_examples(tmp / "train.jsonl", tokenizer, 128).input_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_picks_the_largest_micro_batch_that_fits_and_keeps_the_effective_batch(base_path, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", code_task_records(32, seed=9))
    spec = TrainingSpec(training=TrainingSettings(max_steps=3, batch_size=1, gradient_accumulation_steps=8,
                                                  max_seq_length=128))
    hooks = RecordingHooks()
    recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train_file, validation_file=None,
                        work_dir=tmp_path / "work", hooks=hooks)
    recipe.setup()
    result = recipe.train()
    recipe.cleanup()
    # The tiny model fits all 8 examples of an optimizer step in one packed micro-batch.
    assert (result.micro_batch_size, result.gradient_accumulation_steps, result.packing) == (8, 1, True)
    assert result.steps == 3 and math.isfinite(result.final_loss)
    assert 0 < result.peak_memory_bytes < torch.cuda.get_device_properties(0).total_memory
