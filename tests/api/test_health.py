"""Health probes: /healthz is the process, /readyz everything a request needs."""

from __future__ import annotations


def test_health_probes_report_database_broker_and_storage(server):
    import httpx

    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": "ok", "broker": "ok", "storage": "ok"}
