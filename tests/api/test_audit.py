"""The audit log: a row for every mutating /v1 request made with a key, refused ones included, written with
the mutation it records; unauthenticated requests counted, not stored; append-only but for prune; admins read it."""

from __future__ import annotations

import datetime as dt
import secrets
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError

from app.core.db import session_scope, utcnow
from app.domains.audit import service as audit
from app.domains.audit.models import AuditEvent, AuditUnauthenticated
from app.domains.quotas import service as quotas
from tests.api.servers import embedded_instance, private_api
from tests.conftest import wait_until
from tests.factories import jsonl, upload, uploaded_file_id
from tests.test_cli import _env, _tuneforge


def _events(client: httpx.Client, **params) -> list[dict]:
    """Every audit event of the team, newest first, walking the pages."""
    events, after = [], None
    while True:
        page = client.get("/audit_events", params={"limit": 100, **params, **({"after": after} if after else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        events += body["data"]
        if not body["has_more"]:
            return events
        after = body["data"][-1]["id"]


def test_every_kind_of_mutation_leaves_a_row_with_team_key_action_object_and_result(api, make_team, tiny_model):
    team_id, admin_key = make_team()
    admin = api(admin_key)
    key_id = admin.get("/keys").json()["data"][0]["id"]

    file_id = uploaded_file_id(admin)
    job = admin.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}).json()
    admin.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    member = admin.post("/keys", json={"role": "member", "name": "ci"}).json()
    rotated = admin.post(f"/keys/{member['id']}/rotate").json()
    assert admin.delete(f"/keys/{rotated['id']}").status_code == 200
    spare = uploaded_file_id(admin, jsonl([{"text": "spare"}]))
    assert admin.delete(f"/files/{spare}").status_code == 200
    missing = f"ftadapter-{secrets.token_hex(12)}"
    assert admin.delete(f"/adapters/{missing}").status_code == 404
    assert admin.post("/keys", json={"role": "owner"}).status_code == 400
    admin.get("/files")  # reads are not audited

    got = {(e["action"], e["object_id"], e["status_code"]) for e in _events(admin)}
    expected = {
        ("POST /v1/files", file_id, 200),
        ("POST /v1/fine_tuning/jobs", job["id"], 200),
        ("POST /v1/fine_tuning/jobs/{job_id}/cancel", job["id"], 200),
        ("POST /v1/keys", member["id"], 200),
        ("POST /v1/keys/{key_id}/rotate", member["id"], 200),
        ("DELETE /v1/keys/{key_id}", rotated["id"], 200),
        ("POST /v1/files", spare, 200),
        ("DELETE /v1/files/{file_id}", spare, 200),
        ("DELETE /v1/adapters/{adapter_id}", missing, 404),
        ("POST /v1/keys", None, 400),
    }
    assert got == expected
    events = _events(admin)
    assert all(e["team_id"] == team_id and e["key_id"] == key_id and e["object"] == "audit_event" for e in events)
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)  # newest first
    assert all(isinstance(e["created_at"], int) and e["created_at"] >= job["created_at"] for e in events[:-1])


def _unauthenticated(method: str, route: str, status: int) -> int:
    """How many unauthenticated requests audit_unauthenticated has counted for this method, route and status."""
    with session_scope() as session:
        return session.scalar(select(func.coalesce(func.sum(AuditUnauthenticated.count), 0)).where(
            AuditUnauthenticated.method == method, AuditUnauthenticated.route == route,
            AuditUnauthenticated.status_code == status))


def test_refused_requests_of_a_key_get_a_row_and_unauthenticated_ones_are_counted(api, make_team):
    team_id, admin_key = make_team()
    admin = api(admin_key)
    member = admin.post("/keys", json={"role": "member"}).json()
    probe = f"file-{secrets.token_hex(12)}"
    counted = _unauthenticated("DELETE", "/v1/files/{file_id}", 401)
    assert api(None).delete(f"/files/{probe}").status_code == 401
    assert api("tf_0123456789abcdef_" + "x" * 43).delete(f"/files/{probe}").status_code == 401
    assert api(member["key"]).post("/keys", json={}).status_code == 403
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, files=0)
    assert upload(api(member["key"]), jsonl([{"text": "x"}])).status_code == 409

    wait_until(lambda: _unauthenticated("DELETE", "/v1/files/{file_id}", 401) >= counted + 2, timeout=15,
               message="the two 401s to be counted")
    assert _unauthenticated("DELETE", "/v1/files/{file_id}", 401) == counted + 2
    with session_scope() as session:
        assert session.scalars(select(AuditEvent).where(AuditEvent.object_id == probe)).all() == []
    mine = {(e["key_id"], e["action"], e["status_code"]) for e in _events(admin, key_id=member["id"])}
    assert mine == {(member["id"], "POST /v1/keys", 403), (member["id"], "POST /v1/files", 409)}


def test_rate_limited_requests_are_recorded(api, make_team):
    team_id, key = make_team()
    client = api(key)
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, rate_per_second=0.01, rate_burst=2)
    statuses = [client.delete(f"/files/file-{secrets.token_hex(12)}").status_code for _ in range(3)]
    assert statuses == [404, 404, 429]
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, rate_per_second=None, rate_burst=None)
    rows = _events(client, action="DELETE /v1/files/{file_id}")
    assert sorted(e["status_code"] for e in rows) == [404, 404, 429]


def test_audit_events_are_paginated_and_each_team_sees_only_its_own(api, make_team):
    _, key_a = make_team()
    _, key_b = make_team()
    a, b = api(key_a), api(key_b)
    for i in range(5):
        a.post("/keys", json={"name": f"k{i}"})
    first = a.get("/audit_events", params={"limit": 2}).json()
    assert len(first["data"]) == 2 and first["has_more"] is True and first["last_id"] == first["data"][-1]["id"]
    rest = a.get("/audit_events", params={"limit": 100, "after": first["last_id"]}).json()
    assert len(rest["data"]) == 3 and rest["has_more"] is False
    assert not {e["id"] for e in first["data"]} & {e["id"] for e in rest["data"]}
    assert b.get("/audit_events").json()["data"] == []


def test_the_audit_table_refuses_update_and_delete(api, make_team):
    _, key = make_team()
    client = api(key)
    client.post("/keys", json={"name": "x"})
    row_id = _events(client)[0]["id"]
    for statement in (update(AuditEvent).where(AuditEvent.id == row_id).values(status_code=200),
                      delete(AuditEvent).where(AuditEvent.id == row_id)):
        with pytest.raises(DBAPIError, match="append-only"):
            with session_scope() as session:
                session.execute(statement)
    with session_scope() as session:
        assert session.get(AuditEvent, row_id).status_code == 200


# Above the in-flight limits and the rate limit, so that every request of the burst reaches its route.
_BURST_LIMITS = {"TUNEFORGE_CONCURRENCY__PER_KEY": "200", "TUNEFORGE_CONCURRENCY__PER_TEAM": "200",
                 "TUNEFORGE_RATE_LIMIT__BURST": "1000"}


@contextmanager
def _burst_server(backend: str, services_env: dict[str, str], tmp_path: Path, tiny_model: Path) -> Iterator[str]:
    if backend == "postgres":
        with private_api(services_env, **_BURST_LIMITS) as base:
            yield base
        return
    with embedded_instance(tmp_path, tiny_model) as env, private_api(services_env, **env, **_BURST_LIMITS) as base:
        yield base


@pytest.mark.parametrize("backend", ["postgres", "embedded"])
def test_audit_rows_equal_mutating_responses_under_a_concurrent_burst(backend, services_env, tmp_path, tiny_model,
                                                                      make_team):
    with _burst_server(backend, services_env, tmp_path, tiny_model) as base:
        _, key = make_team()

        def mutate(i: int) -> tuple[str, int, str | None]:
            with httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
                if i % 4 == 0:
                    action, r = "POST /v1/keys", c.post("/keys", json={"name": f"burst-{i}"})
                elif i % 4 == 1:
                    action, r = "POST /v1/files", upload(c, jsonl([{"text": f"row {i}"}]))
                elif i % 4 == 2:
                    action, r = "DELETE /v1/files/{file_id}", c.delete(f"/files/file-{secrets.token_hex(12)}")
                else:
                    action, r = "POST /v1/keys", c.post("/keys", json={"role": "owner"})
            return action, r.status_code, r.json()["id"] if r.status_code == 200 else None

        with ThreadPoolExecutor(max_workers=100) as pool:
            answers = list(pool.map(mutate, range(100)))
        with httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            rows = _events(client)

    answered = Counter((action, status) for action, status, _ in answers)
    assert sum(n for (_, status), n in answered.items() if status == 200) > 0
    assert answered[("DELETE /v1/files/{file_id}", 404)] > 0
    assert Counter((e["action"], e["status_code"]) for e in rows) == answered
    created = sorted(object_id for _, status, object_id in answers if status == 200)
    assert sorted(e["object_id"] for e in rows if e["status_code"] == 200) == created


def test_unauthenticated_requests_are_counted_by_minute_route_status_and_network(services_env, private_database):
    junk = "/v1/" + "x" * 236  # 240 characters: never stored
    bad_key = {"Authorization": "Bearer tf_0123456789abcdef_" + "x" * 43}
    with private_api(services_env, TUNEFORGE_DATABASE_URL=private_database) as base, \
            httpx.Client(base_url=base, timeout=60) as client:
        junk_statuses = Counter(client.post(junk, json={}).status_code for _ in range(300))
        key_statuses = Counter(client.post("/v1/keys", json={}, headers=bad_key).status_code for _ in range(30))
        no_key = client.delete(f"/v1/files/file-{secrets.token_hex(12)}").status_code
        expected = Counter({("POST", "unmatched", s): n for s, n in junk_statuses.items()})
        expected.update({("POST", "/v1/keys", s): n for s, n in key_statuses.items()})
        expected[("DELETE", "/v1/files/{file_id}", no_key)] += 1

        def counted() -> Counter:
            with session_scope() as session:
                rows = session.execute(select(AuditUnauthenticated.method, AuditUnauthenticated.route,
                                              AuditUnauthenticated.status_code, func.sum(AuditUnauthenticated.count))
                                       .group_by(AuditUnauthenticated.method, AuditUnauthenticated.route,
                                                 AuditUnauthenticated.status_code)).all()
            return Counter({(m, r, s): n for m, r, s, n in rows})

        wait_until(lambda: counted() == expected, timeout=15, message=f"the counts to reach {expected}")
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0
        rows = session.scalars(select(AuditUnauthenticated)).all()
    assert {r.client_prefix for r in rows} == {"127.0.0.0/24"}
    assert all(r.minute.second == 0 and r.minute.microsecond == 0 for r in rows)
    # a few rows per minute, whatever the number of requests
    assert len(rows) <= 2 * len(expected) and sum(r.count for r in rows) == 331


def test_prune_deletes_only_rows_older_than_its_date_and_the_table_stays_append_only(private_database, tmp_path):
    old, recent = dt.datetime(2026, 1, 1, tzinfo=dt.UTC), utcnow()
    row = {"team_id": "team-x", "key_id": None, "action": "POST /v1/keys", "object_id": None, "status_code": 200}
    with session_scope() as session:
        audit.record_many(session, [{**row, "created_at": when} for when in (old, old, recent)])
        ids = session.scalars(select(AuditEvent.id).order_by(AuditEvent.created_at)).all()
        audit.count_unauthenticated(session, {(old, "POST", "unmatched", 404, "127.0.0.0/24"): 3,
                                              (recent.replace(second=0, microsecond=0), "POST", "unmatched", 404,
                                               "127.0.0.0/24"): 2})
    pruned = _tuneforge("audit", "prune", "--before", "2026-06-01", cwd=tmp_path,
                        env=_env(TUNEFORGE_DATABASE_URL=private_database, TUNEFORGE_DATA_DIR=str(tmp_path)))
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 2 audit events and 1 counts of unauthenticated requests" in pruned.stdout
    with session_scope() as session:
        assert session.scalars(select(AuditEvent.id)).all() == [ids[2]]
        assert session.scalars(select(AuditUnauthenticated.count)).all() == [2]
    # A cutoff lets through only what is older than it; outside prune every DELETE is refused.
    for cutoff in (old.isoformat(), None):
        with pytest.raises(DBAPIError, match="append-only"):
            with session_scope() as session:
                if cutoff:
                    session.execute(select(func.set_config("tuneforge.audit_prune_before", cutoff, True)))
                session.execute(delete(AuditEvent).where(AuditEvent.id == ids[2]))
    with session_scope() as session:
        assert session.get(AuditEvent, ids[2]) is not None


def test_an_idempotent_create_and_its_replay_each_get_one_row_naming_the_same_object(api, make_team):
    _, key = make_team()
    client = api(key)
    file_id = uploaded_file_id(client)
    headers = {"Idempotency-Key": secrets.token_hex(8)}
    first, replay = (upload(client, jsonl([{"text": "once"}]), headers=headers) for _ in range(2))
    assert first.status_code == replay.status_code == 200 and first.json()["id"] == replay.json()["id"]
    rows = _events(client, action="POST /v1/files")
    assert sorted((e["object_id"], e["status_code"]) for e in rows) == sorted(
        [(file_id, 200), (first.json()["id"], 200), (first.json()["id"], 200)])
