"""API keys: required on every /v1 route, stored only as a hash."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.domains.teams.models import ApiKey
from tests.routes import v1_routes


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer tf_0123456789abcdef_" + "x" * 43, "Basic abc",
                                    "Bearer not-a-key"])
def test_every_v1_route_refuses_a_missing_or_bad_key(server, header, services_env):
    import httpx

    headers = {"Authorization": header} if header else {}
    for method, path in v1_routes():
        url = server + path.replace("{", "").replace("}", "").replace(":path", "")
        r = httpx.request(method, url, headers=headers, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        body = r.json()["error"]
        assert body["type"] == "authentication_error" and body["message"]


def test_key_is_stored_only_as_a_hash(make_team):
    team_id, key = make_team()
    with session_scope() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.team_id == team_id)).all()
    assert len(rows) == 1
    assert rows[0].key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in (rows[0].key_hash, rows[0].prefix) and rows[0].prefix in key


def test_a_valid_key_is_accepted(api, make_team):
    _, key = make_team()
    assert api(key).get("/files").status_code == 200

