"""The worker's Celery signal handlers, connected when worker.celery_app loads.

Every worker also runs the reaper (a daemon thread of its main process, so the embedded
`tuneforge up` has one too) and turns Celery's warm shutdown into a checkpoint-and-hand-back
of the job it is training."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading

from billiard.process import active_children
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from app.core import logs
from app.core.config import get_settings
from app.core.db import get_engine, get_sessionmaker
from app.core.queue import EVALUATE_JOB_TASK, EVALUATE_TASK, TRAIN_TASK, training_queue
from worker import metrics
from worker.lifecycle import SHUTDOWN, SHUTDOWN_SIGNAL
from worker.reaper import redispatch_stale, run_reaper

log = logging.getLogger("tuneforge.worker")
_reaper_stop = threading.Event()


@celeryd_after_setup.connect
def _consume_device_queue(sender=None, instance=None, **_kwargs) -> None:
    """A worker that consumes the training queue consumes its device's queue too: <training
    queue>.cuda where CUDA is available, else <training queue>.cpu, where jobs whose spec asks for
    that device are sent (app.core.queue.training_queue)."""
    queues = instance.app.amqp.queues
    selected = queues.consume_from
    if selected is not None and training_queue() not in selected:
        return
    # NVML answers whether CUDA is there without initializing it in this process, which forks the pool.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    name = training_queue("cuda" if torch.cuda.is_available() else "cpu")
    if selected is None or name not in selected:
        queues.select_add(name)
    log.info("consuming %s beside %s", name, training_queue())


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


@worker_ready.connect
def _serve_metrics(**_kwargs) -> None:
    """The worker's /metrics (settings.metrics.worker_port), served by this, the main process."""
    metrics.serve()


@worker_process_shutdown.connect
def _forget_pool_child(pid: int | None = None, **_kwargs) -> None:
    metrics.process_exited(pid or os.getpid())


@worker_shutdown.connect
def _remove_metrics_dir(**_kwargs) -> None:
    """The directory worker.celery_app made for this worker's metrics; one an operator set is theirs."""
    folder = os.environ.get(metrics.MULTIPROC_ENV, "")
    if os.path.basename(folder).startswith("tuneforge-metrics-"):
        shutil.rmtree(folder, ignore_errors=True)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger=None, **_kwargs) -> None:
    """TUNEFORGE_LOG_FORMAT=json: Celery's handlers, set up at start, format as JSON too."""
    logs.configure(get_settings().log_format)


_TASK_IDS = {TRAIN_TASK: "job_id", EVALUATE_JOB_TASK: "job_id", EVALUATE_TASK: "evaluation_id"}


@task_prerun.connect
def _bind_task_ids(sender=None, args=None, **_kwargs) -> None:
    """Every line a task logs carries the job (or evaluation) it works on; its argument is that id."""
    field = _TASK_IDS.get(getattr(sender, "name", ""))
    if field and args:
        logs.bind(**{field: str(args[0])})


@task_postrun.connect
def _unbind_task_ids(**_kwargs) -> None:
    logs.bind(job_id=None, evaluation_id=None)
