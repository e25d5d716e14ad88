"""Concurrent requests that race a check against a write: quotas, the last-admin guard, files in use,
downloads against deletes and one Idempotency-Key, on Postgres and on the embedded default (SQLite)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
from sqlalchemy import select

from app.core.db import session_scope
from app.domains.quotas import service as quotas
from app.domains.teams.models import ApiKey
from tests.api.servers import embedded_instance, private_api
from tests.factories import (create_job, demo_tasks, jsonl, post_job, stored_adapter, upload,
                             uploaded_file_id)


@contextmanager
def _embedded_server(services_env, tmp_path, tiny_model) -> Iterator[str]:
    with embedded_instance(tmp_path, tiny_model) as env, private_api(services_env, **env) as base:
        yield f"{base}/v1"


def _client(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _admin_key_id(team_id: str) -> str:
    with session_scope() as session:
        return session.scalar(select(ApiKey.id).where(ApiKey.team_id == team_id))


def _active_admin_keys(client: httpx.Client) -> list[str]:
    keys = client.get("/keys", params={"limit": 100}).json()["data"]
    return [k["id"] for k in keys if k["role"] == "admin" and k["revoked_at"] is None]


# -- the last-admin guard -------------------------------------------------------------------------

def test_the_key_that_replaced_the_last_admin_key_cannot_be_revoked_during_the_grace(server, make_team):
    team_id, old_key = make_team()
    old_id = _admin_key_id(team_id)
    with _client(f"{server}/v1", old_key) as old:
        rotated = old.post(f"/keys/{old_id}/rotate", json={"grace_seconds": 600}).json()
        # The old key still works, but only until its grace ends: it cannot stand in for the new one.
        r = old.delete(f"/keys/{rotated['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "last_admin_key", r.text
        # Ending the old key's grace early is allowed: the new key stays.
        assert old.delete(f"/keys/{old_id}").status_code == 200
    with _client(f"{server}/v1", rotated["key"]) as new:
        assert _active_admin_keys(new) == [rotated["id"]]


def _revoke_both_at_once(base: str, make_team, rounds: int) -> None:
    """Each round: a team with two admin keys, and both revoked at once. One revoke wins."""
    for _ in range(rounds):
        team_id, first_key = make_team()
        first_id = _admin_key_id(team_id)
        with _client(base, first_key) as first:
            second = first.post("/keys", json={"name": "second", "role": "admin"}).json()
            with _client(base, second["key"]) as other, ThreadPoolExecutor(max_workers=2) as pool:
                answers = list(pool.map(lambda c, key_id: c.delete(f"/keys/{key_id}"),
                                        [first, other], [second["id"], first_id]))
                # The loser is refused as the last admin, or, when the winner committed before it was
                # authenticated, as a revoked key.
                codes = [r.status_code for r in answers]
                assert codes.count(200) == 1 and set(codes) - {200} <= {401, 409}, [r.text for r in answers]
                survivor = first if codes[0] == 200 else other
                assert len(_active_admin_keys(survivor)) == 1


def test_two_revokes_at_once_of_the_last_two_admin_keys_leave_one_on_postgres(server, make_team):
    _revoke_both_at_once(f"{server}/v1", make_team, rounds=5)


def test_two_revokes_at_once_of_the_last_two_admin_keys_leave_one_on_sqlite(services_env, tmp_path, tiny_model,
                                                                             make_team):
    with _embedded_server(services_env, tmp_path, tiny_model) as base:
        _revoke_both_at_once(base, make_team, rounds=5)


# -- the queued-jobs quota ------------------------------------------------------------------------

def test_a_burst_of_creates_on_sqlite_never_admits_more_jobs_than_the_queued_quota(services_env, tmp_path,
                                                                                   tiny_model, make_team):
    with _embedded_server(services_env, tmp_path, tiny_model) as base:
        team_id, key = make_team()
        with session_scope() as session:
            quotas.set_overrides(session, team_id=team_id, queued_jobs=20)
        with _client(base, key) as client, ThreadPoolExecutor(max_workers=30) as pool:
            file_id = uploaded_file_id(client)
            codes = list(pool.map(lambda _: post_job(client, file_id).status_code, range(30)))
            jobs = client.get("/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    assert sorted(set(codes)) == [200, 429] and codes.count(200) == 20, codes
    assert len(jobs) == 20 and {j["status"] for j in jobs} == {"queued"}


# -- files in use ---------------------------------------------------------------------------------

def test_a_file_that_an_unfinished_job_evaluates_on_cannot_be_deleted(services_env, tmp_path, tiny_model, make_team):
    # On the embedded default no worker takes the job, so it stays queued for as long as the test needs.
    with _embedded_server(services_env, tmp_path, tiny_model) as base:
        _, key = make_team()
        with _client(base, key) as client:
            training, tasks = uploaded_file_id(client), uploaded_file_id(client)
            job = create_job(client, training, eval={"tasks": tasks})
            r = client.delete(f"/files/{tasks}")
            assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use", r.text
            assert job["id"] in r.json()["error"]["message"]
            assert client.get(f"/files/{tasks}/content").content == demo_tasks()
            assert client.post(f"/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
            assert client.delete(f"/files/{tasks}").status_code == 200


def test_the_files_that_a_queued_evaluation_reads_cannot_be_deleted(services_env, tmp_path, tiny_model, make_team):
    with _embedded_server(services_env, tmp_path, tiny_model) as base:
        _, key = make_team()
        with _client(base, key) as client:
            tasks = uploaded_file_id(client)
            completions = upload(client, jsonl([{"task_id": 1, "completion": "def add(a, b):\n    return a + b"}]),
                                 purpose="evals").json()["id"]
            ev = client.post("/evaluations", json={"completions_file": completions, "tasks": tasks})
            assert ev.status_code == 200 and ev.json()["status"] == "queued", ev.text
            for file_id in (tasks, completions):
                r = client.delete(f"/files/{file_id}")
                assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use", r.text
                assert ev.json()["id"] in r.json()["error"]["message"]
                assert client.get(f"/files/{file_id}").status_code == 200


# -- downloads racing deletes ---------------------------------------------------------------------

def _race_download_and_delete(client: httpx.Client, path: str, expected: bytes) -> None:
    """GET path/content and DELETE path at once: the download must be the whole body or a 404."""
    barrier = threading.Barrier(2)

    def download() -> tuple[int, bytes]:
        barrier.wait()
        with client.stream("GET", f"{path}/content") as r:
            return r.status_code, r.read()  # an aborted body raises here

    def delete() -> int:
        barrier.wait()
        return client.delete(path).status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        got, deleted = pool.submit(download), pool.submit(delete)
        (status, body), deleted_status = got.result(timeout=60), deleted.result(timeout=60)
    assert deleted_status == 200
    assert (status, body) == (200, expected) or status == 404, (status, len(body), len(expected))


def test_a_file_downloaded_while_it_is_deleted_arrives_whole_or_answers_404(api, make_team):
    _, key = make_team()
    client = api(key)
    content = jsonl([{"text": f"line {i} " + "x" * 200} for i in range(1000)])
    for _ in range(30):
        _race_download_and_delete(client, f"/files/{uploaded_file_id(client, content)}", content)


def test_an_adapter_downloaded_while_it_is_deleted_arrives_whole_or_answers_404(api, make_team, tiny_model,
                                                                                 tmp_path):
    team_id, key = make_team()
    client = api(key)
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(secrets.token_bytes(1 << 20))
    for _ in range(30):
        _race_download_and_delete(client, f"/adapters/{stored_adapter(team_id, archive)}", archive.read_bytes())


# -- one Idempotency-Key --------------------------------------------------------------------------

def _creates_with_one_key(base: str, key: str) -> None:
    """50 creates at once with one Idempotency-Key: every one answers the first one's job, and the
    team has that job only."""
    with _client(base, key) as client, ThreadPoolExecutor(max_workers=50) as pool:
        file_id = uploaded_file_id(client)
        headers = {"Idempotency-Key": f"burst-{secrets.token_hex(4)}"}
        answers = list(pool.map(lambda _: client.post("/fine_tuning/jobs", headers=headers, json={
            "model": "tiny-llama", "training_file": file_id}), range(50)))
        assert [r.status_code for r in answers] == [200] * 50, {r.status_code: r.text for r in answers}
        assert len({r.json()["id"] for r in answers}) == 1
        jobs = client.get("/fine_tuning/jobs", params={"limit": 100}).json()["data"]
        assert [j["id"] for j in jobs] == [answers[0].json()["id"]]


def test_concurrent_creates_with_one_idempotency_key_return_one_job_on_postgres(server, tiny_model, make_team):
    _, key = make_team()
    _creates_with_one_key(f"{server}/v1", key)


def test_concurrent_creates_with_one_idempotency_key_return_one_job_on_sqlite(services_env, tmp_path, tiny_model,
                                                                             make_team):
    with _embedded_server(services_env, tmp_path, tiny_model) as base:
        _, key = make_team()
        _creates_with_one_key(base, key)
