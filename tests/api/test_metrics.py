"""The API's /metrics (requests by route template and status, latency, in flight, dropped audit rows),
its optional scrape token, request ids and JSON logs."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx

from tests.conftest import _stop, start_api, wait_until
from tests.scrape import scrape

JOB_ROUTE = "/v1/fine_tuning/jobs/{job_id}"


def test_requests_are_counted_and_timed_by_route_template_and_status(server, make_team):
    _, key = make_team()
    headers = {"Authorization": f"Bearer {key}"}
    before = scrape(f"{server}/metrics")
    missing = [f"ftjob-{secrets.token_hex(6)}" for _ in range(3)]
    for job_id in missing:
        assert httpx.get(f"{server}/v1/fine_tuning/jobs/{job_id}", headers=headers).status_code == 404
    assert httpx.get(f"{server}/v1/no/such/route", headers=headers).status_code == 404
    after = scrape(f"{server}/metrics")

    def moved(sample: str, **labels: str) -> float:
        return (after.value(sample, **labels) or 0) - (before.value(sample, **labels) or 0)

    assert moved("tuneforge_http_requests_total", method="GET", route=JOB_ROUTE, status="404") == 3
    assert moved("tuneforge_http_request_duration_seconds_count", method="GET", route=JOB_ROUTE) == 3
    assert moved("tuneforge_http_request_duration_seconds_sum", method="GET", route=JOB_ROUTE) > 0
    assert moved("tuneforge_http_request_duration_seconds_bucket", method="GET", route=JOB_ROUTE, le="+Inf") == 3
    assert moved("tuneforge_http_requests_total", method="GET", route="unmatched", status="404") == 1
    # The first scrape was itself answered before the second one.
    assert moved("tuneforge_http_requests_total", method="GET", route="/metrics", status="200") == 1
    # Ids never become labels: only templates do.
    routes = {labels["route"] for labels in after.labels("tuneforge_http_requests_total")}
    assert not any(job_id in route for route in routes for job_id in missing), routes
    # The scrape in progress is in flight while it is rendered.
    assert after.value("tuneforge_http_requests_in_flight", method="GET") >= 1
    assert after.families["tuneforge_audit_rows_dropped"].type == "counter"
    assert after.value("tuneforge_audit_rows_dropped_total") == 0


def test_a_scrape_token_is_required_once_set(services_env, tmp_path):
    token = secrets.token_urlsafe(16)
    proc, base = start_api({**services_env, "TUNEFORGE_METRICS__TOKEN": token}, tmp_path / "api.log")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            r = httpx.get(f"{base}/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_metrics_token"
            assert r.json()["error"]["type"] == "authentication_error"
        authorized = scrape(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert authorized.value("tuneforge_http_requests_total", route="/metrics", status="401") == 3
    finally:
        _stop(proc)


def test_a_request_id_is_echoed_or_generated(server):
    sent = f"client-{secrets.token_hex(4)}"
    assert httpx.get(f"{server}/healthz", headers={"X-Request-Id": sent}).headers["x-request-id"] == sent
    first, second = (httpx.get(f"{server}/healthz").headers["x-request-id"] for _ in range(2))
    assert first.startswith("req_") and second.startswith("req_") and first != second
    # An unusable one (too long, or with spaces) is replaced rather than echoed into logs.
    for bad in ("x" * 129, "two words"):
        echoed = httpx.get(f"{server}/healthz", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert echoed.startswith("req_")
    # Refusals carry it too: no key.
    assert httpx.get(f"{server}/v1/files", headers={"X-Request-Id": sent}).headers["x-request-id"] == sent


def test_json_logs_carry_the_request_id_team_and_job(services_env, tmp_path, make_team):
    team_id, key = make_team()
    log = tmp_path / "api.log"
    proc, base = start_api({**services_env, "TUNEFORGE_LOG_FORMAT": "json"}, log)
    try:
        rid = f"trace-{secrets.token_hex(6)}"
        job_id = f"ftjob-{secrets.token_hex(6)}"
        r = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers={"Authorization": f"Bearer {key}",
                                                                        "X-Request-Id": rid})
        assert r.status_code == 404

        def line() -> dict | None:
            return next((entry for entry in _json_lines(log)
                         if entry.get("request_id") == rid and entry["logger"] == "tuneforge.api.requests"), None)

        entry = wait_until(line, timeout=10, message="the request's JSON log line")
        assert entry["team_id"] == team_id and entry["job_id"] == job_id
        assert entry["status"] == 404 and entry["route"] == JOB_ROUTE and entry["duration_ms"] > 0
        # Every line of the process is JSON. uvicorn's access line is logged while the route's context is
        # current: the ids bound by the /v1 dependency (not read back from the request) are on it too.
        access = [e for e in _json_lines(log) if e["logger"] == "uvicorn.access" and e.get("request_id") == rid]
        assert len(access) == 1 and access[0]["team_id"] == team_id and access[0]["job_id"] == job_id, access
    finally:
        _stop(proc)


def _json_lines(log: Path) -> list[dict]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]
