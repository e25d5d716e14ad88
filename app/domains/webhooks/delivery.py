"""One delivery attempt: sign the payload per the Standard Webhooks spec and POST it.

The headers are webhook-id (the event's id, the same on every attempt), webhook-timestamp (unix
seconds of this attempt) and webhook-signature (`v1,<base64 HMAC-SHA256 of id.timestamp.body>`, one
per secret in force, space-separated), as `standardwebhooks.Webhook(secret).verify(body, headers)`
checks them. The URL is resolved and checked again here (addresses.resolve), and the request goes
to the checked address with the URL's host in Host (and in TLS SNI and certificate checks): a name
that now resolves elsewhere cannot redirect the request. Redirects are not followed, and proxies
from the environment are not used.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from dataclasses import dataclass

import httpx
from standardwebhooks import Webhook

from app.core.config import WebhookSettings
from app.domains.webhooks import addresses
from app.domains.webhooks.errors import WebhookUrlRefused

USER_AGENT = "Tuneforge-Webhooks/1"
RESPONSE_KEPT = 1024  # characters of the receiver's answer kept in the delivery log


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    response_body: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def sign(secrets: list[str], *, event_id: str, timestamp: dt.datetime, payload: str) -> str:
    """The webhook-signature header: one v1 signature per secret."""
    return " ".join(Webhook(secret).sign(event_id, timestamp, payload) for secret in secrets)


def send(url: str, *, event_id: str, payload: str, secrets: list[str], settings: WebhookSettings) -> Outcome:
    """POST the payload once. Never raises for the receiver's or the network's faults: they are the outcome."""
    started = time.monotonic()

    def outcome(status_code: int | None = None, error: str | None = None, body: str | None = None) -> Outcome:
        return Outcome(status_code, error, body, int((time.monotonic() - started) * 1000))

    try:
        target = addresses.resolve(url, settings)
    except WebhookUrlRefused as exc:
        return outcome(error=f"not sent: {exc.message}")
    now = dt.datetime.now(dt.UTC)
    headers = {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": event_id,
               "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": sign(secrets, event_id=event_id, timestamp=now, payload=payload),
               "host": target.url.netloc}
    address = target.addresses[0]
    shown = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    pinned = target.url._replace(netloc=f"{shown}:{target.port}").geturl()
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    try:
        with httpx.Client(timeout=settings.timeout_seconds, follow_redirects=False, trust_env=False) as client:
            response = client.post(pinned, content=payload.encode(), headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return outcome(error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    body = response.text[:RESPONSE_KEPT]
    if 200 <= response.status_code < 300:
        return outcome(response.status_code, body=body)
    return outcome(response.status_code, error=f"the receiver answered {response.status_code}", body=body)
