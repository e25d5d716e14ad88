"""Data-parallel training (training.processes 2): two CPU processes over gloo train the same steps as
one process, only rank 0 writes, a paused run resumes exactly, a dead rank fails the run, and the
process is left as it was for the next job.

Runs the recipe in this process as rank 0 (as the jobs.train task does) on the tiny model; rank 1
is a real child interpreter. Two processes sum each step's gradients in another order than one
(an all-reduce of two partial sums), so their losses are compared within a tolerance. Measured on
this model: in fp32 (an AVX2-only CPU) the per-step training losses of 2 processes and 1 differ by
at most 1.1e-7 relative; with bf16 autocast (a CPU with AVX512-BF16), whose products keep 8 bits
of mantissa, by 2.8e-5, and the adapters' weights by 0.31% of their norm. Adam divides each
gradient by its own running scale, so a weight whose gradient is rounding noise (a LoRA A matrix
while B is near zero) moves by up to the learning rate either way: the weights are compared by
norm, not element by element. A 2-process run and its resumed copy run the same reductions, so
they agree exactly.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from accelerate.state import PartialState

from app.domains.jobs.spec import LoraSpec, QuantizationSpec, TrainingSettings, TrainingSpec, processes_conflict
from tests.factories import training_ranks
from tests.worker.test_checkpoints import CheckpointHooks, train
from tests.worker.test_training_recipe import code_task_records, write_jsonl
from worker.training.batching import BatchPlan, per_process
from worker.training.distributed import RankFailed, check_processes
from worker.training.model import DeviceUnavailable
from worker.training.recipe import LoraRecipe, TrainResult

# 16 examples, 4 per optimizer step (on CPU one packed micro-batch of 4, 2 per process): 4 steps an
# epoch, 8 in 2 epochs.
BATCHES = {"batch_size": 1, "gradient_accumulation_steps": 4}
REL_TOLERANCE = 2e-4  # what the test holds the 2-process losses to (measured gaps in the docstring)
# The adapters' weights, as ||two - one|| / ||one|| per tensor (measured at most 3.1e-3).
WEIGHT_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", code_task_records(16, seed=11))


def spec_for(processes: int, dropout: float = 0.0, **training) -> TrainingSpec:
    settings = {"epochs": 2, "learning_rate": 3e-3, "max_seq_length": 128, "processes": processes, **BATCHES,
                **training}
    return TrainingSpec(training=TrainingSettings(**settings), quantization=QuantizationSpec(bits=None),
                        lora=LoraSpec(dropout=dropout), seed=7)


@dataclass
class ChildWatch(CheckpointHooks):
    """CheckpointHooks that notes this process's child processes (the other ranks) while training runs."""

    children: set[int] | None = None
    kill_at: int | None = None

    def should_stop(self):
        pids = training_ranks(os.getpid())
        self.children = (self.children or set()) | pids
        if self.kill_at is not None and self.steps_seen + 1 >= self.kill_at:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        return super().should_stop()


def wait_gone(pids: set[int], seconds: float = 10.0) -> set[int]:
    """The pids still alive (and not zombies) after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        alive = {pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def step_losses(hooks: CheckpointHooks) -> dict[int, float]:
    return {step: d["loss"] for step, d in hooks.train_logs().items()}


def distributed_state() -> tuple[bool, dict[str, str | None], int]:
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    return dist.is_initialized(), {k: os.environ.get(k) for k in keys}, torch.get_num_threads()


@pytest.fixture(scope="module")
def one_process(base_path, train_file, tmp_path_factory) -> tuple[TrainResult, dict, dict[int, float]]:
    hooks = CheckpointHooks(tmp_path_factory.mktemp("kept"))
    result, adapter = train(spec_for(1), base_path, train_file, tmp_path_factory.mktemp("one"), hooks)
    return result, adapter, step_losses(hooks)


def test_two_processes_train_the_same_steps_as_one_and_only_rank_0_writes(base_path, train_file, tmp_path,
                                                                          one_process):
    one, one_adapter, one_losses = one_process
    before = distributed_state()
    hooks = ChildWatch(tmp_path / "kept")
    two, two_adapter = train(spec_for(2), base_path, train_file, tmp_path / "two", hooks)

    assert (two.steps, two.total_steps, two.stopped) == (one.steps, one.total_steps, None) == (8, 8, None)
    assert (two.micro_batch_size, two.gradient_accumulation_steps) == (2, 1)
    # The same examples in every step: the token counts of the whole job and of each step agree exactly.
    assert two.trained_tokens == one.trained_tokens
    two_losses = step_losses(hooks)
    assert sorted(two_losses) == sorted(one_losses) == list(range(1, 9))
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=REL_TOLERANCE), step
    assert one_losses[8] < one_losses[1]
    assert one_adapter.keys() == two_adapter.keys()
    for name in one_adapter:
        gap = (two_adapter[name] - one_adapter[name]).norm() / one_adapter[name].norm()
        assert gap < WEIGHT_TOLERANCE, (name, gap)

    # Rank 0 wrote each step's metrics once; rank 1 wrote nothing, not even its (never created) folder.
    metrics_steps = [d["step"] for t, _, d in hooks.events if t == "metrics"]
    assert metrics_steps == sorted(set(metrics_steps))
    assert any("Training in 2 processes" in m for _, m, _ in hooks.events)
    assert not (tmp_path / "two" / "rank-1").exists()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "checkpoints"]
    # The child rank existed while training ran and is gone; the process is as it was before.
    assert hooks.children and len(hooks.children) == 1
    assert wait_gone(hooks.children, seconds=0) == set()
    assert distributed_state() == before
    assert not PartialState._shared_state

    # The next job in this process trains in one process, exactly as one did before the 2-process job.
    again_hooks = CheckpointHooks(tmp_path / "kept-again")
    again, again_adapter = train(spec_for(1), base_path, train_file, tmp_path / "again", again_hooks)
    assert step_losses(again_hooks) == one_losses
    assert all(torch.equal(again_adapter[k], one_adapter[k]) for k in one_adapter)
    assert again.micro_batch_size == 4


def test_ranks_with_different_numbers_of_rows_in_a_step_still_train_the_same_steps(base_path, train_file,
                                                                                   tmp_path):
    """Rows of at most 64 tokens: a rank's 2 examples of a step run as 1 or 2 rows, so the ranks run
    different numbers of forward and backward passes per step (RowTrainer syncs once per micro-batch)."""
    one_hooks, two_hooks = CheckpointHooks(tmp_path / "kept"), CheckpointHooks(tmp_path / "kept")
    one, _ = train(spec_for(1, row_tokens=64, epochs=1), base_path, train_file, tmp_path / "one", one_hooks)
    two, _ = train(spec_for(2, row_tokens=64, epochs=1), base_path, train_file, tmp_path / "two", two_hooks)
    assert two.row_tokens == one.row_tokens == 64 and two.trained_tokens == one.trained_tokens
    one_losses, two_losses = step_losses(one_hooks), step_losses(two_hooks)
    assert sorted(two_losses) == sorted(one_losses) == [1, 2, 3, 4]
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=REL_TOLERANCE), step


def test_a_two_process_run_paused_and_resumed_ends_exactly_like_an_uninterrupted_one(base_path, train_file,
                                                                                      tmp_path):
    # Dropout on: each rank's random state must come back from the checkpoint for the losses to match.
    spec = spec_for(2, dropout=0.1)
    full_hooks = CheckpointHooks(tmp_path / "kept")
    full, full_adapter = train(spec, base_path, train_file, tmp_path / "full", full_hooks)

    paused_hooks = ChildWatch(tmp_path / "kept", stop_at=6, reason="pause")
    paused, _ = train(spec, base_path, train_file, tmp_path / "paused", paused_hooks)
    assert (paused.steps, paused.stopped) == (6, "pause")
    [(step, checkpoint, _)] = paused_hooks.checkpoints  # handed over once, by rank 0
    assert step == 6
    files = {p.name for p in checkpoint.iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= files
    assert not (tmp_path / "paused" / "rank-1").exists()
    assert wait_gone(paused_hooks.children or set(), seconds=0) == set()

    resumed_hooks = ChildWatch(tmp_path / "kept")
    resumed, resumed_adapter = train(spec, base_path, train_file, tmp_path / "resumed", resumed_hooks,
                                     resume_from=checkpoint)
    assert (resumed.steps, resumed.resumed_from_step) == (8, 6)
    full_losses, resumed_losses = step_losses(full_hooks), step_losses(resumed_hooks)
    assert sorted(resumed_losses) == [7, 8]
    assert all(resumed_losses[s] == full_losses[s] for s in (7, 8))
    assert resumed.trained_tokens == full.trained_tokens
    assert all(torch.equal(full_adapter[k], resumed_adapter[k]) for k in full_adapter)
    assert wait_gone(resumed_hooks.children or set(), seconds=0) == set()


def test_a_rank_that_dies_fails_the_run_with_its_exit_and_leaves_no_process(base_path, train_file, tmp_path):
    before = distributed_state()
    hooks = ChildWatch(tmp_path / "kept", kill_at=3)
    recipe = LoraRecipe(spec=spec_for(2), base_model_path=base_path, train_file=train_file, validation_file=None,
                        work_dir=tmp_path / "work", hooks=hooks)
    start = time.monotonic()
    try:
        recipe.setup()
        with pytest.raises(RankFailed, match=r"rank 1 of 2 failed \(exit status -9\)"):
            recipe.train()
    finally:
        recipe.cleanup()
    assert time.monotonic() - start < 120  # failed at once, not after the collective timeout
    assert hooks.children and wait_gone(hooks.children, seconds=0) == set()
    assert distributed_state() == before


def test_processes_must_divide_the_effective_batch():
    assert processes_conflict(TrainingSettings(**BATCHES, processes=2), dpo=False) is None
    message, param = processes_conflict(TrainingSettings(batch_size=1, gradient_accumulation_steps=6, processes=4),
                                        dpo=False)
    assert param == "training.processes" and "must divide the effective batch" in message and "= 6" in message
    assert processes_conflict(TrainingSettings(**BATCHES, processes=2), dpo=True) is not None
    with pytest.raises(ValueError):
        TrainingSettings(processes=9)


@pytest.mark.parametrize(("plan", "processes", "expected"), [
    (BatchPlan(8, 1, True, 2048), 2, BatchPlan(4, 1, True, 2048)),
    (BatchPlan(2, 4, True), 4, BatchPlan(1, 2, False)),
    (BatchPlan(1, 8, False), 2, BatchPlan(1, 4, False)),
    (BatchPlan(6, 2, True), 4, BatchPlan(3, 1, True)),
])
def test_each_process_takes_an_equal_share_of_the_step(plan, processes, expected):
    share = per_process(plan, processes)
    assert share == expected
    assert share.micro_batch_size * share.gradient_accumulation_steps * processes == (
        plan.micro_batch_size * plan.gradient_accumulation_steps)


def test_more_cuda_processes_than_gpus_are_refused_with_the_count():
    gpus = torch.cuda.device_count()
    with pytest.raises(DeviceUnavailable, match=f"training.processes {gpus + 1}, one per GPU, and this worker has "
                                                f"{gpus} CUDA device"):
        check_processes("cuda", gpus + 1)
    check_processes("cpu", 8)  # CPU processes share the cores: any count runs
