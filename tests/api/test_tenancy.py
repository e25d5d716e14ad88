"""Tenancy: admin and member keys, key rotation and revocation, per-team quotas and per-key rate limits."""

from __future__ import annotations

import hashlib
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import func, select

from app.core.db import session_scope
from app.domains.files.models import File
from app.core.ids import new_id
from app.domains.jobs import lease as job_lease
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.spec import TrainingSpec
from app.domains.jobs.states import JobStatus
from app.domains.quotas import service as quotas
from app.domains.quotas.ratelimit import LocalBuckets
from app.domains.teams.models import ApiKey
from tests.conftest import _spawn, _stop, free_port, wait_until
from tests.factories import demo_tasks, jsonl, upload, uploaded_file_id
from tests.routes import v1_routes

# The admin-only routes as the API documents them (x-tuneforge-role in the OpenAPI schema).
EXPECTED_ADMIN = {("POST", "/v1/keys"), ("GET", "/v1/keys"), ("GET", "/v1/keys/{key_id}"),
                  ("DELETE", "/v1/keys/{key_id}"), ("POST", "/v1/keys/{key_id}/rotate"),
                  ("GET", "/v1/audit_events")}


def _admin_routes() -> set[tuple[str, str]]:
    from app.main import create_app

    paths = create_app().openapi()["paths"]
    return {(m.upper(), p) for p, ops in paths.items() for m, op in ops.items()
            if isinstance(op, dict) and op.get("x-tuneforge-role") == "admin"}


def _url(server: str, path: str) -> str:
    return server + path.replace("{", "").replace("}", "").replace(":path", "")


def _new_key(client: httpx.Client, role: str = "member", name: str = "ci") -> dict:
    r = client.post("/keys", json={"role": role, "name": name})
    assert r.status_code == 200, r.text
    return r.json()


def _set_quota(team_id: str, **values) -> None:
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, **values)


# -- roles and the route walk -------------------------------------------------------------------

def test_every_route_refuses_no_key_a_revoked_key_and_a_member_key_on_admin_routes(server, api, make_team):
    _, admin_key = make_team()
    admin = api(admin_key)
    member_key = _new_key(admin)["key"]
    revoked = _new_key(admin, role="admin")
    assert admin.delete(f"/keys/{revoked['id']}").status_code == 200
    admin_routes = _admin_routes()
    assert admin_routes >= EXPECTED_ADMIN

    for method, path in v1_routes():
        url = _url(server, path)
        for label, headers in (("no key", {}), ("revoked key", {"Authorization": f"Bearer {revoked['key']}"})):
            r = httpx.request(method, url, headers=headers, timeout=30)
            assert r.status_code == 401, (label, method, path, r.status_code, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
        if (method, path) in admin_routes:
            r = httpx.request(method, url, headers={"Authorization": f"Bearer {member_key}"}, timeout=30)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "admin_key_required" and "admin key" in error["message"]


def test_a_teams_first_key_is_admin_and_new_keys_carry_their_role(api, make_team):
    team_id, admin_key = make_team()
    admin = api(admin_key)
    created = _new_key(admin, role="member", name="ci-runner")
    assert created["role"] == "member" and created["name"] == "ci-runner" and created["key"].startswith("tf_")
    member = api(created["key"])
    assert member.get("/files").status_code == 200  # members use the API
    assert member.post("/keys", json={"role": "admin"}).status_code == 403  # but cannot mint keys

    listed = admin.get("/keys").json()["data"]
    roles = {k["id"]: k["role"] for k in listed}
    assert roles[created["id"]] == "member" and sorted(roles.values()) == ["admin", "member"]
    for item in listed:  # never the secret or its hash
        assert "key" not in item and "key_hash" not in item
        assert item["redacted_value"].startswith("tf_") and item["redacted_value"].endswith("…")
    with session_scope() as session:
        row = session.get(ApiKey, created["id"])
        assert row.key_hash == hashlib.sha256(created["key"].encode()).hexdigest()
        assert row.key_hash not in str(listed)


def test_key_creation_validates_role_and_name(api, make_team):
    _, admin_key = make_team()
    admin = api(admin_key)
    r = admin.post("/keys", json={"role": "owner"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "role"
    r = admin.post("/keys", json={"name": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"


def test_another_teams_key_looks_missing(api, make_team):
    _, key_a = make_team()
    _, key_b = make_team()
    other = _new_key(api(key_b))
    admin_a = api(key_a)
    for method, path in (("GET", f"/keys/{other['id']}"), ("DELETE", f"/keys/{other['id']}"),
                         ("POST", f"/keys/{other['id']}/rotate")):
        r = admin_a.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found", (method, r.text)
    assert api(other["key"]).get("/files").status_code == 200  # untouched


# -- revocation and rotation ----------------------------------------------------------------------

def test_a_revoked_key_answers_401_from_the_next_request_on(api, make_team):
    _, admin_key = make_team()
    admin = api(admin_key)
    created = _new_key(admin)
    client = api(created["key"])
    assert client.get("/files").status_code == 200
    r = admin.delete(f"/keys/{created['id']}")
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert client.get("/files").status_code == 401
    assert upload(client, demo_tasks()).status_code == 401
    again = admin.delete(f"/keys/{created['id']}")  # idempotent
    assert again.status_code == 200 and again.json()["revoked_at"] == r.json()["revoked_at"]


def test_rotation_returns_a_new_key_and_revokes_the_old_one_at_once(api, make_team):
    _, admin_key = make_team()
    admin = api(admin_key)
    old = _new_key(admin, name="deploy")
    r = admin.post(f"/keys/{old['id']}/rotate")
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["id"] != old["id"] and new["key"] != old["key"]
    assert (new["name"], new["role"]) == ("deploy", "member")
    assert api(old["key"]).get("/files").status_code == 401
    assert api(new["key"]).get("/files").status_code == 200
    r = admin.post(f"/keys/{old['id']}/rotate")
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_revoked"


def test_rotation_with_a_grace_period_keeps_the_old_key_working_until_it_ends(api, make_team):
    _, admin_key = make_team()
    admin = api(admin_key)
    old = _new_key(admin)
    r = admin.post(f"/keys/{old['id']}/rotate", json={"grace_seconds": 2})
    assert r.status_code == 200, r.text
    new = r.json()
    old_client = api(old["key"])
    assert old_client.get("/files").status_code == 200  # still in its grace period
    assert api(new["key"]).get("/files").status_code == 200
    wait_until(lambda: old_client.get("/files").status_code == 401, timeout=15, interval=0.25,
               message="the old key to expire after its grace period")
    r = admin.post(f"/keys/{old['id']}/rotate", json={"grace_seconds": 100_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grace_seconds"


def test_the_last_admin_key_cannot_be_revoked_but_can_be_rotated(api, make_team):
    team_id, admin_key = make_team()
    admin = api(admin_key)
    with session_scope() as session:
        admin_id = session.scalar(select(ApiKey.id).where(ApiKey.team_id == team_id))
    r = admin.delete(f"/keys/{admin_id}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "last_admin_key"
    assert admin.get("/files").status_code == 200
    rotated = admin.post(f"/keys/{admin_id}/rotate").json()
    assert rotated["role"] == "admin"
    assert admin.get("/keys").status_code == 401
    assert api(rotated["key"]).get("/keys").status_code == 200


# -- quotas ---------------------------------------------------------------------------------------

def _team_blobs(services_env, team_id: str) -> list[Path]:
    root = Path(services_env["TUNEFORGE_DATA_DIR"]) / "storage"
    return [p for p in (root / "teams" / team_id).rglob("*") if p.is_file()]


def _temp_files(services_env) -> set[Path]:
    return set((Path(services_env["TUNEFORGE_DATA_DIR"]) / "storage" / ".tmp").glob("*"))


def _file_rows(team_id: str) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(File).where(File.team_id == team_id))


def test_an_upload_over_the_storage_quota_answers_409_and_stores_nothing(api, make_team, services_env):
    team_id, key = make_team()
    client = api(key)
    content = demo_tasks()
    _set_quota(team_id, storage_bytes=len(content) + 100)
    assert upload(client, content).status_code == 200
    temps = _temp_files(services_env)
    r = upload(client, content)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "storage_quota_exceeded" and error["param"] == "file"
    assert (error["limit"], error["usage"]) == (len(content) + 100, len(content))
    assert f"limit is {len(content) + 100} bytes" in error["message"]
    assert f"use {len(content)} bytes" in error["message"]
    assert _file_rows(team_id) == 1
    assert len(_team_blobs(services_env, team_id)) == 1
    assert _temp_files(services_env) <= temps  # the streamed temporary file is gone too
    assert upload(client, jsonl([{"text": "small"}])).status_code == 200  # what still fits is accepted


def test_adapters_count_towards_the_storage_quota_until_deleted(api, make_team, services_env, tiny_model, tmp_path):
    from app.core.ids import new_id
    from app.core.storage import get_storage
    from app.domains.adapters import service as adapters

    team_id, key = make_team()
    client = api(key)
    content = demo_tasks()
    adapter_id = new_id("ftadapter")
    prefix = f"teams/{team_id}/adapters/{adapter_id}"
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(b"\x1f" * len(content))
    blob = get_storage().put_file(archive, f"{prefix}/adapter.tar.gz")
    with session_scope() as session:
        adapters.create(session, adapter_id=adapter_id, team_id=team_id, job_id=None, base_model="tiny-llama",
                        name=f"ft:tiny-llama:quota-{secrets.token_hex(3)}", storage_prefix=prefix,
                        archive_key=blob.key, size=blob.bytes, sha256=blob.sha256)
    _set_quota(team_id, storage_bytes=len(content) + 100)
    assert client.get("/quotas").json()["storage_bytes"]["usage"] == len(content)
    r = upload(client, content)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "storage_quota_exceeded" and error["usage"] == len(content)
    assert "files and adapters use" in error["message"] and "/v1/adapters/{id}" in error["message"]
    assert client.delete(f"/adapters/{adapter_id}").status_code == 200
    assert client.get("/quotas").json()["storage_bytes"]["usage"] == 0
    assert upload(client, content).status_code == 200


def test_uploads_past_the_files_quota_answer_409(api, make_team, services_env):
    team_id, key = make_team()
    client = api(key)
    _set_quota(team_id, files=2)
    for i in range(2):
        assert upload(client, jsonl([{"text": f"file {i}"}])).status_code == 200
    r = upload(client, jsonl([{"text": "one too many"}]))
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "files_quota_exceeded" and (error["limit"], error["usage"]) == (2, 2)
    assert "has 2 file(s)" in error["message"] and "limit is 2" in error["message"]
    assert _file_rows(team_id) == 2 and len(_team_blobs(services_env, team_id)) == 2
    usage = client.get("/quotas").json()
    assert usage["files"] == {"limit": 2, "usage": 2}
    first = client.get("/files").json()["data"][0]["id"]
    assert client.delete(f"/files/{first}").status_code == 200
    assert upload(client, jsonl([{"text": "fits again"}])).status_code == 200


def test_concurrent_uploads_cannot_both_take_the_last_file_slot(api, make_team, services_env):
    team_id, key = make_team()
    client = api(key)
    _set_quota(team_id, files=2)
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda i: upload(client, jsonl([{"text": f"racer {i}"}])).status_code, range(6)))
    assert sorted(statuses) == [200, 200, 409, 409, 409, 409]
    assert _file_rows(team_id) == 2 and len(_team_blobs(services_env, team_id)) == 2


def _queued_job(team_id: str, file_id: str) -> str:
    """A job in 'queued' that is not sent to any queue, so no worker can start it during the test:
    the row alone (jobs.create would enqueue it on commit)."""
    with session_scope() as session:
        job = FineTuningJob(id=new_id("ftjob"), team_id=team_id, model="tiny-llama", training_file=file_id,
                            status=JobStatus.QUEUED, spec=TrainingSpec().model_dump(mode="json"), seed=42, attempts=0)
        session.add(job)
        return job.id


def test_jobs_past_the_queued_jobs_quota_answer_429(api, make_team, tiny_model):
    team_id, key = make_team()
    client = api(key)
    file_id = uploaded_file_id(client)
    _set_quota(team_id, queued_jobs=1)
    waiting = _queued_job(team_id, file_id)
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queued_jobs_quota_exceeded"
    assert (error["limit"], error["usage"]) == (1, 1) and "limit is 1" in error["message"]
    assert client.get("/fine_tuning/jobs").json()["data"] == [client.get(f"/fine_tuning/jobs/{waiting}").json()]
    assert client.post(f"/fine_tuning/jobs/{waiting}/cancel").status_code == 200
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert r.status_code == 200, r.text
    client.post(f"/fine_tuning/jobs/{r.json()['id']}/cancel")


def test_may_start_holds_a_team_to_its_running_jobs_quota(api, make_team, tiny_model):
    team_id, key = make_team()
    other_team, _ = make_team()
    client = api(key)
    file_id = uploaded_file_id(client)
    _set_quota(team_id, running_jobs=1)
    first, second = _queued_job(team_id, file_id), _queued_job(team_id, file_id)
    try:
        with session_scope() as session:
            assert job_lease.may_start(session, team_id)
            assert job_lease.claim(session, job_id=first, worker_id="quota-test", lease_seconds=60,
                                   max_attempts=3) is not None
        with session_scope() as session:
            assert not job_lease.may_start(session, team_id)
            assert job_lease.may_start(session, other_team)  # the limit is per team
        with session_scope() as session:  # the claim asks may_start: the second job stays queued
            assert job_lease.claim(session, job_id=second, worker_id="quota-test", lease_seconds=60,
                                   max_attempts=3) is None
        assert client.get(f"/fine_tuning/jobs/{second}").json()["status"] == "queued"
        assert client.get("/quotas").json()["running_jobs"] == {"limit": 1, "usage": 1}
        _set_quota(team_id, running_jobs=2)
        with session_scope() as session:
            assert job_lease.may_start(session, team_id)
    finally:
        for job_id in (first, second):
            client.post(f"/fine_tuning/jobs/{job_id}/cancel")


def test_quotas_report_defaults_and_overrides(api, make_team):
    team_id, key = make_team()
    client = api(key)
    body = client.get("/quotas").json()
    assert body["object"] == "quota" and body["files"]["usage"] == 0 and body["files"]["limit"] >= 1000
    _set_quota(team_id, files=5, storage_bytes=10)
    body = client.get("/quotas").json()
    assert body["files"]["limit"] == 5 and body["storage_bytes"]["limit"] == 10
    _set_quota(team_id, files=None)
    body = client.get("/quotas").json()
    assert body["files"]["limit"] >= 1000 and body["storage_bytes"]["limit"] == 10  # files back to the default


# -- rate limits ----------------------------------------------------------------------------------

def test_a_key_over_its_rate_limit_gets_429_with_retry_after(api, make_team):
    team_id, admin_key = make_team()
    _, other_key = make_team()
    admin = api(admin_key)
    second = api(_new_key(admin)["key"])
    _set_quota(team_id, rate_per_second=0.5, rate_burst=3)
    statuses = [admin.get("/files").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = admin.get("/files")
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "3 requests at once" in error["message"]
    assert second.get("/files").status_code == 200  # buckets are per key
    assert api(other_key).get("/files").status_code == 200
    wait_until(lambda: admin.get("/files").status_code == 200, timeout=10, interval=0.5,
               message="the bucket to refill")


def test_rate_limit_buckets_are_shared_by_api_processes_through_redis(api, make_team, services_env, server):
    team_id, key = make_team()
    _set_quota(team_id, rate_per_second=0.01, rate_burst=4)
    port = free_port()
    proc = _spawn([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(port)], services_env, Path(services_env["TUNEFORGE_DATA_DIR"]) / "api-2.log")
    try:
        second = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {key}"})

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, message="the second API process")
        first = api(key)
        assert [first.get("/files").status_code for _ in range(2)] == [200, 200]
        assert [second.get("/files").status_code for _ in range(2)] == [200, 200]
        assert second.get("/files").status_code == 429
        assert first.get("/files").status_code == 429
        second.close()
    finally:
        _stop(proc)


def test_the_in_process_bucket_allows_the_burst_then_asks_to_wait():
    buckets = LocalBuckets()
    assert [buckets.take("k", rate=0.001, burst=3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.take("k", rate=0.001, burst=3)
    assert 900 < wait <= 1000  # one token at 0.001/s takes 1000 s
    assert buckets.take("other", rate=0.001, burst=3) == 0.0
    assert buckets.take("fast", rate=1e6, burst=1) == 0.0 and buckets.take("fast", rate=1e6, burst=1) < 0.01


def test_cli_sets_and_clears_quota_overrides_and_refuses_bad_values(make_team, capsys):
    from tuneforge.cli import main

    name = f"quota-cli-{secrets.token_hex(4)}"
    team_id, _ = make_team(name)
    assert main(["admin", "set-quota", name, "--files", "7", "--rate-per-second", "2.5"]) == 0
    with session_scope() as session:
        limits = quotas.limits(session, team_id)
    assert (limits.files, limits.rate_per_second) == (7, 2.5)
    assert main(["admin", "set-quota", name, "--files", "default"]) == 0
    with session_scope() as session:
        assert quotas.limits(session, team_id).files >= 1000
    for bad in ("-1", "many"):
        assert main(["admin", "set-quota", name, "--files", bad]) == 1
        assert "--files" in capsys.readouterr().err
    assert main(["admin", "set-quota", "no-such-team", "--files", "1"]) == 1


def test_cli_create_key_gives_an_operator_a_working_key_of_the_role_asked(api, make_team, capsys):
    from tuneforge.cli import main

    name = f"key-cli-{secrets.token_hex(4)}"
    make_team(name)
    assert main(["admin", "create-key", name, "--role", "member"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    client = api(key)
    assert client.get("/files").status_code == 200
    assert client.get("/keys").status_code == 403  # a member key
    assert main(["admin", "create-key", "no-such-team"]) == 1
