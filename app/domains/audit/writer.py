"""The audit rows that no request transaction carries: refused requests' rows, and the counts of
unauthenticated requests. One writer thread per process writes them on a connection of its own, so a
flood that holds every connection of the main pool cannot starve the audit log.

- submit(row, done): a bounded queue (MAX_QUEUED rows); the writer drains it in batches of up to
  BATCH rows, one INSERT per batch. done() is called once the row is written or dropped.
- count(key): adds one to an in-memory counter; the writer upserts the counters every FLUSH_SECONDS.
  Distinct keys are bounded (MAX_KEYS per flush; past that the client prefix becomes "other").
- A failed write is retried (RETRIES times, backing off); what is finally dropped, or refused by a
  full queue, is added to dropped() and logged.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from functools import lru_cache, partial

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.domains.audit import service as audit
from app.domains.audit.service import CountKey

log = logging.getLogger("tuneforge.audit")

MAX_QUEUED = 10_000
BATCH = 500
FLUSH_SECONDS = 0.5
MAX_KEYS = 10_000
RETRIES = 4
BACKOFF_SECONDS = (0.2, 1.0, 3.0)

_Item = tuple[Mapping, Callable[[], None] | None]


class Writer:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=MAX_QUEUED)
        self._counts: Counter[CountKey] = Counter()
        self._lock = threading.Lock()
        self._dropped = 0
        # An empty context: the writer's own sessions belong to no request (app.api.audit's hooks).
        self._thread = threading.Thread(target=contextvars.Context().run, args=(self._run,), name="audit-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, row: Mapping, done: Callable[[], None] | None) -> None:
        try:
            self._queue.put_nowait((row, done))
        except queue.Full:
            self._drop(1, "the audit queue is full")
            if done:
                done()

    def count(self, key: CountKey) -> None:
        with self._lock:
            if key not in self._counts and len(self._counts) >= MAX_KEYS:
                key = (*key[:4], "other")
            self._counts[key] += 1

    def dropped(self) -> int:
        return self._dropped

    def _drop(self, n: int, why: str) -> None:
        with self._lock:
            self._dropped += n
            total = self._dropped
        log.error("%d audit row(s) dropped: %s (%d dropped since the process started)", n, why, total)

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            batch: list[_Item] = []
            try:
                batch.append(self._queue.get(timeout=FLUSH_SECONDS))
                while len(batch) < BATCH:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if batch:
                rows = [row for row, _ in batch]
                self._write(partial(audit.record_many, rows=rows), len(rows), "audit rows")
                for _, done in batch:
                    if done:
                        done()
            if time.monotonic() - last_flush >= FLUSH_SECONDS:
                last_flush = time.monotonic()
                with self._lock:
                    counts, self._counts = self._counts, Counter()
                if counts:
                    self._write(partial(audit.count_unauthenticated, counts=counts), sum(counts.values()),
                                "unauthenticated counts")

    def _write(self, work: Callable[[Session], object], n: int, what: str) -> None:
        for attempt in range(RETRIES):
            try:
                with Session(self._engine) as session, session.begin():
                    work(session)
                return
            except Exception as exc:  # retried, then counted and logged: never raised into the thread
                if attempt == RETRIES - 1:
                    self._drop(n, f"could not write {what}: {exc!s:.300}")
                    return
                time.sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])


@lru_cache
def _writer() -> Writer:
    url = get_settings().effective_database_url
    if url.startswith("sqlite"):
        # Its own connection to the same file; the API's engine has already put it in WAL mode.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=1, max_overflow=0)
    return Writer(engine)


def submit(row: Mapping, done: Callable[[], None] | None = None) -> None:
    """Queue one audit_event row (record()'s keys plus created_at); never blocks, never raises."""
    _writer().submit(row, done)


def count(key: CountKey) -> None:
    """Count one unauthenticated request; never blocks on the database."""
    _writer().count(key)


def dropped() -> int:
    """Rows and counts dropped by this process so far (also logged, each time)."""
    return _writer().dropped()
