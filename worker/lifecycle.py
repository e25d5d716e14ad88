"""The worker process's shutdown flag.

Celery's warm shutdown (SIGTERM) is forwarded here (worker.signals): the job being trained
checkpoints at its next step, is handed back to the queue, and its task returns. In a prefork
worker the job runs in a pool child, which the main process tells with SHUTDOWN_SIGNAL.
"""

from __future__ import annotations

import signal
import threading

SHUTDOWN = threading.Event()
# Sent by the main process to its pool children on warm shutdown (Celery resets SIGUSR2 in them).
SHUTDOWN_SIGNAL = signal.SIGUSR2
