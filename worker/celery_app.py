"""The Celery app workers run: `celery -A worker.celery_app worker -Q training` on GPU machines,
`-Q evaluation` on CPU machines (model-written code runs there, in the sandbox).

The tasks are found through `include`; the signal handlers (the reaper, warm shutdown as a
checkpoint-and-hand-back) are in worker.signals, connected once the app is configured."""

from __future__ import annotations

from celery import Celery

from app.core.config import get_settings
from app.core.queue import celery_config

app = Celery("tuneforge", include=["worker.tasks.training", "worker.tasks.evaluation"])
app.conf.update(celery_config(get_settings()))

import worker.signals  # noqa: E402,F401  (connects the handlers; it imports nothing from here)
