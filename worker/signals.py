"""The worker's Celery signal handlers, connected when worker.celery_app loads.

Every worker also runs the reaper (a daemon thread of its main process, so the embedded
`tuneforge up` has one too) and turns Celery's warm shutdown into a checkpoint-and-hand-back
of the job it is training."""

from __future__ import annotations

import logging
import os
import signal
import threading

from billiard.process import active_children
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.core.db import get_engine, get_sessionmaker
from worker.lifecycle import SHUTDOWN, SHUTDOWN_SIGNAL
from worker.reaper import redispatch_stale, run_reaper

log = logging.getLogger("tuneforge.worker")
_reaper_stop = threading.Event()


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    """Re-send queued jobs and evaluations whose enqueue may have been lost (the API commits the
    row first and enqueues second; a broker outage between the two leaves a queued row with no
    message), then keep reaping expired leases and re-dispatching, every reaper_interval_seconds.
    Duplicates are harmless: the claim is atomic."""
    try:
        redispatch_stale()
    except Exception:  # never stop a worker from starting
        log.exception("redispatch of stale queued work failed")
    threading.Thread(target=run_reaper, args=(_reaper_stop,), name="reaper", daemon=True).start()


@worker_process_init.connect
def _init_pool_child(**_kwargs) -> None:
    """A forked pool child: drop the parent's database connections (sockets must not be shared
    across processes) and take the shutdown signal from the parent."""
    get_engine().dispose(close=False)
    # And build this process's own engine on first use, sharing no pool object with the parent.
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
    signal.signal(SHUTDOWN_SIGNAL, lambda *_: SHUTDOWN.set())


@worker_shutting_down.connect
def _hand_back_on_shutdown(how: str | None = None, **_kwargs) -> None:
    """Warm shutdown (SIGTERM): the running job checkpoints at its next step and is handed back to
    the queue, so the worker exits within a step and an upload, not at the end of the job. In a
    prefork worker the job runs in a pool child, which gets SHUTDOWN_SIGNAL; in a solo or threads
    pool it runs here."""
    _reaper_stop.set()
    SHUTDOWN.set()
    for child in active_children():
        try:
            os.kill(child.pid, SHUTDOWN_SIGNAL)
        except ProcessLookupError:
            pass
    log.info("%s shutdown: running jobs checkpoint and are handed back", how or "worker")
