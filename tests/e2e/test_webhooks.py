"""Signed webhooks: delivered by a real worker to a real local receiver and verified with the
standardwebhooks library, retried after a 500 with both attempts in the delivery log, refused for a
private address without the operator's allowance (at create and at delivery), and kept per team."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from app.core.config import WebhookSettings
from app.domains.webhooks import delivery
from tests.api.servers import private_api
from tests.conftest import _stop, start_worker, wait_until
from tests.factories import create_job, uploaded_file_id


class Receiver:
    """A local HTTP receiver: answers each POST with the next of `answers` (then 200), and keeps them."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code == 200 else b"try later")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tuneforge"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def allowed_api(services_env, tiny_model) -> Iterator[str]:
    """An API and a worker whose operator allows private addresses (the receiver is on loopback), on
    queues of their own, so no other worker of the session takes their deliveries; retries back off
    from 0.5 s."""
    run = secrets.token_hex(3)
    env = {"TUNEFORGE_WEBHOOKS__ALLOW_PRIVATE": "true", "TUNEFORGE_WEBHOOKS__RETRY_BASE_SECONDS": "0.5",
           "TUNEFORGE_WEBHOOKS__QUEUE": f"webhooks-allowed-{run}",
           "TUNEFORGE_TRAINING_QUEUE": f"training-allowed-{run}",
           "TUNEFORGE_EVALUATION_QUEUE": f"evaluation-allowed-{run}"}
    worker = start_worker({**services_env, **env}, Path(services_env["TUNEFORGE_DATA_DIR"]) / f"worker-{run}.log")
    try:
        with private_api(services_env, **env) as base:
            yield f"{base}/v1"
    finally:
        _stop(worker)


def _client(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_a_cancelled_job_is_delivered_signed_and_retried_after_a_500(allowed_api, make_team, receiver):
    receiver.answers = [500]
    with _client(allowed_api, make_team()[1]) as client:
        r = client.post("/webhooks", json={"url": receiver.url, "events": ["fine_tuning.job.cancelled"]})
        assert r.status_code == 200, r.text
        endpoint = r.json()
        assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == ["fine_tuning.job.cancelled"]
        assert "secret" not in client.get(f"/webhooks/{endpoint['id']}").json()
        job = create_job(client, uploaded_file_id(client))
        assert client.post(f"/fine_tuning/jobs/{job['id']}/cancel").status_code == 200

        def delivered():
            page = client.get(f"/webhooks/{endpoint['id']}/deliveries").json()
            return page["data"] if page["data"] and page["data"][0]["status"] != "pending" else None

        [log] = wait_until(delivered, timeout=60, interval=0.2, message="the delivery to settle")
    assert log["status"] == "delivered" and log["event_type"] == "fine_tuning.job.cancelled"
    assert [(a["number"], a["status_code"]) for a in log["attempts"]] == [(1, 500), (2, 200)]
    assert log["attempts"][0]["error"] == "the receiver answered 500"
    assert log["attempts"][0]["response_body"] == "try later"
    # Both attempts reached the receiver as one message (one webhook-id), each verifying with the secret.
    assert len(receiver.requests) == 2
    verified = [Webhook(endpoint["secret"]).verify(body, headers) for headers, body in receiver.requests]
    assert verified[0] == verified[1] == log["payload"]
    assert {h["webhook-id"] for h, _ in receiver.requests} == {log["event_id"]}
    event = verified[0]
    assert event["object"] == "event" and event["type"] == "fine_tuning.job.cancelled"
    assert event["data"] == {"id": job["id"]}
    # A signature by another secret does not verify.
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 43 + "=").verify(*receiver.requests[0][::-1])


def test_an_endpoint_gets_only_the_events_it_asked_for(allowed_api, make_team, receiver):
    with _client(allowed_api, make_team()[1]) as client:
        only_success = client.post("/webhooks", json={"url": receiver.url, "events": ["fine_tuning.job.succeeded"]})
        everything = client.post("/webhooks", json={"url": receiver.url}).json()
        assert set(everything["events"]) >= {"fine_tuning.job.cancelled", "evaluation.failed"}
        job = create_job(client, uploaded_file_id(client))
        client.post(f"/fine_tuning/jobs/{job['id']}/cancel")
        wait_until(lambda: client.get(f"/webhooks/{everything['id']}/deliveries").json()["data"], timeout=60,
                   message="the subscribed endpoint's delivery")
        assert client.get(f"/webhooks/{only_success.json()['id']}/deliveries").json()["data"] == []


def test_a_private_address_is_refused_without_the_operators_allowance(api, make_team, receiver):
    client = api(make_team()[1])
    for url in (receiver.url, "http://localhost:8080/x", "http://10.0.0.7/x", "http://169.254.169.254/latest",
                "http://[::1]:9000/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x", "http://224.0.0.1/x"):
        r = client.post("/webhooks", json={"url": url})
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["param"] == "url" and r.json()["error"]["code"] == "url_not_allowed", url
    for url, param in (("ftp://example.com/x", "url"), ("http://user:pw@example.com/x", "url")):
        r = client.post("/webhooks", json={"url": url})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, url
    r = client.post("/webhooks", json={"url": "https://example.com/x", "events": ["fine_tuning.job.exploded"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "events.0"
    assert client.get("/webhooks").json()["data"] == []
    # At delivery too: a URL that passed (an allowance since withdrawn, or DNS that changed) is not sent.
    outcome = delivery.send(receiver.url, event_id="evt-1", payload="{}", secrets=["whsec_" + "A" * 43 + "="],
                            settings=WebhookSettings())
    assert outcome.status_code is None and outcome.error.startswith("not sent:") and "127.0.0.1" in outcome.error
    assert receiver.requests == []
    # The allowlist lets the one network through.
    allowed = WebhookSettings(allowed_networks=("127.0.0.0/8",))
    assert delivery.send(receiver.url, event_id="evt-2", payload="{}", secrets=["whsec_" + "A" * 43 + "="],
                         settings=allowed).delivered
    assert len(receiver.requests) == 1


def test_endpoints_and_their_deliveries_are_per_team(allowed_api, make_team, receiver):
    with _client(allowed_api, make_team()[1]) as owner, _client(allowed_api, make_team()[1]) as other:
        endpoint = owner.post("/webhooks", json={"url": receiver.url}).json()
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/rotate_secret"), ("GET", "/deliveries")):
            r = other.request(method, f"/webhooks/{endpoint['id']}{path}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "webhook_not_found", (method, path)
        assert other.get("/webhooks").json()["data"] == []
        # Team B's job ending sends nothing to team A's endpoint.
        job = create_job(other, uploaded_file_id(other))
        other.post(f"/fine_tuning/jobs/{job['id']}/cancel")
        mine = create_job(owner, uploaded_file_id(owner))
        owner.post(f"/fine_tuning/jobs/{mine['id']}/cancel")
        [log] = wait_until(lambda: owner.get(f"/webhooks/{endpoint['id']}/deliveries").json()["data"], timeout=60,
                           message="the owner's delivery")
        assert log["payload"]["data"] == {"id": mine["id"]}
        # Rotation: a new secret, and deliveries during the grace carry a signature by each.
        rotated = owner.post(f"/webhooks/{endpoint['id']}/rotate_secret").json()
        assert rotated["secret"] != endpoint["secret"]
        wait_until(lambda: len(receiver.requests) == 1, timeout=30, message="the first delivery")
        again = create_job(owner, uploaded_file_id(owner))
        owner.post(f"/fine_tuning/jobs/{again['id']}/cancel")
        wait_until(lambda: len(receiver.requests) == 2, timeout=60, message="the delivery after rotation")
        headers, body = receiver.requests[1]
        assert len(headers["webhook-signature"].split(" ")) == 2
        for secret in (endpoint["secret"], rotated["secret"]):
            assert Webhook(secret).verify(body, headers)["data"] == {"id": again["id"]}
        assert owner.delete(f"/webhooks/{endpoint['id']}").json() == {
            "id": endpoint["id"], "object": "webhook_endpoint.deleted", "deleted": True}
        assert owner.get(f"/webhooks/{endpoint['id']}").status_code == 404
