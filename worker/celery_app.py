"""The Celery app workers run: `celery -A worker.celery_app worker -Q training` on GPU machines,
`-Q evaluation` on CPU machines (model-written code runs there, in the sandbox).

Every worker also runs the reaper (a daemon thread of its main process, so the embedded
`tuneforge up` has one too) and turns Celery's warm shutdown into a checkpoint-and-hand-back
of the job it is training."""

from __future__ import annotations

import logging
import os
import signal
import threading

from billiard.process import active_children
from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.core.config import get_settings
from app.core.queue import celery_config

log = logging.getLogger("tuneforge.worker")

app = Celery("tuneforge", include=["worker.tasks.training", "worker.tasks.evaluation"])
app.conf.update(celery_config(get_settings()))

# Sent by the main process to its pool children on warm shutdown (Celery resets SIGUSR2 in them).
SHUTDOWN_SIGNAL = signal.SIGUSR2
_reaper_stop = threading.Event()


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    """Re-send queued jobs and evaluations whose enqueue may have been lost (the API commits the
    row first and enqueues second; a broker outage between the two leaves a queued row with no
    message), then keep reaping expired leases and re-dispatching, every reaper_interval_seconds.
    Duplicates are harmless: the claim is atomic."""
    from worker.tasks.evaluation import redispatch_stale_evaluations
    from worker.tasks.training import redispatch_stale, run_reaper

    for redispatch in (redispatch_stale, redispatch_stale_evaluations):
        try:
            redispatch()
        except Exception:  # never stop a worker from starting
            log.exception("redispatch of stale queued work failed")
    threading.Thread(target=run_reaper, args=(_reaper_stop,), name="reaper", daemon=True).start()


@worker_process_init.connect
def _init_pool_child(**_kwargs) -> None:
    """A forked pool child: drop the parent's database connections (sockets must not be shared
    across processes) and take the shutdown signal from the parent."""
    from app.core.db import get_engine, get_sessionmaker
    from worker.tasks.training import SHUTDOWN

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
    from worker.tasks.training import SHUTDOWN

    _reaper_stop.set()
    SHUTDOWN.set()
    for child in active_children():
        try:
            os.kill(child.pid, SHUTDOWN_SIGNAL)
        except ProcessLookupError:
            pass
    log.info("%s shutdown: running jobs checkpoint and are handed back", how or "worker")
