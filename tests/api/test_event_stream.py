"""GET /v1/fine_tuning/jobs/{id}/events?stream=true: server-sent events, resumable with Last-Event-ID,
live while a job trains, closed when it ends; on Postgres and on the embedded default (SQLite)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.api.servers import embedded_instance, private_api
from tests.factories import all_events, create_job, uploaded_file_id


def read_stream(client: httpx.Client, job_id: str, *, last_event_id: str | None = None, timeout: float = 120,
                on_message=None) -> list[dict]:
    """The stream's messages as {"id", "data" (parsed), "received" (monotonic time)}, until the server
    closes it; comments are skipped. Fails when the stream is still open at the deadline."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}, headers=headers,
                       timeout=httpx.Timeout(timeout)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            assert time.monotonic() < deadline, "the stream stayed open past the deadline"
            if line == "":
                if "data" in fields:
                    message = {"id": fields.get("id"), "data": json.loads(fields["data"]),
                               "received": time.monotonic()}
                    messages.append(message)
                    if on_message:
                        on_message(message)
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
    return messages


def _ended_job(client: httpx.Client) -> dict:
    """A job with a few events that has ended (created, then cancelled while queued)."""
    job = create_job(client, uploaded_file_id(client))
    assert client.post(f"/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    return job


def _check_resumption(client: httpx.Client) -> None:
    job = _ended_job(client)
    listed = all_events(client, job["id"])
    assert len(listed) >= 3
    streamed = read_stream(client, job["id"])
    # Every event, oldest first, each with its id as the SSE id and the list's own JSON as data.
    assert [m["data"] for m in streamed] == listed
    assert [m["id"] for m in streamed] == [e["id"] for e in listed]
    resumed = read_stream(client, job["id"], last_event_id=listed[0]["id"])
    assert [m["data"] for m in resumed] == listed[1:]
    assert read_stream(client, job["id"], last_event_id=listed[-1]["id"]) == []


def test_a_stream_resumed_with_last_event_id_sends_exactly_the_later_events(api, make_team, tiny_model):
    _check_resumption(api(make_team()[1]))


def test_the_stream_resumes_on_the_embedded_default(services_env, tmp_path, tiny_model, make_team):
    with embedded_instance(tmp_path, tiny_model) as env, private_api(services_env, **env) as base:
        with httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {make_team()[1]}"},
                          timeout=60) as client:
            _check_resumption(client)


def test_another_teams_job_is_not_found_and_bad_stream_parameters_answer_400(api, make_team, tiny_model):
    owner, other = api(make_team()[1]), api(make_team()[1])
    job = _ended_job(owner)
    r = other.get(f"/fine_tuning/jobs/{job['id']}/events", params={"stream": "true"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    # Another team's event id is not an event of this job.
    theirs = all_events(other, _ended_job(other)["id"])[0]["id"]
    r = owner.get(f"/fine_tuning/jobs/{job['id']}/events", params={"stream": "true"}, headers={"Last-Event-ID": theirs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"
    for name, value in (("after", theirs), ("limit", "5")):
        r = owner.get(f"/fine_tuning/jobs/{job['id']}/events", params={"stream": "true", name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name
    # The list is unchanged: newest first, paged by after/limit.
    page = owner.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 1}).json()
    assert page["object"] == "list" and len(page["data"]) == 1 and page["has_more"] is True
    assert page["data"][0]["message"] == "Job cancelled"


@pytest.mark.usefixtures("worker")
def test_a_training_job_streams_its_metrics_events_as_they_are_written(api, make_team, tiny_model):
    client = api(make_team()[1])
    job = create_job(client, uploaded_file_id(client), hyperparameters={"n_epochs": 1, "batch_size": 1},
                     training={"logging_steps": 1, "max_steps": 30})
    states_seen: list[str] = []

    def note_status(message: dict) -> None:
        if message["data"]["type"] == "metrics" and not states_seen:
            # The first metrics event arrives while the job is still training, not replayed after it ended.
            states_seen.append(client.get(f"/fine_tuning/jobs/{job['id']}").json()["status"])

    streamed = read_stream(client, job["id"], timeout=300, on_message=note_status)
    final = client.get(f"/fine_tuning/jobs/{job['id']}").json()
    assert final["status"] == "succeeded", final
    metrics = [m for m in streamed if m["data"]["type"] == "metrics"]
    assert len(metrics) >= 2 and all("step" in m["data"]["data"] for m in metrics)
    assert states_seen == ["running"]
    # The stream held every event the job has, in order, and closed once it ended.
    assert [m["data"] for m in streamed] == all_events(client, job["id"])
    assert streamed[-1]["data"]["message"].startswith("The job has successfully completed")
