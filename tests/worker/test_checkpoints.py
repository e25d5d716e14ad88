"""Training checkpoints: pause and resume continue a run exactly; cancel writes none; periodic
checkpoints go through the real storage and database, pruned to the job's keep_checkpoints.

Runs the recipe in this process on the tiny model (CPU, offline). On CPU, in one process with the
same thread count, every kernel the run uses is deterministic, so a resumed run is compared with
an uninterrupted one exactly (torch.equal, float ==), not within a tolerance.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_pt_utils import safe_globals

from app.core.db import session_scope
from app.core.storage import get_storage
from app.domains.checkpoints import service as checkpoints_service
from app.domains.jobs.spec import QuantizationSpec, TrainingSettings, TrainingSpec
from tests.factories import create_job, uploaded_file_id
from tests.worker.test_training_recipe import code_task_records, write_jsonl
from worker.training import checkpoint_store as checkpoints
from worker.training.hooks import StopReason
from worker.training.recipe import LoraRecipe, TrainResult

# 12 examples, 4 per optimizer step: 3 steps per epoch, 6 in 2 epochs.
PACKED = {"batch_size": 1, "gradient_accumulation_steps": 4}
# One micro-batch of 2 padded examples x 2 accumulation steps, length-grouped (the Trainer's sampler).
PADDED = {"batch_size": 2, "gradient_accumulation_steps": 2, "packing": False, "auto_micro_batch": False}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", code_task_records(12, seed=5))


@dataclass
class CheckpointHooks:
    """TrainingHooks that answers `reason` from the `stop_at`-th step on and copies every checkpoint
    handed to it (or uploads it through worker.training.checkpoint_store when `upload` is set)."""

    keep_dir: Path
    stop_at: int | None = None
    reason: StopReason = "pause"
    upload: dict[str, Any] | None = None
    events: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    checkpoints: list[tuple[int, Path, dict[str, Any]]] = field(default_factory=list)
    steps_seen: int = 0

    def on_event(self, type: str, message: str, data: dict[str, Any] | None) -> None:
        self.events.append((type, message, data))

    def should_stop(self) -> StopReason | None:
        self.steps_seen += 1
        return self.reason if self.stop_at is not None and self.steps_seen >= self.stop_at else None

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        assert (path / "trainer_state.json").is_file()
        if self.upload is not None:
            checkpoints.upload(step=step, local_dir=path, metrics=metrics, **self.upload)
        kept = self.keep_dir / f"step-{step}"
        shutil.copytree(path, kept)
        self.checkpoints.append((step, kept, metrics))

    def train_logs(self) -> dict[int, dict[str, Any]]:
        return {d["step"]: d for t, _, d in self.events if t == "metrics" and "loss" in d}


def spec_for(quantized: bool = True, **training: Any) -> TrainingSpec:
    settings = {"epochs": 2, "learning_rate": 3e-3, "max_seq_length": 128, **PACKED, **training}
    quantization = QuantizationSpec() if quantized else QuantizationSpec(bits=None)
    return TrainingSpec(training=TrainingSettings(**settings), quantization=quantization, seed=7)


def train(spec: TrainingSpec, base_path: Path, train_file: Path, work_dir: Path, hooks: CheckpointHooks,
          resume_from: Path | None = None, validation_file: Path | None = None,
          ) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """Run the recipe; (its result, the saved adapter's tensors)."""
    recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train_file, validation_file=validation_file,
                        work_dir=work_dir, hooks=hooks, resume_from=resume_from)
    recipe.setup()
    try:
        result = recipe.train()
        recipe.save(work_dir / "adapter")
    finally:
        recipe.cleanup()
    return result, load_file(work_dir / "adapter" / "adapter_model.safetensors")


# The packed plan on the 4-bit base is what a job gets on CPU by default; the padded plan runs
# unquantized, to keep the test short.
@pytest.mark.parametrize(("batches", "quantized"), [(PACKED, True), (PADDED, False)],
                         ids=["packed-4bit", "padded-length-grouped"])
def test_paused_run_resumed_from_its_checkpoint_ends_exactly_like_an_uninterrupted_run(
        base_path, train_file, tmp_path, batches, quantized):
    spec = spec_for(quantized, **batches)
    full_hooks = CheckpointHooks(tmp_path / "kept")
    full, full_adapter = train(spec, base_path, train_file, tmp_path / "full", full_hooks)
    assert full.steps == full.total_steps == 6 and full.stopped is None and full_hooks.checkpoints == []

    # Step 4 is in the second epoch, whose shuffle a resumed run must reproduce.
    paused_hooks = CheckpointHooks(tmp_path / "kept", stop_at=4, reason="pause")
    paused, _ = train(spec, base_path, train_file, tmp_path / "paused", paused_hooks)
    assert (paused.steps, paused.total_steps, paused.stopped) == (4, 6, "pause")
    [(step, checkpoint, metrics)] = paused_hooks.checkpoints
    assert step == 4 and metrics.keys() == {"step", "train_loss", "train_mean_token_accuracy"}
    assert metrics["step"] == 4 and metrics["train_loss"] == paused.final_loss
    assert 0 <= metrics["train_mean_token_accuracy"] <= 1
    assert not (tmp_path / "paused" / "checkpoints" / "checkpoint-4").exists()  # handed over, then deleted

    resumed_hooks = CheckpointHooks(tmp_path / "kept")
    resumed, resumed_adapter = train(spec, base_path, train_file, tmp_path / "resumed", resumed_hooks,
                                     resume_from=checkpoint)
    assert (resumed.steps, resumed.total_steps, resumed.resumed_from_step) == (6, 6, 4)
    # Same data position: the steps after the checkpoint see the same batches (token counts) with
    # the same random draws (dropout), so every logged loss and the final adapter are identical.
    full_logs, resumed_logs = full_hooks.train_logs(), resumed_hooks.train_logs()
    assert sorted(resumed_logs) == [5, 6]
    for s in (5, 6):
        assert resumed_logs[s]["loss"] == full_logs[s]["loss"]
        assert resumed_logs[s]["trained_tokens"] == full_logs[s]["trained_tokens"]
    assert resumed.final_loss == full.final_loss
    assert resumed.trained_tokens == full.trained_tokens
    assert full_adapter.keys() == resumed_adapter.keys()
    assert all(torch.equal(full_adapter[k], resumed_adapter[k]) for k in full_adapter)


def valid_logs(hooks: CheckpointHooks) -> dict[int, float]:
    return {d["step"]: d["valid_loss"] for t, _, d in hooks.events if t == "metrics" and "valid_loss" in d}


@pytest.mark.parametrize("stop", ["pause", "periodic"])
def test_a_checkpoint_at_an_epochs_last_step_holds_its_validation_and_a_resumed_run_keeps_every_one(
        base_path, train_file, tmp_path, stop):
    """Validation runs at each epoch's end. A checkpoint written at that step (a pause, or a periodic
    one) comes after it, so its metrics hold the epoch's validation loss, and a run resumed from it
    (the epoch counted as done) still has one validation per epoch, equal to an uninterrupted run's."""
    validation = write_jsonl(tmp_path / "valid.jsonl", code_task_records(4, seed=9))
    spec = spec_for(checkpoint_every_steps=3 if stop == "periodic" else None)
    full_hooks = CheckpointHooks(tmp_path / "kept-full")
    train(spec, base_path, train_file, tmp_path / "full", full_hooks, validation_file=validation)
    full_valid = valid_logs(full_hooks)
    assert sorted(full_valid) == [3, 6]

    # Step 3 is the first epoch's last.
    hooks = CheckpointHooks(tmp_path / "kept", stop_at=3 if stop == "pause" else None)
    first, _ = train(spec, base_path, train_file, tmp_path / "first", hooks, validation_file=validation)
    assert first.stopped == ("pause" if stop == "pause" else None)
    step, checkpoint, metrics = hooks.checkpoints[0]
    assert step == 3 and metrics["valid_loss"] == full_valid[3]
    messages = [m for _, m, _ in hooks.events]
    validated = messages.index(f"Step 3: validation loss {full_valid[3]:.4f}")
    assert validated < messages.index("Checkpoint saved at step 3")

    resumed_hooks = CheckpointHooks(tmp_path / "kept-resumed")
    resumed, _ = train(spec, base_path, train_file, tmp_path / "resumed", resumed_hooks, resume_from=checkpoint,
                       validation_file=validation)
    assert resumed.resumed_from_step == 3
    assert {**{3: metrics["valid_loss"]}, **valid_logs(resumed_hooks)} == full_valid


def _as_bitsandbytes_state(path: Path) -> None:
    """Replace a torch AdamW optimizer.pt with the state bitsandbytes' 8-bit AdamW writes for the same
    parameters and groups, as a checkpoint from a GPU worker holds (the 8-bit optimizer steps on CPU too)."""
    import bitsandbytes as bnb

    saved = torch.load(path, weights_only=True)
    params = {i: torch.nn.Parameter(torch.randn_like(entry["exp_avg"])) for i, entry in saved["state"].items()}
    groups = [{"params": [params[i] for i in g["params"]], "lr": g["lr"]} for g in saved["param_groups"]]
    optimizer = bnb.optim.AdamW8bit(groups)
    for param in params.values():
        param.grad = torch.randn_like(param)
    optimizer.step()
    state = optimizer.state_dict()
    assert "exp_avg" not in next(iter(state["state"].values()))
    torch.save(state, path)


def test_a_checkpoint_of_the_other_optimizer_family_resumes_with_fresh_moments(base_path, train_file, tmp_path):
    spec = spec_for(quantized=False, **PADDED)
    full_hooks = CheckpointHooks(tmp_path / "kept")
    full, _ = train(spec, base_path, train_file, tmp_path / "full", full_hooks)
    paused_hooks = CheckpointHooks(tmp_path / "kept", stop_at=4, reason="pause")
    train(spec, base_path, train_file, tmp_path / "paused", paused_hooks)
    [(_, checkpoint, _)] = paused_hooks.checkpoints
    _as_bitsandbytes_state(checkpoint / "optimizer.pt")

    resumed_hooks = CheckpointHooks(tmp_path / "kept-resumed")
    resumed, adapter = train(spec, base_path, train_file, tmp_path / "resumed", resumed_hooks, resume_from=checkpoint)
    assert (resumed.steps, resumed.total_steps, resumed.resumed_from_step) == (6, 6, 4)
    notes = [m for t, m, _ in resumed_hooks.events if t == "message" and "optimizer state is bitsandbytes's" in m]
    assert len(notes) == 1 and "moments start afresh" in notes[0]
    full_logs, resumed_logs = full_hooks.train_logs(), resumed_hooks.train_logs()
    assert sorted(resumed_logs) == [5, 6]
    for step in (5, 6):  # the schedule and the data position carry on: same learning rate, same batches
        assert resumed_logs[step]["learning_rate"] == full_logs[step]["learning_rate"]
        assert resumed_logs[step]["trained_tokens"] == full_logs[step]["trained_tokens"]
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_checkpoint_holds_no_pickle_that_needs_unrestricted_loading(base_path, train_file, tmp_path):
    hooks = CheckpointHooks(tmp_path / "kept", stop_at=1, reason="shutdown")
    result, _ = train(spec_for(quantized=False, max_steps=2), base_path, train_file, tmp_path / "run", hooks)
    assert result.stopped == "shutdown"
    [(step, checkpoint, _)] = hooks.checkpoints
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= names
    assert "training_args.bin" not in names
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        # The Trainer's own allowlist: numpy's RNG state (an ndarray) on top of torch's safe types.
        with safe_globals():
            assert torch.load(checkpoint / name, weights_only=True)


def test_cancel_stops_without_a_checkpoint_while_periodic_ones_are_written(base_path, train_file, tmp_path):
    hooks = CheckpointHooks(tmp_path / "kept", stop_at=2, reason="cancel")
    result, _ = train(spec_for(quantized=False, max_steps=4, checkpoint_every_steps=1), base_path, train_file,
                      tmp_path / "run", hooks)
    assert (result.steps, result.stopped, result.stopped is not None) == (2, "cancel", True)
    assert [step for step, _, _ in hooks.checkpoints] == [1]


def test_resuming_from_the_final_steps_checkpoint_trains_nothing_and_keeps_its_adapter(base_path, train_file,
                                                                                       tmp_path):
    # A worker that died after its last checkpoint but before storing the adapter.
    spec = spec_for(quantized=False, max_steps=2, checkpoint_every_steps=2)
    hooks = CheckpointHooks(tmp_path / "kept")
    full, full_adapter = train(spec, base_path, train_file, tmp_path / "full", hooks)
    [(step, checkpoint, _)] = hooks.checkpoints
    assert step == full.steps == 2
    resumed_hooks = CheckpointHooks(tmp_path / "kept-resumed")
    resumed, resumed_adapter = train(spec, base_path, train_file, tmp_path / "resumed", resumed_hooks,
                                     resume_from=checkpoint)
    assert (resumed.steps, resumed.total_steps, resumed.resumed_from_step) == (2, 2, 2)
    assert resumed_hooks.train_logs() == {} and resumed_hooks.checkpoints == []
    assert all(torch.equal(full_adapter[k], resumed_adapter[k]) for k in full_adapter)


def test_periodic_checkpoints_without_on_checkpoint_hooks_are_refused(base_path, train_file, tmp_path):
    class EventsOnly:
        def on_event(self, type, message, data):
            pass

        def should_stop(self):
            return False

    with pytest.raises(TypeError, match="checkpoint_every_steps"):
        LoraRecipe(spec=spec_for(checkpoint_every_steps=2), base_model_path=base_path, train_file=train_file,
                   validation_file=None, work_dir=tmp_path, hooks=EventsOnly())


def test_periodic_checkpoints_are_stored_pruned_and_the_latest_resumes(api, make_team, tiny_model, base_path,
                                                                       train_file, tmp_path):
    team_id, key = make_team()
    client = api(key)
    job_id = create_job(client, uploaded_file_id(client))["id"]
    client.post(f"/fine_tuning/jobs/{job_id}/cancel")  # only its row is needed here, not a worker's run
    spec = spec_for(quantized=False, max_steps=5, checkpoint_every_steps=2, keep_checkpoints=1)
    hooks = CheckpointHooks(tmp_path / "kept", upload={"job_id": job_id, "team_id": team_id,
                                                       "keep": spec.training.keep_checkpoints})
    full, full_adapter = train(spec, base_path, train_file, tmp_path / "full", hooks)
    assert full.steps == 5
    assert [step for step, _, _ in hooks.checkpoints] == [2, 4]

    storage = get_storage()
    prefix = f"teams/{team_id}/jobs/{job_id}/checkpoints"
    assert not storage.exists(f"{prefix}/step-00000002")
    assert storage.exists(f"{prefix}/step-00000004/adapter_model.safetensors")
    with session_scope() as session:
        latest = checkpoints_service.latest(session, job_id)
        page = checkpoints_service.list_page(session, team_id=team_id, job_id=job_id, after=None, limit=10)
    assert (latest.step, latest.storage_prefix) == (4, f"{prefix}/step-00000004")
    assert latest.bytes == sum(p.stat().st_size for p in hooks.checkpoints[-1][1].rglob("*") if p.is_file())
    assert [c.step_number for c in page.data] == [4]
    assert page.data[0].metrics.train_loss == hooks.train_logs()[4]["loss"]

    step, local = checkpoints.download_latest(job_id=job_id, dest=tmp_path / "download")
    assert step == 4 and (local / "optimizer.pt").is_file()
    resumed_hooks = CheckpointHooks(tmp_path / "kept-resumed")
    resumed, resumed_adapter = train(spec, base_path, train_file, tmp_path / "resumed", resumed_hooks,
                                     resume_from=local)
    assert (resumed.steps, resumed.resumed_from_step, resumed.final_loss) == (5, 4, full.final_loss)
    assert all(torch.equal(full_adapter[k], resumed_adapter[k]) for k in full_adapter)


def test_download_latest_without_checkpoints_is_none(api, make_team, tiny_model, tmp_path):
    _, key = make_team()
    client = api(key)
    job_id = create_job(client, uploaded_file_id(client))["id"]
    client.post(f"/fine_tuning/jobs/{job_id}/cancel")
    assert checkpoints.download_latest(job_id=job_id, dest=tmp_path) is None
