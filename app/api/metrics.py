"""The API process's Prometheus metrics and GET /metrics (README, "Metrics and logs").

- tuneforge_http_requests_total{method, route, status}: answered requests. route is the matched route's
  template (/v1/fine_tuning/jobs/{job_id}), "unmatched" for paths no route serves and for requests
  refused before routing (body cap, in-flight limit): ids never become labels.
- tuneforge_http_request_duration_seconds{method, route}: from the first byte in to the last byte out.
- tuneforge_http_requests_in_flight{method}: requests being served now.
- tuneforge_audit_rows_dropped_total: audit rows and counts this process could not write
  (app.domains.audit.writer), read at scrape time.

The exposition is prometheus_client's. One API process serves its own numbers; with several behind a
balancer, Prometheus scrapes each.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.audit import UNMATCHED
from app.api.errors import ErrorResponse
from app.api.routing import template
from app.core.config import get_settings
from app.core.errors import Unauthorized
from app.domains.audit import writer

REQUESTS = Counter("tuneforge_http_requests", "HTTP requests answered, by route template and status.",
                   ["method", "route", "status"])
LATENCY = Histogram("tuneforge_http_request_duration_seconds",
                    "Time from a request's arrival to its response's last byte, by route template.",
                    ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
IN_FLIGHT = Gauge("tuneforge_http_requests_in_flight", "HTTP requests being served now.", ["method"])


class _AuditDropped:
    """The audit writer's count of dropped rows, as a counter read at scrape time."""

    def describe(self) -> Iterator[Metric]:  # lets register() skip collect(), which would start the writer
        yield CounterMetricFamily("tuneforge_audit_rows_dropped", "Audit rows and counts this process dropped.")

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("tuneforge_audit_rows_dropped", "Audit rows and counts this process dropped.",
                                  value=writer.dropped())


REGISTRY.register(_AuditDropped())


class MetricsMiddleware:
    """Counts and times every HTTP request; the outermost middleware, so refusals of the inner ones
    (413, 429) are counted too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        status = 500  # what an exception before the response's start answers
        start = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.labels(method).inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            IN_FLIGHT.labels(method).dec()
            route = template(scope) or UNMATCHED
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - start)


router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus' text format."},
                       401: {"model": ErrorResponse,
                             "description": "TUNEFORGE_METRICS__TOKEN is set and the request did not send it."}})
def metrics(request: Request) -> Response:
    """This process's metrics in Prometheus' text format. Unauthenticated unless TUNEFORGE_METRICS__TOKEN
    is set; then it needs `Authorization: Bearer <token>` (401 otherwise)."""
    # The header is read from the request, not declared as a parameter: a declared one would put a 422
    # (never answered) into the docs and the token into the schema's parameters.
    token = get_settings().metrics.token
    if token is not None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(),
                                                                     token.get_secret_value().encode()):
            raise Unauthorized("GET /metrics needs `Authorization: Bearer <token>` with the scrape token "
                               "(TUNEFORGE_METRICS__TOKEN).", code="invalid_metrics_token")
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
