from __future__ import annotations

from app.core.errors import InvalidRequest, NotFound


class WebhookNotFound(NotFound):
    code = "webhook_not_found"


class WebhookUrlRefused(InvalidRequest):
    """The URL is not http(s), does not resolve, or reaches an address endpoints may not reach."""

    code = "invalid_url"
