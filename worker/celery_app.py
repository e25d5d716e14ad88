"""The Celery app workers run: `celery -A worker.celery_app worker -Q training` on GPU machines,
`-Q evaluation` on CPU machines (model-written code runs there, in the sandbox)."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_ready

from app.core.config import get_settings
from app.core.queue import celery_config

log = logging.getLogger("tuneforge.worker")

app = Celery("tuneforge", include=["worker.tasks.training", "worker.tasks.evaluation"])
app.conf.update(celery_config(get_settings()))


@worker_ready.connect
def _redispatch_on_start(**_kwargs) -> None:
    """Re-send queued jobs whose enqueue may have been lost (the API commits the job first and
    enqueues second; a broker outage between the two leaves a queued row with no message).
    Duplicates are harmless: the claim is atomic."""
    from worker.tasks.training import redispatch_stale

    try:
        redispatch_stale()
    except Exception:  # never stop a worker from starting
        log.exception("redispatch of stale queued jobs failed")
