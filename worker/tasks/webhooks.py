"""webhooks.deliver: one attempt of a webhook delivery. Takes the attempt that is due (a
conditional UPDATE: a duplicate message finds none and returns), sends it outside any transaction,
then records the outcome, which schedules the next attempt with its backoff (webhooks.service)."""

from __future__ import annotations

import logging

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.queue import DELIVER_WEBHOOK_TASK
from app.domains.webhooks import delivery
from app.domains.webhooks import service as webhooks
from worker.celery_app import app

log = logging.getLogger("tuneforge.webhooks")


@app.task(name=DELIVER_WEBHOOK_TASK)
def deliver(delivery_id: str) -> str:
    with session_scope() as session:
        attempt = webhooks.start_attempt(session, delivery_id=delivery_id)
    if attempt is None:
        return "not due"
    outcome = delivery.send(attempt.url, event_id=attempt.event_id, payload=attempt.payload, secrets=attempt.secrets,
                            settings=get_settings().webhooks)
    with session_scope() as session:
        status = webhooks.record_attempt(session, attempt=attempt, outcome=outcome)
    if not outcome.delivered:
        log.warning("webhook delivery %s attempt %d failed: %s", delivery_id, attempt.number, outcome.error)
    return str(status) if status is not None else "gone"
