"""Dispatch by Celery task name: the API process sends job ids, never imports the worker.

Work is sent only after the transaction that decided it commits (after_commit): a worker must
find the row it is sent, and a rolled-back decision sends nothing. A send that fails (the broker
is down) is logged and the row stays queued; every worker's reaper re-sends queued rows whose
message may be lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from app.core.config import Settings, get_settings
from app.core.storage import get_storage

log = logging.getLogger("tuneforge.queue")

TRAIN_TASK = "jobs.train"
EVALUATE_TASK = "evaluations.run"
EVALUATE_JOB_TASK = "evaluations.run_job"
DELIVER_WEBHOOK_TASK = "webhooks.deliver"
EXPORT_TASK = "exports.run"


def celery_config(settings: Settings) -> dict:
    """Celery settings shared by the API's client and the workers. For the embedded filesystem
    broker, also creates its folders (kombu expects them to exist)."""
    for folder in settings.broker_transport_options.values():
        if isinstance(folder, str):
            Path(folder).mkdir(parents=True, exist_ok=True)
    options = dict(settings.broker_transport_options)
    if settings.effective_broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers a message not acknowledged within visibility_timeout (acks_late: one per
        # running job). Recovery does not wait on it: the reaper requeues a dead worker's job once its
        # lease expires. Redelivery of a job still running elsewhere is refused by the claim (a live
        # lease), so the timeout only trades duplicate no-op deliveries against how long a message
        # taken by a worker that died before claiming waits (re-dispatch usually re-sends it sooner).
        options["visibility_timeout"] = settings.visibility_timeout_seconds
        # kombu sweeps for such messages every interval x throttle seconds (100 s by default); sweep
        # every tenth of the timeout (at most every minute), so redelivery follows the timeout closely.
        options["unacked_restore_interval"] = max(1, min(60, settings.visibility_timeout_seconds // 10))
        options["unacked_restore_throttle"] = 1
    return {
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": options,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A job's truth is in the database; the message may be delivered twice and that is harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_routes": {TRAIN_TASK: {"queue": settings.training_queue},
                        EVALUATE_TASK: {"queue": settings.evaluation_queue},
                        EVALUATE_JOB_TASK: {"queue": settings.evaluation_queue},
                        DELIVER_WEBHOOK_TASK: {"queue": settings.webhooks.queue},
                        # Merging loads the base model's weights: work for the training machines.
                        EXPORT_TASK: {"queue": settings.training_queue}},
        "task_default_queue": settings.training_queue,
    }


@lru_cache
def client() -> Celery:
    app = Celery("tuneforge-api")
    app.conf.update(celery_config(get_settings()))
    return app


_PENDING = "tuneforge.after_commit"
_WRITTEN = "tuneforge.delete_after_rollback"


def after_commit(session: Session, fn: Callable[..., Any], *args: Any) -> None:
    """Run fn(*args) once the session's current transaction commits; dropped if it rolls back (or
    the session closes without committing). Runs in the order registered; an exception is logged,
    never raised into the commit, which has already happened."""
    session.info.setdefault(_PENDING, []).append((fn, args))


def delete_after_commit(session: Session, key: str) -> None:
    """Remove a blob (a file or a prefix) once the transaction that deleted its row commits: a
    rollback keeps both the row and its files."""
    after_commit(session, _delete_blob, key)


def delete_after_rollback(session: Session, key: str) -> None:
    """Remove a blob written for a row of this transaction if the transaction does not commit: a
    rollback leaves neither the row nor its blob."""
    session.info.setdefault(_WRITTEN, []).append(key)


def _delete_blob(key: str) -> None:
    get_storage().delete(key)


@event.listens_for(Session, "after_commit")
def _run_pending(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint released: the transaction goes on
        return
    session.info.pop(_WRITTEN, None)
    for fn, args in session.info.pop(_PENDING, []):
        try:
            fn(*args)
        except Exception:
            log.exception("after-commit %s%r failed", getattr(fn, "__name__", fn), args)


@event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended without a commit running them
        session.info.pop(_PENDING, None)
        for key in session.info.pop(_WRITTEN, []):
            try:
                _delete_blob(key)
            except Exception:
                log.exception("deleting blob %s after rollback failed", key)


def training_queue(device: str = "any", settings: Settings | None = None) -> str:
    """The queue of training work for a kind of device: the training queue itself for "any", else
    <training queue>.<device> ("cpu", "cuda"), which only workers with that device consume."""
    name = (settings or get_settings()).training_queue
    return name if device == "any" else f"{name}.{device}"


def enqueue_training(job_id: str, device: str = "any") -> bool:
    """Send the job's id to the training queue of its device (training_queue). Returns False (and
    logs) when the broker is unreachable: the job stays queued in the database and a worker
    re-dispatches it."""
    return _send(TRAIN_TASK, job_id, training_queue(device))


def enqueue_evaluation(evaluation_id: str) -> bool:
    return _send(EVALUATE_TASK, evaluation_id, get_settings().evaluation_queue)


def enqueue_job_evaluation(job_id: str) -> bool:
    return _send(EVALUATE_JOB_TASK, job_id, get_settings().evaluation_queue)


def enqueue_export(export_id: str) -> bool:
    """Send an adapter export's id to the training queue (merging loads the base model)."""
    return _send(EXPORT_TASK, export_id, get_settings().training_queue)


def enqueue_webhook(delivery_id: str, countdown: float = 0) -> bool:
    """Send a webhook delivery's id to the webhooks queue, to be attempted `countdown` seconds from
    now (a retry's backoff). A delivery whose message is lost is re-sent by the reaper."""
    return _send(DELIVER_WEBHOOK_TASK, delivery_id, get_settings().webhooks.queue, countdown=countdown)


def _send(task: str, object_id: str, queue: str, countdown: float = 0) -> bool:
    try:
        client().send_task(task, args=[object_id], queue=queue, countdown=countdown or None,
                           retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
        return True
    except Exception as exc:  # broker down: the database keeps the object queued
        log.warning("could not enqueue %s %s: %s", task, object_id, exc)
        return False
