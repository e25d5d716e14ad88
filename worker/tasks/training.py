"""jobs.train: claim the job, run the recipe, record the outcome.

A job with training.processes > 1 trains data-parallel: this task's process is rank 0 and the
recipe starts and ends the other ranks (worker.training.distributed), which write nothing; the
lease, the events, checkpoints and the adapter stay here.

Idempotent: the claim is one conditional UPDATE, so a redelivered message for a job that is
running (leased), finished or cancelled returns at once and trains nothing. The claim gives this
worker a lease that a heartbeat thread renews; everything the task writes afterwards is
conditional on still holding it, so a worker that lost its lease (the reaper requeued its job)
stops and writes nothing. Each step is one short transaction (claim, training_inputs, then
finish_training, release or fail); no session is held across the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import traceback
from pathlib import Path

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.queue import TRAIN_TASK
from app.domains.jobs import lease as job_lease
from app.domains.jobs import results
from app.domains.jobs.states import JobStatus
from worker.celery_app import app
from worker.lease import Lease, claim_work_dir, retry_db, worker_id
from worker.staging import stage_base, stage_file, stage_tree
from worker.training import checkpoint_store as checkpoints
from worker.training.artifacts import store_adapter
from worker.training.hooks import CostLimits, StopReason
from worker.training.job_hooks import JobHooks
from worker.training.trackers import TrackerConfig, Trackers

log = logging.getLogger("tuneforge.worker")


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> str:
    """Train one job. Returns what happened: 'not-claimed', 'succeeded', 'evaluating', 'cancelled',
    'paused', 'queued' (handed back at shutdown; re-enqueued), 'lost' (lease lost) or 'failed' (also
    when it passed its team's trained_tokens or job_wall_seconds limit: code cost_limit_exceeded)."""
    settings = get_settings()
    with session_scope() as session:
        job = job_lease.claim(session, job_id=job_id, worker_id=worker_id(), lease_seconds=settings.lease_seconds,
                              max_attempts=settings.max_attempts)
        if job is None:
            log.info("job %s not claimable (duplicate delivery, leased elsewhere or no longer queued)", job_id)
            return "not-claimed"
        token = job.lease_token
    # The claim is committed: from here on every way out settles the job, so a job whose inputs
    # vanished (a deleted file or base model) fails with the reason instead of coming back forever.
    try:
        with session_scope() as session:
            inputs = job_lease.training_inputs(session, job_id=job_id)
    except Exception as exc:
        log.error("job %s cannot start:\n%s", job_id, traceback.format_exc())
        return _fail(job_id, token, exc)

    if inputs.spec.device != "any" or inputs.spec.training.processes > 1:
        from worker.training.distributed import check_processes
        from worker.training.model import DeviceUnavailable, select_device

        try:
            check_processes(select_device(inputs.spec.device), inputs.spec.training.processes)
        except DeviceUnavailable as exc:
            log.error("job %s: %s", job_id, exc)
            return _fail(job_id, token, exc, code="device_unavailable")

    renew = lambda session: job_lease.renew(session, job_id=job_id, lease_token=token,  # noqa: E731
                                            lease_seconds=settings.lease_seconds)
    with claim_work_dir(job_id, token) as work_dir, Lease(f"job {job_id}", token, renew) as lease:
        try:
            return _run(inputs, lease, work_dir)
        except Exception as exc:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            return _fail(job_id, token, exc)


def _run(inputs: job_lease.TrainingInputs, lease: Lease, work_dir: Path) -> str:
    """Train with the job's trackers around the recipe (worker.training.trackers), and end their runs
    with the job's outcome."""
    cpu_start = _cpu_seconds()
    spec = inputs.spec
    trackers = Trackers(_tracker_config(inputs, work_dir),
                        JobHooks(inputs.job_id, inputs.team_id, lease, spec.training.keep_checkpoints))
    trackers.start()
    status = "failed"
    try:
        status = _train(inputs, lease, work_dir, trackers, cpu_start)
        return status
    finally:
        trackers.close(status)


def _train(inputs: job_lease.TrainingInputs, lease: Lease, work_dir: Path, hooks: Trackers, cpu_start: float) -> str:
    """Setup, train, save, cleanup; then store the adapter (and the TensorBoard files) and record the job."""
    from worker.training.recipe import LoraRecipe  # torch loads here, in the worker only

    spec = inputs.spec
    latest = checkpoints.download_latest(job_id=inputs.job_id, dest=work_dir / "resume")
    base_dir = stage_base(inputs.base_path)  # staged from storage when registered there
    recipe = LoraRecipe(spec=spec, base_model_path=base_dir, train_file=stage_file(inputs.train_key),
                        validation_file=stage_file(inputs.valid_key) if inputs.valid_key else None,
                        work_dir=work_dir, hooks=hooks, resume_from=latest[1] if latest else None,
                        limits=CostLimits(trained_tokens=inputs.trained_tokens_limit,
                                          wall_seconds=inputs.wall_seconds_limit),
                        init_adapter=stage_tree(inputs.init_adapter_prefix) if inputs.init_adapter_prefix else None)
    adapter_dir = work_dir / "adapter"
    try:
        recipe.setup()
        result = recipe.train()
        if result.stopped == "limit":
            return _fail(inputs.job_id, lease.token, CostLimitPassed(
                f"Training stopped at step {result.steps} of {result.total_steps}: {result.limit_message}. Raise "
                "the limit (tuneforge admin set-quota), or train fewer tokens."), code="cost_limit_exceeded")
        if result.stopped:
            saved = "no adapter was saved" if result.stopped == "cancel" else "a checkpoint was saved to continue from"
            return _stop(inputs.job_id, lease.token, result.stopped,
                         f"Training stopped at step {result.steps} of {result.total_steps}: {saved}.")
        recipe.save(adapter_dir)
    finally:
        recipe.cleanup()
    board = hooks.end_training(work_dir / "tensorboard.tar.gz")
    if board is not None:
        retry_db(lambda: _attach_archive(inputs, lease.token, board, "tensorboard.tar.gz"))

    adapter = store_adapter(adapter_dir, team_id=inputs.team_id, base_model=inputs.base_model, work_dir=work_dir)
    usage = {**dataclasses.asdict(result), "cpu_seconds": _cpu_seconds() - cpu_start}

    def finish() -> str:
        with session_scope() as session:
            status = job_lease.finish_training(session, inputs=inputs, lease_token=lease.token, adapter=adapter,
                                               trained_tokens=result.trained_tokens, usage=usage)
        return str(status) if status else "lost"

    return retry_db(finish)


def _tracker_config(inputs: job_lease.TrainingInputs, work_dir: Path) -> TrackerConfig:
    """The job's trackers as the operator's settings configure them (see TrackerSettings)."""
    settings = get_settings()
    t = settings.trackers
    key = t.wandb_api_key.get_secret_value() if t.wandb_api_key is not None else None
    mode = t.wandb_mode if t.wandb_mode != "auto" else ("online" if key else "offline")
    return TrackerConfig(
        job_id=inputs.job_id, team_id=inputs.team_id, model=inputs.base_model, spec=inputs.spec, wandb_mode=mode,
        wandb_dir=(t.wandb_dir or settings.data_dir / "trackers" / "wandb") / inputs.job_id, wandb_api_key=key,
        wandb_base_url=t.wandb_base_url, wandb_init_timeout=t.wandb_init_timeout_seconds,
        mlflow_uri=settings.mlflow_tracking_uri or None, mlflow_experiment=t.mlflow_experiment,
        tensorboard_dir=work_dir / "tensorboard")


def _attach_archive(inputs: job_lease.TrainingInputs, token: str, path: Path, filename: str) -> None:
    """Add a file the job wrote to its result_files, while this worker holds its lease."""
    with session_scope() as session:
        if job_lease.holds(session, job_id=inputs.job_id, lease_token=token):
            results.attach_archive(session, job_id=inputs.job_id, team_id=inputs.team_id, path=path,
                                   filename=filename)


class CostLimitPassed(Exception):
    """The job passed one of its team's cost limits while training."""


def _fail(job_id: str, token: str, exc: Exception, *, code: str = "training_error") -> str:
    message = str(exc) if isinstance(exc, CostLimitPassed) else f"{type(exc).__name__}: {exc}"

    def write() -> str:
        with session_scope() as session:
            failed = job_lease.fail(session, job_id=job_id, code=code, lease_token=token, message=message[:2000])
        return str(JobStatus.FAILED) if failed else "lost"

    return retry_db(write)


def _stop(job_id: str, token: str, reason: StopReason, message: str) -> str:
    """Settle a job whose training stopped early (see jobs.lease.release); 'lost' when it is not ours."""
    def write() -> str:
        with session_scope() as session:
            status = job_lease.release(session, job_id=job_id, lease_token=token, reason=reason, message=message)
        return str(status) if status else "lost"

    return retry_db(write)


def _cpu_seconds() -> float:
    """CPU seconds of this process so far (user + system), for the job's compute report."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime
