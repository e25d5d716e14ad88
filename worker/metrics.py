"""Prometheus metrics of the Celery workers (README, "Metrics and logs").

Training and evaluation run in the worker's pool children (prefork), so the samples they record reach
the one /metrics server of the worker's main process through prometheus_client's multiprocess mode:
each process writes its values to files in PROMETHEUS_MULTIPROC_DIR (worker.celery_app gives every
worker a directory of its own when settings.metrics.worker_port is set) and the server sums them at
scrape time. One port per worker, whatever its concurrency; no child ever listens.

Recorded where the work happens (pool children):
- tuneforge_training_steps_total, tuneforge_training_tokens_total: optimizer steps and trained tokens.
- tuneforge_training_tokens_per_second: the latest logged rate of each training process (pid label).
- tuneforge_training_step_seconds: wall time of each logged step, evaluations left out.
- tuneforge_training_rss_bytes: resident memory of each training process (pid label), at each step.
- tuneforge_training_gpu_memory_bytes{kind=allocated|reserved}: torch's CUDA memory, when CUDA is present.
- tuneforge_evaluation_programs_total{outcome}: programs run in the sandbox by outcome
  (passed, failed, timeout, sandbox_error); tuneforge_evaluation_sandbox_seconds: their wall time.

Read at scrape time by the main process (StateCollector):
- tuneforge_jobs{status}: fine-tuning jobs by status, from the database.
- tuneforge_queue_depth{queue}: messages waiting in each Celery queue (Redis list lengths).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from typing import get_args

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select

from app.core.config import Settings, get_settings
from app.core.queue import training_queue
from app.core.db import session_scope
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.spec import Device
from app.domains.jobs.states import JobStatus

log = logging.getLogger("tuneforge.worker")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

TRAINING_STEPS = Counter("tuneforge_training_steps", "Optimizer steps trained.")
TRAINING_TOKENS = Counter("tuneforge_training_tokens", "Tokens trained on (non-padding).")
TOKENS_PER_SECOND = Gauge("tuneforge_training_tokens_per_second",
                          "Training tokens per second of the latest logged steps, per training process.",
                          multiprocess_mode="liveall")
STEP_SECONDS = Histogram("tuneforge_training_step_seconds", "Wall time of one optimizer step (evaluations excluded).",
                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0))
TRAINING_RSS = Gauge("tuneforge_training_rss_bytes", "Resident memory of a training process.",
                     multiprocess_mode="liveall")
GPU_MEMORY = Gauge("tuneforge_training_gpu_memory_bytes", "CUDA memory held by torch in a training process.",
                   ["kind"], multiprocess_mode="liveall")
PROGRAMS = Counter("tuneforge_evaluation_programs", "Programs run in the evaluation sandbox, by outcome.",
                   ["outcome"])
SANDBOX_SECONDS = Histogram("tuneforge_evaluation_sandbox_seconds", "Wall time of one program in the sandbox.",
                            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))


def record_training_step(*, steps: int, seconds: float, tokens: int, tokens_per_second: float) -> None:
    """`steps` optimizer steps that took `seconds` in all and trained `tokens` tokens; also samples this
    process's memory. Never raises: metrics must not fail a job."""
    try:
        if steps > 0:
            TRAINING_STEPS.inc(steps)
            for _ in range(steps):
                STEP_SECONDS.observe(seconds / steps)
        TRAINING_TOKENS.inc(max(tokens, 0))
        TOKENS_PER_SECOND.set(tokens_per_second)
        TRAINING_RSS.set(psutil.Process().memory_info().rss)
        _gpu_memory()
    except Exception:
        log.exception("could not record training metrics")


def _gpu_memory() -> None:
    torch = sys.modules.get("torch")  # only where training has loaded it; never imported for this
    if torch is None or not torch.cuda.is_available():
        return
    GPU_MEMORY.labels("allocated").set(torch.cuda.memory_allocated())
    GPU_MEMORY.labels("reserved").set(torch.cuda.memory_reserved())


def record_program(outcome: str, seconds: float) -> None:
    """One program run in the sandbox. Never raises."""
    try:
        PROGRAMS.labels(outcome).inc()
        SANDBOX_SECONDS.observe(seconds)
    except Exception:
        log.exception("could not record evaluation metrics")


class StateCollector:
    """Jobs by status and queue depths, read when Prometheus scrapes (never cached: each scrape is one
    GROUP BY and one LLEN per queue). A source that does not answer leaves its family out of that
    scrape and logs why, so the others still come through."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> Iterator[Metric]:  # lets register() skip collect(), which reads the database
        return iter(())

    def collect(self) -> Iterator[Metric]:
        try:
            yield self._jobs()
        except Exception as exc:
            log.warning("metrics: cannot count jobs by status: %s", exc)
        try:
            depth = self._queues()
        except Exception as exc:
            log.warning("metrics: cannot read the queues' depths: %s", exc)
        else:
            if depth is not None:
                yield depth

    def _jobs(self) -> Metric:
        with session_scope() as session:
            counts = dict(session.execute(select(FineTuningJob.status, func.count()).group_by(FineTuningJob.status))
                          .tuples().all())
        family = GaugeMetricFamily("tuneforge_jobs", "Fine-tuning jobs by status.", labels=["status"])
        for status in JobStatus:
            family.add_metric([str(status)], counts.get(status, 0))
        return family

    def _queues(self) -> Metric | None:
        url = self.settings.effective_broker_url
        if not url.startswith(("redis://", "rediss://")):
            return None  # the embedded filesystem broker has no lists to measure
        import redis

        queues = (*(training_queue(d, self.settings) for d in get_args(Device)), self.settings.evaluation_queue)
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            lengths = [client.llen(q) for q in queues]
        finally:
            client.close()
        family = GaugeMetricFamily("tuneforge_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"])
        for queue, length in zip(queues, lengths, strict=True):
            family.add_metric([queue], length)
        return family


def serve(settings: Settings | None = None) -> int | None:
    """Start the worker's /metrics server (a daemon thread of the calling process, the worker's main
    one) on settings.metrics.worker_port; None when the port is 0 or the process is not in
    multiprocess mode. Returns the port. A port that is taken is logged, never raised: metrics
    must not stop a worker."""
    settings = settings or get_settings()
    port = settings.metrics.worker_port
    if not port:
        return None
    if not os.environ.get(MULTIPROC_ENV):
        log.error("metrics: %s is not set, so the pool's samples cannot be collected; no /metrics server",
                  MULTIPROC_ENV)
        return None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(StateCollector(settings))
    try:
        start_http_server(port, addr=settings.metrics.worker_host, registry=registry)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d: %s", settings.metrics.worker_host, port, exc)
        return None
    log.info("metrics at http://%s:%d/metrics", settings.metrics.worker_host, port)
    return port


def process_exited(pid: int) -> None:
    """A pool child is gone: its live gauges (rates, memory) leave the sums."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
