"""jobs.train: claim the job, run the recipe, record the outcome.

Idempotent: the claim is one conditional UPDATE, so a redelivered message for a
job that is running, finished or cancelled returns at once and trains nothing.
Each state change and event is its own short transaction; no session is held
across the training loop.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import resource
import shutil
import socket
import tarfile
import time
import traceback
from pathlib import Path

from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.core.ids import new_id
from app.core.queue import TRAIN_TASK, enqueue_job_evaluation, enqueue_training
from app.core.storage import get_storage
from app.domains.adapters import service as adapters
from app.domains.evaluations import service as evaluations
from app.domains.evaluations.spec import SamplingSpec
from app.domains.files import service as files
from app.domains.jobs import service as jobs
from app.domains.jobs.spec import TrainingSpec
from app.domains.models import service as models
from app.domains.teams.models import Team
from worker.celery_app import app

log = logging.getLogger("tuneforge.worker")


class JobHooks:
    """Connects the recipe to the database: events out, cancellation in."""

    def __init__(self, job_id: str, poll_seconds: float = 0.5) -> None:
        self.job_id = job_id
        self.poll_seconds = poll_seconds
        self._last_poll = 0.0
        self._stop = False

    def on_event(self, type: str, message: str, data: dict | None = None) -> None:
        with session_scope() as session:
            if type == "metrics":
                jobs.record_metrics(session, job_id=self.job_id, message=message, data=data or {})
            else:
                jobs.add_event(session, self.job_id, message, data=data)

    def should_stop(self) -> bool:
        """True once the job is no longer running (cancelled). Polls the database at most every
        poll_seconds, so fast steps do not turn into a query each."""
        now = time.monotonic()
        if not self._stop and now - self._last_poll >= self.poll_seconds:
            self._last_poll = now
            with session_scope() as session:
                self._stop = jobs.status_of(session, self.job_id) != "running"
        return self._stop


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> str:
    """Train one job. Returns what happened: 'not-claimed', 'succeeded', 'cancelled' or 'failed'."""
    with session_scope() as session:
        job = jobs.claim(session, job_id=job_id, worker_id=worker_id())
        if job is None:
            log.info("job %s not claimable (duplicate delivery or no longer queued)", job_id)
            return "not-claimed"
        spec = TrainingSpec.model_validate(job.spec)
        base = models.get_base(session, job.model)
        storage = get_storage()
        train_path = storage.path(files.get(session, team_id=job.team_id, file_id=job.training_file).storage_key)
        valid_path = (storage.path(files.get(session, team_id=job.team_id, file_id=job.validation_file).storage_key)
                      if job.validation_file else None)
        team_name = session.get(Team, job.team_id).name
        team_id, suffix, base_name = job.team_id, job.suffix, job.model

    work_dir = get_settings().data_dir / "work" / job_id
    try:
        outcome = _run(job_id=job_id, spec=spec, base_path=Path(base.path), train_path=train_path,
                       valid_path=valid_path, work_dir=work_dir, team_id=team_id, team_name=team_name,
                       suffix=suffix, base_name=base_name)
    except Exception as exc:
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        with session_scope() as session:
            jobs.fail(session, job_id=job_id, code="training_error", message=f"{type(exc).__name__}: {exc}"[:2000])
            jobs.end_round(session, job_id=job_id)
        outcome = "failed"
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return outcome


def _run(*, job_id: str, spec: TrainingSpec, base_path: Path, train_path: Path, valid_path: Path | None,
         work_dir: Path, team_id: str, team_name: str, suffix: str | None, base_name: str) -> str:
    from worker.training.recipe import LoraRecipe  # torch loads here, in the worker only

    cpu_start = _cpu_seconds()
    hooks = JobHooks(job_id)
    recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train_path, validation_file=valid_path,
                        work_dir=work_dir, hooks=hooks)
    try:
        recipe.setup()
        result = recipe.train()
        if hooks.should_stop():
            hooks.on_event("message", f"Training stopped at step {result.steps} of {result.total_steps}: "
                                      "the job was cancelled; no adapter was saved.")
            return "cancelled"
        adapter_dir = work_dir / "adapter"
        recipe.save(adapter_dir)
        _make_portable(adapter_dir, base_name)
    finally:
        recipe.cleanup()

    adapter_id = new_id("ftadapter")
    prefix = f"teams/{team_id}/adapters/{adapter_id}"
    storage = get_storage()
    archive = work_dir / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(adapter_dir.iterdir()):
            tar.add(path, arcname=path.name)
    storage.put_tree(adapter_dir, f"{prefix}/files")
    blob = storage.put_file(archive, f"{prefix}/adapter.tar.gz")

    name = jobs.model_name(base=base_name, team_name=team_name, suffix=suffix, job_id=job_id)
    usage = {**dataclasses.asdict(result), "cpu_seconds": _cpu_seconds() - cpu_start}
    evaluate = spec.evaluation is not None
    with session_scope() as session:
        finish = jobs.start_evaluating if evaluate else jobs.succeed
        if not finish(session, job_id=job_id, fine_tuned_model=name, trained_tokens=result.trained_tokens,
                      usage=usage):
            session.rollback()
            storage.delete(prefix)
            return "cancelled"
        adapters.create(session, adapter_id=adapter_id, team_id=team_id, job_id=job_id, base_model=base_name,
                        name=name, storage_prefix=prefix, archive_key=blob.key, size=blob.bytes, sha256=blob.sha256)
        if evaluate:
            settings = SamplingSpec.model_validate(spec.evaluation.model_dump(exclude={"tasks"}))
            evaluations.create_for_job(session, team_id=team_id, job_id=job_id, base_model=base_name,
                                       adapter_id=adapter_id, fine_tuned_model=name, tasks=spec.evaluation.tasks,
                                       settings=settings)
    if evaluate:
        enqueue_job_evaluation(job_id)
        return "evaluating"
    return "succeeded"


def _cpu_seconds() -> float:
    """CPU seconds of this process so far (user + system), for the job's compute report."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _make_portable(adapter_dir: Path, base_name: str) -> None:
    """Name the base by its registered name, not this worker's path, and drop peft's template model
    card (it repeats that path): the adapter is downloaded and served elsewhere."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (adapter_dir / "README.md").unlink(missing_ok=True)


def redispatch_stale(older_than_seconds: float | None = None) -> list[str]:
    """Re-enqueue queued jobs older than the threshold. Returns their ids."""
    seconds = older_than_seconds if older_than_seconds is not None else get_settings().redispatch_after_seconds
    with session_scope() as session:
        ids = jobs.stale_queued(session, older_than=utcnow() - dt.timedelta(seconds=seconds))
    for job_id in ids:
        enqueue_training(job_id)
    if ids:
        log.info("re-dispatched %d queued job(s): %s", len(ids), ", ".join(ids))
    return ids
