"""Webhook endpoints (a team's receivers) and the deliveries of events to them.

notify() is called, in the transaction that writes it, when a job or an evaluation reaches a final
state: it records one delivery per subscribed endpoint and sends each to the webhooks queue after
commit (a rolled-back state change sends nothing). The worker's task then runs start_attempt(),
the request (delivery.send) outside any transaction, and record_attempt(), which schedules the next
attempt with exponential backoff (retry_base_seconds x 2^(n-1)) until max_attempts. The truth of
a delivery is its row: a duplicate message finds no attempt due and does nothing, and a lost one
is re-sent by the reaper (redispatch_stale). Services flush, never commit.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core import queue
from app.core.config import get_settings
from app.core.db import get_owned, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.webhooks import addresses
from app.domains.webhooks.delivery import Outcome
from app.domains.webhooks.errors import WebhookNotFound
from app.domains.webhooks.events import EVALUATION_EVENTS, JOB_EVENTS, DeliveryStatus, EventType
from app.domains.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.domains.webhooks.schemas import (AttemptRead, DeliveryList, DeliveryRead, WebhookCreate, WebhookCreated,
                                          WebhookList, WebhookRead)

# Margin past an attempt's timeout before the reaper may think its worker died mid-attempt.
ATTEMPT_MARGIN_SECONDS = 30.0


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# -- endpoints ----------------------------------------------------------------------------------

def create(session: Session, *, team_id: str, body: WebhookCreate) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its secret (shown once). Raises WebhookUrlRefused for a URL that is not
    http(s), does not resolve, or resolves to an address endpoints may not reach."""
    addresses.resolve(body.url, get_settings().webhooks)
    events = list(dict.fromkeys(body.events)) if body.events is not None else list(EventType)
    secret = new_secret()
    row = WebhookEndpoint(id=new_id("webhook"), team_id=team_id, url=body.url, events=[str(e) for e in events],
                          secret=secret)
    session.add(row)
    session.flush()
    return row, secret


def get(session: Session, *, team_id: str, webhook_id: str) -> WebhookEndpoint:
    """The team's endpoint. Raises WebhookNotFound for a missing id and another team's alike."""
    row = get_owned(session, WebhookEndpoint, webhook_id, team_id)
    if row is None:
        raise WebhookNotFound(f"No such webhook endpoint: {webhook_id!r}.", param="webhook_id")
    return row


def list_page(session: Session, *, team_id: str, after: str | None, limit: int) -> WebhookList:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.team_id == team_id)
    rows, has_more = paginate(session, stmt, WebhookEndpoint.id, after=after, limit=limit)
    return WebhookList(data=[to_read(r) for r in rows], has_more=has_more)


def delete(session: Session, *, team_id: str, webhook_id: str) -> None:
    """Delete the endpoint with its deliveries; attempts not yet made are never made. Raises WebhookNotFound."""
    session.delete(get(session, team_id=team_id, webhook_id=webhook_id))
    session.flush()


def rotate_secret(session: Session, *, team_id: str, webhook_id: str) -> tuple[WebhookEndpoint, str]:
    """A new secret (shown once). Deliveries are signed by the old one too for secret_grace_seconds,
    so the receiver can switch over. Raises WebhookNotFound."""
    row = get(session, team_id=team_id, webhook_id=webhook_id)
    grace = get_settings().webhooks.secret_grace_seconds
    secret = new_secret()
    row.previous_secret = row.secret if grace else None
    row.previous_secret_expires_at = utcnow() + dt.timedelta(seconds=grace) if grace else None
    row.secret = secret
    session.flush()
    return row, secret


def to_read(row: WebhookEndpoint) -> WebhookRead:
    return WebhookRead(id=row.id, url=row.url, events=[EventType(e) for e in row.events],
                       created_at=unix(row.created_at) or 0)


def to_created(row: WebhookEndpoint, secret: str) -> WebhookCreated:
    return WebhookCreated(**to_read(row).model_dump(), secret=secret)


# -- events ----------------------------------------------------------------------------------

def notify(session: Session, *, team_id: str, event_type: EventType, data: dict) -> list[str]:
    """Record the event's delivery to each of the team's endpoints subscribed to its type, and send
    them after commit. The payload is OpenAI's webhook event: {"object": "event", "id", "type",
    "created_at", "data"}. Returns the delivery ids."""
    endpoints = [e for e in session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.team_id == team_id)
                                            .order_by(WebhookEndpoint.id)) if event_type in e.events]
    if not endpoints:
        return []
    now, event_id = utcnow(), new_id("evt")
    payload = json.dumps({"object": "event", "id": event_id, "type": str(event_type), "created_at": unix(now),
                          "data": data}, separators=(",", ":"))
    ids = []
    for endpoint in endpoints:
        row = WebhookDelivery(id=new_id("whdelivery"), endpoint_id=endpoint.id, event_id=event_id,
                              event_type=str(event_type), payload=payload, status=DeliveryStatus.PENDING,
                              attempts=0, next_attempt_at=now, created_at=now)
        session.add(row)
        ids.append(row.id)
        queue.after_commit(session, queue.enqueue_webhook, row.id)
    session.flush()
    return ids


def job_ended(session: Session, *, team_id: str, job_id: str, status: str) -> None:
    """A job reached succeeded, failed or cancelled (any other status sends nothing)."""
    if status in JOB_EVENTS:
        notify(session, team_id=team_id, event_type=JOB_EVENTS[status], data={"id": job_id})


def evaluation_ended(session: Session, *, team_id: str, evaluation_id: str, job_id: str | None, status: str) -> None:
    """An evaluation reached succeeded, failed or cancelled; job_id is its job's, for a job's evaluation."""
    if status in EVALUATION_EVENTS:
        notify(session, team_id=team_id, event_type=EVALUATION_EVENTS[status],
               data={"id": evaluation_id, "job_id": job_id})


# -- what the delivering worker does ---------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """What one attempt sends, read when it starts."""

    delivery_id: str
    number: int
    url: str
    event_id: str
    payload: str
    secrets: list[str]


def start_attempt(session: Session, *, delivery_id: str) -> Attempt | None:
    """Take the delivery's due attempt: one conditional UPDATE counts it and pushes next_attempt_at
    past its timeout, so a duplicate message (or a second worker) finds nothing due. Returns None
    when nothing is due (delivered, failed, not yet time, deleted)."""
    settings = get_settings().webhooks
    now = utcnow()
    row = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING,
               WebhookDelivery.next_attempt_at <= now)
        .values(attempts=WebhookDelivery.attempts + 1,
                next_attempt_at=now + dt.timedelta(seconds=settings.timeout_seconds + ATTEMPT_MARGIN_SECONDS))
        .returning(WebhookDelivery.attempts, WebhookDelivery.endpoint_id, WebhookDelivery.event_id,
                   WebhookDelivery.payload)
        .execution_options(synchronize_session=False)).first()
    if row is None:
        return None
    endpoint = session.get_one(WebhookEndpoint, row.endpoint_id)  # the delivery cascades with it
    in_force = [endpoint.secret]
    if endpoint.previous_secret and endpoint.previous_secret_expires_at and endpoint.previous_secret_expires_at > now:
        in_force.append(endpoint.previous_secret)
    return Attempt(delivery_id=delivery_id, number=row.attempts, url=endpoint.url, event_id=row.event_id,
                   payload=row.payload, secrets=in_force)


def backoff_seconds(number: int) -> float:
    """The wait after failed attempt `number` (1-based): retry_base_seconds x 2^(number-1)."""
    return float(get_settings().webhooks.retry_base_seconds * 2 ** (number - 1))


def record_attempt(session: Session, *, attempt: Attempt, outcome: Outcome) -> DeliveryStatus | None:
    """Log the attempt and settle the delivery: delivered, failed once max_attempts are used, else
    pending with the next attempt scheduled (and sent after commit with that countdown). Returns the
    delivery's status, or None when the delivery is gone (its endpoint was deleted meanwhile) or the
    attempt is no longer its latest (nothing is written)."""
    settings = get_settings().webhooks
    now = utcnow()
    values: dict = {}
    if outcome.delivered:
        status = DeliveryStatus.DELIVERED
    elif attempt.number >= settings.max_attempts:
        status = DeliveryStatus.FAILED
    else:
        status = DeliveryStatus.PENDING
        values["next_attempt_at"] = now + dt.timedelta(seconds=backoff_seconds(attempt.number))
    if status != DeliveryStatus.PENDING:
        values.update(finished_at=now, next_attempt_at=None)
    matched = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == attempt.delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING,
               WebhookDelivery.attempts == attempt.number)
        .values(status=status, **values).returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)).first()
    if matched is None:
        return None
    session.add(WebhookAttempt(id=new_id("whattempt"), delivery_id=attempt.delivery_id, number=attempt.number,
                               status_code=outcome.status_code, error=outcome.error,
                               response_body=outcome.response_body, duration_ms=outcome.duration_ms, created_at=now))
    session.flush()
    if status == DeliveryStatus.PENDING:
        queue.after_commit(session, queue.enqueue_webhook, attempt.delivery_id, backoff_seconds(attempt.number))
    return status


def redispatch_stale(session: Session, *, older_than: dt.datetime) -> list[str]:
    """Re-send, after commit, pending deliveries whose attempt was due before `older_than` and never
    came (a lost message, a failed enqueue, a worker that died mid-attempt). Marks them due now, so
    each is re-sent at most once per interval. Returns their ids."""
    ids = list(session.scalars(
        update(WebhookDelivery)
        .where(WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at < older_than)
        .values(next_attempt_at=utcnow()).returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)))
    for delivery_id in ids:
        queue.after_commit(session, queue.enqueue_webhook, delivery_id)
    return ids


# -- the delivery log ----------------------------------------------------------------------------

def deliveries_page(session: Session, *, team_id: str, webhook_id: str, after: str | None,
                    limit: int) -> DeliveryList:
    """The endpoint's deliveries, newest first, each with its attempts. Raises WebhookNotFound."""
    get(session, team_id=team_id, webhook_id=webhook_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == webhook_id)
    rows, has_more = paginate(session, stmt, WebhookDelivery.id, after=after, limit=limit)
    attempts: dict[str, list[AttemptRead]] = {r.id: [] for r in rows}
    for a in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
                             .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number)):
        attempts[a.delivery_id].append(AttemptRead(number=a.number, created_at=unix(a.created_at) or 0,
                                                   status_code=a.status_code, error=a.error,
                                                   response_body=a.response_body, duration_ms=a.duration_ms))
    return DeliveryList(data=[DeliveryRead(
        id=r.id, event_id=r.event_id, event_type=EventType(r.event_type), status=DeliveryStatus(r.status),
        attempts=attempts[r.id], next_attempt_at=unix(r.next_attempt_at), created_at=unix(r.created_at) or 0,
        finished_at=unix(r.finished_at), payload=json.loads(r.payload)) for r in rows], has_more=has_more)
