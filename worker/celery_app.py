"""The Celery app workers run: `celery -A worker.celery_app worker -Q training` on GPU machines,
`-Q evaluation` on CPU machines (model-written code runs there, in the sandbox).

The tasks are found through `include`; the signal handlers (the reaper, warm shutdown as a
checkpoint-and-hand-back, the /metrics server, JSON logs) are in worker.signals, connected once the
app is configured."""

from __future__ import annotations

import os
import tempfile

from celery import Celery

from app.core.config import get_settings
from app.core.queue import celery_config

app = Celery("tuneforge", include=["worker.tasks.training", "worker.tasks.evaluation", "worker.tasks.webhooks",
                                    "worker.tasks.exports"])
app.conf.update(celery_config(get_settings()))

# The pool children's metrics reach the main process's /metrics server (worker.metrics) through files
# in a directory of this worker's own. Set before worker.signals below imports prometheus_client,
# which picks where values live when it is imported; the forked children inherit it.
if get_settings().metrics.worker_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tuneforge-metrics-")

import worker.signals  # noqa: E402,F401  (connects the handlers; it imports nothing from here)
