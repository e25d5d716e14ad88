"""Validation during training: a split of the training file, the validation loss every N steps (in
events and checkpoints), early stopping, and delivering the best evaluation's adapter, resumes included.

Runs the recipe in this process on the tiny model (CPU, offline). A learning rate far above the
recipe's makes the validation loss jump around, so the best evaluation is usually not the last; its
trajectory depends on the CPU's kernels, so the `diverged` run is the first seed's (from 7) on which
it is not, and the other runs take that seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from app.domains.jobs.spec import TrainingSettings, TrainingSpec
from tests.worker.test_checkpoints import CheckpointHooks
from tests.worker.test_training_recipe import code_task_records, write_jsonl
from worker.training.callbacks import BestValidation
from worker.training.data import load_examples, record_lines, split_lines
from worker.training.recipe import LoraRecipe, TrainResult

STEPS = 6


def diverging_spec(seed: int = 7, **training: Any) -> TrainingSpec:
    """Validation after every step of a learning rate that overshoots; a checkpoint after each step."""
    settings = {"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 0.3, "max_seq_length": 128,
                "max_steps": STEPS, "validation_split": 0.25, "eval_every_steps": 1, "checkpoint_every_steps": 1,
                **training}
    return TrainingSpec(training=TrainingSettings(**settings), seed=seed)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", code_task_records(12, seed=5))


@dataclass
class Run:
    result: TrainResult
    hooks: CheckpointHooks
    adapter: dict[str, torch.Tensor]
    seed: int

    def valid_losses(self) -> dict[int, float]:
        return {d["step"]: d["valid_loss"] for t, _, d in self.hooks.events if t == "metrics" and "valid_loss" in d}

    def messages(self) -> list[tuple[str, dict[str, Any] | None]]:
        return [(m, d) for t, m, d in self.hooks.events if t == "message"]

    def checkpoint_adapter(self, step: int) -> dict[str, torch.Tensor]:
        path = next(p for s, p, _ in self.hooks.checkpoints if s == step)
        return load_file(path / "adapter_model.safetensors")


def run(spec: TrainingSpec, base_path: Path, train_file: Path, work_dir: Path, hooks: CheckpointHooks,
        resume_from: Path | None = None) -> Run:
    recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train_file, validation_file=None,
                        work_dir=work_dir, hooks=hooks, resume_from=resume_from)
    recipe.setup()
    try:
        result = recipe.train()
        if result.stopped is None:
            recipe.save(work_dir / "adapter")
    finally:
        recipe.cleanup()
    adapter = load_file(work_dir / "adapter" / "adapter_model.safetensors") if result.stopped is None else {}
    return Run(result=result, hooks=hooks, adapter=adapter, seed=spec.seed)


def first_worse(losses: dict[int, float]) -> int | None:
    """The first evaluation after the first that does not improve on every earlier one."""
    return next((s for s in sorted(losses) if s > 1 and losses[s] >= min(losses[t] for t in losses if t < s)), None)


@pytest.fixture(scope="module")
def diverged(base_path, train_file, tmp_path_factory) -> Run:
    """A run whose best evaluation is before its last and that an early stop with patience 1 ends
    before the last step: the first seed from 7 that gives one (each run takes about a second)."""
    tried = {}
    for seed in range(7, 17):
        tmp = tmp_path_factory.mktemp(f"diverged-{seed}")
        r = run(diverging_spec(seed), base_path, train_file, tmp / "work", CheckpointHooks(tmp / "kept"))
        losses = tried[seed] = r.valid_losses()
        worse = first_worse(losses)
        if min(losses, key=losses.get) < STEPS and worse is not None and worse < STEPS:
            return r
    pytest.fail(f"no seed made the validation loss rise before the last step: {tried}")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the split ---------------------------------------------------------------------------------

def test_split_holds_out_the_fraction_rounded_up_the_same_way_for_the_same_seed():
    lines = list(range(1, 21))
    split = split_lines(lines, 0.15, seed=3)
    assert len(split.valid_lines) == 3 and len(split.train_lines) == 17  # ceil(20 * 0.15)
    assert sorted(split.train_lines + split.valid_lines) == lines
    assert split_lines(lines, 0.15, seed=3) == split
    assert {split_lines(lines, 0.15, seed=s).valid_lines for s in range(10)} != {split.valid_lines}


def test_a_split_that_leaves_a_side_empty_is_refused():
    with pytest.raises(ValueError, match=r"validation_split 0.5 of the training file's 1 record\(s\) leaves 0"):
        split_lines([1], 0.5, seed=0)


def test_each_side_of_the_split_loads_only_its_records(train_file, tokenizer):
    split = split_lines(record_lines(train_file), 0.25, seed=7)
    train = load_examples(train_file, tokenizer, 128, lines=split.train_lines)
    valid = load_examples(train_file, tokenizer, 128, lines=split.valid_lines)
    everything = load_examples(train_file, tokenizer, 128)
    assert (len(train.input_ids), len(valid.input_ids)) == (9, 3)
    assert sorted(train.input_ids + valid.input_ids) == sorted(everything.input_ids)


def test_the_run_announces_and_reports_the_split(diverged):
    r = diverged.result
    assert (r.validation_source, r.validation_records) == ("split", 3)
    [(line, data)] = [(m, d) for m, d in diverged.messages() if m.startswith("Validation split:")]
    assert data == {"validation_split": 0.25, "validation_records": 3, "training_records": 9,
                    "seed": diverged.seed}
    validation = next(d for m, d in diverged.messages() if m.startswith("Validation data:"))
    assert validation["examples"] == 3


def test_a_one_record_training_file_cannot_be_split(base_path, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", code_task_records(1, seed=1))
    recipe = LoraRecipe(spec=diverging_spec(), base_model_path=base_path, train_file=one, validation_file=None,
                        work_dir=tmp_path / "work", hooks=CheckpointHooks(tmp_path / "kept"))
    with pytest.raises(ValueError, match="each side needs at least one"):
        recipe.setup()


def test_validation_settings_without_a_validation_set_are_refused_at_setup(base_path, train_file, tmp_path):
    spec = diverging_spec(validation_split=None, eval_every_steps=None, early_stopping_patience=2)
    recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train_file, validation_file=None,
                        work_dir=tmp_path / "work", hooks=CheckpointHooks(tmp_path / "kept"))
    with pytest.raises(ValueError, match="early_stopping_patience needs a validation set"):
        recipe.setup()


# ---- evaluation every N steps -------------------------------------------------------------------

def test_validation_loss_is_computed_every_n_steps_and_at_the_last(base_path, train_file, tmp_path):
    hooks = CheckpointHooks(tmp_path / "kept")
    r = run(diverging_spec(learning_rate=3e-3, eval_every_steps=2, max_steps=5, checkpoint_every_steps=2),
            base_path, train_file, tmp_path / "work", hooks)
    losses = r.valid_losses()
    assert sorted(losses) == [2, 4, 5] and all(math.isfinite(x) for x in losses.values())
    assert r.result.valid_loss == losses[5]
    # Each checkpoint is written after its step's evaluation and carries it (none at step 5: periodic
    # checkpoints fall on multiples of checkpoint_every_steps only).
    assert [(s, m.get("valid_loss")) for s, _, m in hooks.checkpoints] == [(2, losses[2]), (4, losses[4])]


def test_checkpoints_carry_the_validation_loss_of_their_step(diverged):
    losses = diverged.valid_losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert {s: m["valid_loss"] for s, _, m in diverged.hooks.checkpoints} == losses


# ---- best adapter ----------------------------------------------------------------------------------

def test_the_adapter_is_the_best_evaluations_weights_not_the_last(diverged):
    losses, r = diverged.valid_losses(), diverged.result
    best = min(losses, key=losses.get)
    assert best < STEPS, f"the validation loss did not rise, nothing to select: {losses}"
    assert (r.select_best, r.best_step, r.best_valid_loss, r.adapter_step) == ("valid_loss", best, losses[best], best)
    assert r.steps == STEPS and r.early_stopped_at_step is None and r.stopped is None
    assert _equal(diverged.adapter, diverged.checkpoint_adapter(best))
    assert not _equal(diverged.adapter, diverged.checkpoint_adapter(STEPS))
    [data] = [d for m, d in diverged.messages() if m.startswith("The adapter holds the weights of step")]
    assert data == {"select_best": "valid_loss", "best_step": best, "best_valid_loss": losses[best],
                    "last_step": STEPS, "adapter_step": best}


def test_select_best_last_delivers_the_last_steps_weights_and_still_reports_the_best(base_path, train_file, tmp_path,
                                                                                    diverged):
    r = run(diverging_spec(diverged.seed, select_best="last"), base_path, train_file, tmp_path / "work",
            CheckpointHooks(tmp_path / "kept"))
    assert (r.result.select_best, r.result.adapter_step) == ("last", STEPS)
    assert r.result.best_step == diverged.result.best_step
    assert _equal(r.adapter, r.checkpoint_adapter(STEPS))


def test_a_resumed_run_still_delivers_the_best_of_the_whole_run(base_path, train_file, tmp_path, diverged):
    best = diverged.result.best_step
    paused_hooks = CheckpointHooks(tmp_path / "kept", stop_at=best + 1, reason="pause")
    paused = run(diverging_spec(diverged.seed), base_path, train_file, tmp_path / "paused", paused_hooks)
    assert paused.result.stopped == "pause" and paused.result.steps == best + 1
    checkpoint = paused_hooks.checkpoints[-1][1]
    assert (checkpoint / BestValidation.STATE_FILE).is_file() and (checkpoint / BestValidation.WEIGHTS_FILE).is_file()

    resumed = run(diverging_spec(diverged.seed), base_path, train_file, tmp_path / "resumed",
                  CheckpointHooks(tmp_path / "kept2"), resume_from=checkpoint)
    assert resumed.result.resumed_from_step == best + 1
    assert min(resumed.valid_losses()) > best + 1  # the best was evaluated before the pause, not after
    assert (resumed.result.best_step, resumed.result.best_valid_loss) == (best, diverged.result.best_valid_loss)
    assert _equal(resumed.adapter, diverged.adapter)


# ---- early stopping ----------------------------------------------------------------------------

def test_early_stopping_ends_training_when_the_validation_loss_stops_improving(base_path, train_file, tmp_path,
                                                                              diverged):
    r = run(diverging_spec(diverged.seed, early_stopping_patience=1), base_path, train_file, tmp_path / "work",
            CheckpointHooks(tmp_path / "kept"))
    losses = diverged.valid_losses()  # the same run up to the stop
    worse = first_worse(losses)
    assert worse is not None and worse < STEPS
    res = r.result
    assert (res.steps, res.total_steps, res.early_stopped_at_step, res.stopped) == (worse, STEPS,
                                                                                   worse, None)
    assert sorted(r.valid_losses()) == list(range(1, worse + 1))
    [(line, data)] = [(m, d) for m, d in r.messages() if m.startswith("Early stopping")]
    assert f"at step {worse}" in line and data["step"] == worse and data["patience"] == 1
    assert res.best_step == data["best_step"] == min(r.valid_losses(), key=r.valid_losses().get)
    assert _equal(r.adapter, r.checkpoint_adapter(res.best_step))
    assert any("stopped early by early_stopping_patience" in m for m, _ in r.messages())

    # A worker that died after the stop's checkpoint, before storing the adapter: the resumed run
    # trains nothing more and delivers the same adapter.
    stop_checkpoint = next(p for s, p, _ in r.hooks.checkpoints if s == worse)
    again = run(diverging_spec(diverged.seed, early_stopping_patience=1), base_path, train_file, tmp_path / "again",
                CheckpointHooks(tmp_path / "kept-again"), resume_from=stop_checkpoint)
    assert (again.result.steps, again.result.early_stopped_at_step, again.result.best_step) == (
        worse, worse, res.best_step)
    assert again.valid_losses() == {} and _equal(again.adapter, r.adapter)


class _Quiet:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def on_event(self, type: str, message: str, data: Any) -> None:
        self.events.append((type, message, data))


def _evaluate(tracker: BestValidation, state: TrainerState, control: TrainerControl, step: int, loss: float) -> None:
    state.global_step = step
    tracker.on_evaluate(None, state, control, metrics={"eval_loss": loss})


def test_patience_counts_evaluations_that_miss_min_delta_and_a_nan_never_improves():
    model = torch.nn.Linear(2, 2)
    tracker = BestValidation(_Quiet(), model, patience=2, min_delta=0.1, keep_weights=True)
    state, control = TrainerState(max_steps=100), TrainerControl()
    _evaluate(tracker, state, control, 1, 2.0)
    _evaluate(tracker, state, control, 2, 1.95)  # a new best, but not by min_delta
    assert (tracker.best_step, tracker.evaluations_without_improvement) == (2, 1)
    _evaluate(tracker, state, control, 3, 1.5)  # improves by more than min_delta: the count restarts
    assert (tracker.best_step, tracker.evaluations_without_improvement, control.should_training_stop) == (3, 0, False)
    _evaluate(tracker, state, control, 4, float("nan"))
    assert (tracker.best_step, tracker.evaluations_without_improvement, control.should_training_stop) == (3, 1, False)
    _evaluate(tracker, state, control, 5, 1.45)
    assert (tracker.best_step, tracker.stopped_at_step, control.should_training_stop) == (5, 5, True)
