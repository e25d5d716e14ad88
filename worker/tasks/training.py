"""jobs.train: claim the job, run the recipe, record the outcome; and the reaper.

Idempotent: the claim is one conditional UPDATE, so a redelivered message for a
job that is running (leased), finished or cancelled returns at once and trains
nothing. The claim gives this worker a lease that a heartbeat thread renews;
everything the task writes afterwards is conditional on still holding it, so a
worker that lost its lease (the reaper requeued its job) stops and writes
nothing. Each state change and event is its own short transaction; no session
is held across the training loop.
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
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

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
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.spec import TrainingSpec
from app.domains.models import service as models
from app.domains.teams.models import Team
from worker.celery_app import app
from worker.tasks import checkpoints
from worker.training.hooks import StopReason

log = logging.getLogger("tuneforge.worker")
T = TypeVar("T")
# Set when this worker process is asked to stop (worker.celery_app forwards Celery's warm shutdown
# here): the running job checkpoints, is handed back to the queue, and the task returns.
SHUTDOWN = threading.Event()
# The database being unreachable; a holder rides this out for up to its lease.
DB_DOWN = (OperationalError, InterfaceError)


class Lease:
    """A claim's lease, renewed by a daemon thread every worker_heartbeat_seconds with `renew(session)`,
    which extends it and says whether it is still held. `lost` is set when a renewal finds the
    lease taken away, or none succeeded for lease_seconds (the database was unreachable that long,
    so the reaper may already have requeued the work). `name` labels the log lines."""

    def __init__(self, name: str, token: str, renew: Callable[[Any], bool]) -> None:
        settings = get_settings()
        self.name, self.token, self._renew = name, token, renew
        self.seconds, self.interval = settings.lease_seconds, settings.worker_heartbeat_seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{name}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.interval) and not self.lost.is_set():
            try:
                with session_scope() as session:
                    held = self._renew(session)
            except DB_DOWN as exc:
                log.warning("lease renewal of %s failed: %s", self.name, exc)
                held = time.monotonic() - self._renewed < self.seconds
            else:
                self._renewed = time.monotonic() if held else self._renewed
            if not held:
                log.warning("%s: lease lost; stopping without writing anything", self.name)
                self.lost.set()


class JobHooks:
    """Connects the recipe to the database as the lease holder: events and checkpoints out, cancel
    and pause requests, a lost lease and the worker's shutdown in. Nothing is written once the lease
    is lost; a database outage drops events rather than aborting training."""

    def __init__(self, job_id: str, team_id: str, lease: Lease, keep_checkpoints: int,
                 poll_seconds: float = 0.5) -> None:
        self.job_id, self.team_id, self.lease, self.keep = job_id, team_id, lease, keep_checkpoints
        self.poll_seconds = poll_seconds
        self._last_poll = 0.0
        self._view: str | None = None

    def on_event(self, type: str, message: str, data: dict | None = None) -> None:
        if self.lease.lost.is_set():
            return
        try:
            with session_scope() as session:
                if type == "metrics":
                    jobs.record_metrics(session, job_id=self.job_id, lease_token=self.lease.token, message=message,
                                        data=data or {})
                elif jobs.holds(session, job_id=self.job_id, lease_token=self.lease.token):
                    jobs.add_event(session, self.job_id, message, data=data)
        except DB_DOWN as exc:
            log.warning("job %s: event dropped, database unreachable: %s", self.job_id, exc)

    def should_stop(self) -> StopReason | None:
        """"cancel" when cancel was requested or the lease is lost (stop, no checkpoint); "pause" when
        pause was requested; "shutdown" when the worker is stopping. Polls the database at most every
        poll_seconds, so fast steps do not turn into a query each."""
        now = time.monotonic()
        if self._view is None and now - self._last_poll >= self.poll_seconds:
            self._last_poll = now
            try:
                with session_scope() as session:
                    self._view = jobs.holder_view(session, job_id=self.job_id, lease_token=self.lease.token)
            except DB_DOWN as exc:
                log.warning("job %s: stop check skipped, database unreachable: %s", self.job_id, exc)
        if self.lease.lost.is_set() or self._view in ("lost", "cancel"):
            return "cancel"
        if self._view == "pause":
            return "pause"
        return "shutdown" if SHUTDOWN.is_set() else None

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Upload the checkpoint while this worker still holds the lease. Through a database outage
        it retries for up to a lease (past it the lease is gone and the upload would be refused)."""
        def upload() -> None:
            if self.lease.lost.is_set():
                return
            with session_scope() as session:
                if not jobs.holds(session, job_id=self.job_id, lease_token=self.lease.token):
                    return
            checkpoints.upload(job_id=self.job_id, team_id=self.team_id, step=step, local_dir=path,
                               metrics=metrics, keep=self.keep)

        _retry_db(upload, seconds=get_settings().lease_seconds)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _retry_db(write: Callable[[], T], *, seconds: float) -> T:
    """Run a final write, retrying while the database is unreachable (a restart), for up to `seconds`
    (the lease: past it the reaper owns the job and the write would be refused anyway)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return write()
        except DB_DOWN:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> str:
    """Train one job. Returns what happened: 'not-claimed', 'succeeded', 'evaluating', 'cancelled',
    'paused', 'queued' (handed back at shutdown; re-enqueued), 'lost' (lease lost) or 'failed'."""
    settings = get_settings()
    with session_scope() as session:
        job = jobs.claim(session, job_id=job_id, worker_id=worker_id(), lease_seconds=settings.lease_seconds,
                         max_attempts=settings.max_attempts)
        if job is None:
            log.info("job %s not claimable (duplicate delivery, leased elsewhere or no longer queued)", job_id)
            return "not-claimed"
        token = job.lease_token
    # The claim is committed: from here on every way out settles the job, so a job whose inputs
    # vanished (a deleted file or base model) fails with the reason instead of coming back forever.
    try:
        with session_scope() as session:
            job = session.get(FineTuningJob, job_id)
            spec = TrainingSpec.model_validate(job.spec)
            base = models.get_base(session, job.model)
            if base is None:
                raise LookupError(f"base model {job.model!r} is no longer registered")
            storage = get_storage()
            train_path = storage.path(files.get(session, team_id=job.team_id, file_id=job.training_file).storage_key)
            valid_path = (storage.path(files.get(session, team_id=job.team_id,
                                                 file_id=job.validation_file).storage_key)
                          if job.validation_file else None)
            team_name = session.get(Team, job.team_id).name
            team_id, suffix, base_name = job.team_id, job.suffix, job.model
    except Exception as exc:
        log.error("job %s cannot start:\n%s", job_id, traceback.format_exc())
        return _retry_db(lambda error=exc: _fail(job_id, token, error), seconds=settings.lease_seconds)

    work_dir = settings.data_dir / "work" / job_id
    def renew(session) -> bool:
        return jobs.renew(session, job_id=job_id, lease_token=token, lease_seconds=settings.lease_seconds)

    with Lease(f"job {job_id}", token, renew) as lease:
        try:
            outcome = _run(job_id=job_id, lease=lease, spec=spec, base_path=Path(base.path), train_path=train_path,
                           valid_path=valid_path, work_dir=work_dir, team_id=team_id, team_name=team_name,
                           suffix=suffix, base_name=base_name)
        except Exception as exc:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            outcome = _retry_db(lambda error=exc: _fail(job_id, token, error), seconds=settings.lease_seconds)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    if outcome == "queued":
        enqueue_training(job_id)
    return outcome


def _fail(job_id: str, token: str, exc: Exception) -> str:
    with session_scope() as session:
        if not jobs.fail(session, job_id=job_id, code="training_error", lease_token=token,
                         message=f"{type(exc).__name__}: {exc}"[:2000]):
            return "lost"
        jobs.end_round(session, job_id=job_id)
    return "failed"


def _stop(job_id: str, token: str, reason: StopReason, message: str) -> str:
    """Settle a job whose training stopped early (see jobs.release); 'lost' when it is not ours."""
    with session_scope() as session:
        status = jobs.release(session, job_id=job_id, lease_token=token, reason=reason, message=message)
        if status == "cancelled":
            jobs.end_round(session, job_id=job_id)
    return status or "lost"


def _run(*, job_id: str, lease: Lease, spec: TrainingSpec, base_path: Path, train_path: Path,
         valid_path: Path | None, work_dir: Path, team_id: str, team_name: str, suffix: str | None,
         base_name: str) -> str:
    from worker.training.recipe import LoraRecipe  # torch loads here, in the worker only

    cpu_start = _cpu_seconds()
    hooks = JobHooks(job_id, team_id, lease, spec.training.keep_checkpoints)
    latest = checkpoints.download_latest(job_id=job_id, dest=work_dir / "resume")
    recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train_path, validation_file=valid_path,
                        work_dir=work_dir, hooks=hooks, resume_from=latest[1] if latest else None)
    lease_seconds = get_settings().lease_seconds
    try:
        recipe.setup()
        result = recipe.train()
        reason = result.stopped
        if reason:
            saved = ("no adapter was saved" if reason == "cancel"
                     else "a checkpoint was saved to continue from")
            message = f"Training stopped at step {result.steps} of {result.total_steps}: {saved}."
            return _retry_db(lambda: _stop(job_id, lease.token, reason, message), seconds=lease_seconds)
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

    def finish() -> bool:
        with session_scope() as session:
            done = jobs.start_evaluating if evaluate else jobs.succeed
            if not done(session, job_id=job_id, lease_token=lease.token, fine_tuned_model=name,
                        trained_tokens=result.trained_tokens, usage=usage):
                return False
            adapters.create(session, adapter_id=adapter_id, team_id=team_id, job_id=job_id, base_model=base_name,
                            name=name, storage_prefix=prefix, archive_key=blob.key, size=blob.bytes,
                            sha256=blob.sha256)
            if evaluate:
                settings = SamplingSpec.model_validate(spec.evaluation.model_dump(exclude={"tasks"}))
                evaluations.create_for_job(session, team_id=team_id, job_id=job_id, base_model=base_name,
                                           adapter_id=adapter_id, fine_tuned_model=name,
                                           tasks=spec.evaluation.tasks, settings=settings)
        return True

    if not _retry_db(finish, seconds=lease_seconds):
        # A cancel arrived after the last step (it wins), or the lease was lost: no adapter.
        storage.delete(prefix)
        return _retry_db(lambda: _stop(job_id, lease.token, "cancel", "Training finished, but the job was "
                                       "cancelled first; no adapter was kept."), seconds=lease_seconds)
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
    """Re-enqueue queued jobs not enqueued for longer than the threshold. Returns their ids."""
    seconds = older_than_seconds if older_than_seconds is not None else get_settings().redispatch_after_seconds
    with session_scope() as session:
        ids = jobs.stale_queued(session, older_than=utcnow() - dt.timedelta(seconds=seconds))
    for job_id in ids:
        enqueue_training(job_id)
    if ids:
        log.info("re-dispatched %d queued job(s): %s", len(ids), ", ".join(ids))
    return ids


def reap_expired() -> list[str]:
    """One reaper pass: requeue (and enqueue) running jobs whose lease expired, or fail them after
    max_attempts; settle their pending cancel/pause requests. Returns the requeued ids."""
    with session_scope() as session:
        ids = jobs.reap(session, max_attempts=get_settings().max_attempts)
    for job_id in ids:
        enqueue_training(job_id)
    if ids:
        log.warning("reaped %d job(s) with expired leases: %s", len(ids), ", ".join(ids))
    return ids


def run_reaper(stop: threading.Event) -> None:
    """Every reaper_interval_seconds until `stop`: reap expired leases of jobs and evaluations and
    re-dispatch queued ones whose message was lost. Runs in every worker; two reapers at once are
    harmless (each requeue is one conditional UPDATE, so only one of them matches)."""
    from worker.tasks.evaluation import reap_expired_evaluations, redispatch_stale_evaluations

    settings = get_settings()
    while not stop.wait(settings.reaper_interval_seconds):
        for recover in (reap_expired, redispatch_stale, reap_expired_evaluations, redispatch_stale_evaluations):
            try:
                recover()
            except Exception:  # the database or broker is down: try again next round
                log.exception("reaper pass (%s) failed", recover.__name__)
