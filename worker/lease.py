"""The worker's side of a lease: the heartbeat thread that renews it, and riding out a database
restart while holding one."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.config import get_settings
from app.core.db import session_scope

log = logging.getLogger("tuneforge.worker")
T = TypeVar("T")
# The database being unreachable; a holder rides this out for up to its lease.
DB_DOWN = (OperationalError, InterfaceError)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def claim_work_dir(object_id: str, token: str) -> Iterator[Path]:
    """An empty folder for one claim of a job or export, under data_dir/work/<id>/, removed on exit.

    One folder per claim, named from its lease token: a paused job resumed at once is claimed again
    (by another pool process or worker) while the run that paused it still cleans up, and a worker
    that lost its lease may still be writing; neither may delete or overwrite the other's files.
    """
    work_dir = get_settings().data_dir / "work" / object_id / hashlib.sha256(token.encode()).hexdigest()[:16]
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        yield work_dir
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty while another claim of the same id runs
            work_dir.parent.rmdir()


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


def retry_db(write: Callable[[], T], *, seconds: float | None = None) -> T:
    """Run a write, retrying while the database is unreachable (a restart), for up to `seconds`
    (by default the lease: past it the reaper owns the work and the write would be refused anyway)."""
    deadline = time.monotonic() + (seconds if seconds is not None else get_settings().lease_seconds)
    while True:
        try:
            return write()
        except DB_DOWN:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
