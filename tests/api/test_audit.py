"""The audit log: a row for every mutating /v1 request, refused ones included; append-only; admins read it."""

from __future__ import annotations

import secrets

import httpx
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError

from app.core.db import session_scope
from app.domains.audit.models import AuditEvent
from app.domains.quotas import service as quotas
from tests.factories import jsonl, upload, uploaded_file_id


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
    assert admin.post("/keys", json={"role": "owner"}).status_code == 422
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
        ("POST /v1/keys", None, 422),
    }
    assert got == expected
    events = _events(admin)
    assert all(e["team_id"] == team_id and e["key_id"] == key_id and e["object"] == "audit_event" for e in events)
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)  # newest first
    assert all(isinstance(e["created_at"], int) and e["created_at"] >= job["created_at"] for e in events[:-1])


def test_refused_requests_are_recorded_401_without_a_team(api, make_team):
    team_id, admin_key = make_team()
    admin = api(admin_key)
    member = admin.post("/keys", json={"role": "member"}).json()
    probe = f"file-{secrets.token_hex(12)}"
    assert api(None).delete(f"/files/{probe}").status_code == 401
    assert api("tf_0123456789abcdef_" + "x" * 43).delete(f"/files/{probe}").status_code == 401
    assert api(member["key"]).post("/keys", json={}).status_code == 403
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, files=0)
    assert upload(api(member["key"]), jsonl([{"text": "x"}])).status_code == 409

    with session_scope() as session:
        anonymous = session.scalars(select(AuditEvent).where(AuditEvent.object_id == probe)).all()
    assert [(r.team_id, r.key_id, r.action, r.status_code) for r in anonymous] == [
        (None, None, "DELETE /v1/files/{file_id}", 401)] * 2
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
