"""Stopping inside an optimizer step: a cancel between micro-batches (and between the rows of a CPU
step) and a passed cost limit end training there, dropping the partial step, with no checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.worker.test_training_recipe import RecordingHooks, code_task_records, spec_for, write_jsonl
from worker.training.hooks import CostLimits
from worker.training.recipe import LoraRecipe


@dataclass
class CancelMidStep(RecordingHooks):
    """Answers cancel_requested() True from its `cancel_at`-th call on."""

    cancel_at: int = 1_000_000
    asked: int = 0

    def cancel_requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.cancel_at


def _train(tmp_path: Path, base_path: Path, hooks: RecordingHooks, *, limits: CostLimits | None = None,
           **training):
    train_file = write_jsonl(tmp_path / "train.jsonl", code_task_records(16, seed=3))
    recipe = LoraRecipe(spec=spec_for(epochs=1, **training), base_model_path=base_path, train_file=train_file,
                        validation_file=None, work_dir=tmp_path / "work", hooks=hooks, limits=limits)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


def _checkpoints(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "work" / "checkpoints").glob("checkpoint-*"))


def test_a_cancel_between_micro_batches_abandons_the_step_in_progress(tmp_path, base_path):
    # 4 micro-batches a step: asked after micro-batches 1-3 of step 1, then 1-2 of step 2.
    hooks = CancelMidStep(cancel_at=5)
    result = _train(tmp_path, base_path, hooks, gradient_accumulation_steps=4, auto_micro_batch=False)
    assert result.stopped == "cancel" and hooks.asked == 5
    assert result.steps == 1 and result.total_steps == 4  # the partial second step is not counted
    assert hooks.steps_seen == 1  # should_stop() ran at step 1's end only
    assert hooks.checkpoint_steps == [] and _checkpoints(tmp_path) == []
    assert any("step 2 is abandoned in mid-step" in m for m in hooks.messages())
    assert [d["step"] for d in hooks.train_metrics()] == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="rows are how CPU steps run")
def test_a_cancel_between_the_rows_of_a_cpu_step_abandons_it(tmp_path, base_path):
    # The whole effective batch (8 examples) is one CPU micro-batch, run as rows of a few examples each.
    hooks = CancelMidStep(cancel_at=2)
    result = _train(tmp_path, base_path, hooks, gradient_accumulation_steps=8, row_tokens=32,
                    row_length_multiple=None)
    assert result.row_tokens == 32 and result.gradient_accumulation_steps == 1
    assert result.stopped == "cancel" and result.steps == 0 and hooks.asked == 2
    assert hooks.train_metrics() == [] and _checkpoints(tmp_path) == []


@pytest.mark.parametrize(("limits", "says"), [
    (CostLimits(trained_tokens=1), "past its limit of 1 tokens per job"),
    (CostLimits(wall_seconds=0), "past its limit of 0 s per run"),
])
def test_a_run_past_its_cost_limit_stops_after_the_micro_batch_that_passed_it(tmp_path, base_path, limits, says):
    hooks = RecordingHooks()
    result = _train(tmp_path, base_path, hooks, limits=limits, gradient_accumulation_steps=2, auto_micro_batch=False)
    assert result.stopped == "limit" and says in (result.limit_message or "")
    assert result.steps == 0 and 0 < result.trained_tokens
    assert hooks.steps_seen == 0 and _checkpoints(tmp_path) == []
    assert any(m.startswith("Cost limit passed: ") for m in hooks.messages())
    assert any(m.startswith("Training stopped at a cost limit at step 0") for m in hooks.messages())


def test_generous_limits_leave_the_run_alone(tmp_path, base_path):
    hooks = RecordingHooks()
    result = _train(tmp_path, base_path, hooks, limits=CostLimits(trained_tokens=10**9, wall_seconds=3600),
                    max_steps=2, auto_micro_batch=False)
    assert result.stopped is None and result.steps == 2 and result.limit_message is None
