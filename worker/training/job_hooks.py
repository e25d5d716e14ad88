"""JobHooks: the training recipe's hooks (worker.training.hooks) for a job in Postgres, written
as its lease holder."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from app.core.db import session_scope
from app.domains.jobs import lease as job_lease
from worker.lease import DB_DOWN, Lease, retry_db
from worker.lifecycle import SHUTDOWN
from worker.training import checkpoint_store as checkpoints
from worker.training.hooks import StopReason

log = logging.getLogger("tuneforge.worker")


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
                    job_lease.record_metrics(session, job_id=self.job_id, lease_token=self.lease.token,
                                             message=message, data=data or {})
                else:
                    job_lease.record_event(session, job_id=self.job_id, lease_token=self.lease.token,
                                           message=message, data=data)
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
                    self._view = job_lease.holder_view(session, job_id=self.job_id, lease_token=self.lease.token)
            except DB_DOWN as exc:
                log.warning("job %s: stop check skipped, database unreachable: %s", self.job_id, exc)
        if self.lease.lost.is_set() or self._view in ("lost", "cancel"):
            return "cancel"
        if self._view == "pause":
            return "pause"
        return "shutdown" if SHUTDOWN.is_set() else None

    def cancel_requested(self) -> bool:
        """Between micro-batches: True when cancel was requested or the lease is lost (polled as
        should_stop polls)."""
        return self.should_stop() == "cancel"

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Upload the checkpoint while this worker still holds the lease. Through a database outage
        it retries for up to a lease (past it the lease is gone and the upload would be refused)."""
        def upload() -> None:
            if self.lease.lost.is_set():
                return
            with session_scope() as session:
                if not job_lease.holds(session, job_id=self.job_id, lease_token=self.lease.token):
                    return
            checkpoints.upload(job_id=self.job_id, team_id=self.team_id, step=step, local_dir=path,
                               metrics=metrics, keep=self.keep)

        retry_db(upload)
