"""Webhook endpoints: admin keys only. An endpoint's secret is shown once, when it is made or rotated."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ADMIN_ONLY, AdminDep, PageDep, SessionDep
from app.domains.webhooks import service as webhooks
from app.domains.webhooks.schemas import (DeliveryList, WebhookCreate, WebhookCreated, WebhookDeleted, WebhookList,
                                          WebhookRead)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.post("", response_model=WebhookCreated, openapi_extra=ADMIN_ONLY)
def create_webhook(body: WebhookCreate, session: SessionDep, principal: AdminDep) -> WebhookCreated:
    """A new endpoint for the team's job and evaluation events (all types when `events` is omitted).
    `secret` (whsec_…) is shown only in this response. 400 for a URL that is not http(s), does not
    resolve, or resolves to a private, loopback or link-local address the operator has not allowed."""
    row, secret = webhooks.create(session, team_id=principal.team_id, body=body)
    return webhooks.to_created(row, secret)


@router.get("", response_model=WebhookList, openapi_extra=ADMIN_ONLY)
def list_webhooks(session: SessionDep, principal: AdminDep, page: PageDep) -> WebhookList:
    """Newest first. Never the secret."""
    return webhooks.list_page(session, team_id=principal.team_id, after=page.after, limit=page.limit)


@router.get("/{webhook_id}", response_model=WebhookRead, openapi_extra=ADMIN_ONLY)
def get_webhook(webhook_id: str, session: SessionDep, principal: AdminDep) -> WebhookRead:
    return webhooks.to_read(webhooks.get(session, team_id=principal.team_id, webhook_id=webhook_id))


@router.delete("/{webhook_id}", response_model=WebhookDeleted, openapi_extra=ADMIN_ONLY)
def delete_webhook(webhook_id: str, session: SessionDep, principal: AdminDep) -> WebhookDeleted:
    """Delete the endpoint and its delivery log; retries not yet made are dropped."""
    webhooks.delete(session, team_id=principal.team_id, webhook_id=webhook_id)
    return WebhookDeleted(id=webhook_id)


@router.post("/{webhook_id}/rotate_secret", response_model=WebhookCreated, openapi_extra=ADMIN_ONLY)
def rotate_webhook_secret(webhook_id: str, session: SessionDep, principal: AdminDep) -> WebhookCreated:
    """A new secret, shown only in this response. Deliveries carry a signature by the old secret too
    for TUNEFORGE_WEBHOOKS__SECRET_GRACE_SECONDS (a day by default), while the receiver switches over."""
    row, secret = webhooks.rotate_secret(session, team_id=principal.team_id, webhook_id=webhook_id)
    return webhooks.to_created(row, secret)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList, openapi_extra=ADMIN_ONLY)
def list_deliveries(webhook_id: str, session: SessionDep, principal: AdminDep, page: PageDep) -> DeliveryList:
    """The endpoint's delivery log, newest first: each event sent, its status (pending, delivered,
    failed) and every attempt with the receiver's answer."""
    return webhooks.deliveries_page(session, team_id=principal.team_id, webhook_id=webhook_id, after=page.after,
                                    limit=page.limit)
