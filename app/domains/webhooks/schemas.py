from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.domains.webhooks.events import DeliveryStatus, EventType


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, description=(
        "http(s) URL that receives a POST per event. Refused when its host resolves to a private, loopback or "
        "link-local address, unless the operator allows it."))
    events: list[EventType] | None = Field(None, min_length=1, description=(
        "The event types to send; all of them when omitted."))


class WebhookRead(BaseModel):
    """A webhook endpoint as listed: never its secret."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[EventType]
    created_at: int


class WebhookCreated(WebhookRead):
    secret: str = Field(description=(
        "The signing secret (whsec_…), for standardwebhooks.Webhook(secret).verify(body, headers). Shown only in "
        "this response."))


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookRead]
    has_more: bool


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class AttemptRead(BaseModel):
    number: int
    created_at: int
    status_code: int | None = Field(description="The receiver's answer; null when none came.")
    error: str | None = Field(description="Why the attempt failed; null when it delivered.")
    response_body: str | None = Field(description="The start of the receiver's answer (1 KiB at most).")
    duration_ms: int


class DeliveryRead(BaseModel):
    id: str
    object: Literal["webhook.delivery"] = "webhook.delivery"
    event_id: str = Field(description="The event's id, sent as webhook-id on every attempt.")
    event_type: EventType
    status: DeliveryStatus
    attempts: list[AttemptRead] = Field(description="Oldest first.")
    next_attempt_at: int | None = Field(description="When the next attempt is due, while pending.")
    created_at: int
    finished_at: int | None
    payload: dict[str, Any] = Field(description="The event as sent (the request's body).")


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryRead]
    has_more: bool
