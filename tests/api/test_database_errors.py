"""Database errors map to what they mean: an outage is 503 (retry later), a constraint a concurrent
writer got to first is 409 (retry now), anything else is a logged 500, never reported as an
outage. The routes are a throwaway app's, each raising a real error from the real Postgres; the
handlers are the project's."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.api.errors import install
from app.core.db import session_scope
from app.core.ids import new_id
from app.domains.teams.models import Team
from tests.conftest import free_port


@pytest.fixture
def client(services_env, make_team):
    team_id, _ = make_team()
    app = FastAPI()
    install(app)

    @app.post("/duplicate")
    def duplicate() -> None:
        with session_scope() as session:
            name = session.get(Team, team_id).name
            session.add(Team(id=new_id("team"), name=name))  # team names are unique

    @app.get("/bad-sql")
    def bad_sql() -> None:
        with session_scope() as session:
            session.execute(text("SELECT no_such_column FROM team"))

    @app.get("/down")
    def down() -> None:
        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/tuneforge")
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_a_constraint_violation_is_a_conflict_to_retry(client):
    r = client.post("/duplicate")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"
    assert "retry" in r.json()["error"]["message"]


def test_a_database_error_that_is_not_an_outage_is_an_internal_error(client):
    r = client.get("/bad-sql")
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "Internal error; it has been logged.", "type": "server_error",
                                 "param": None, "code": "internal_error"}
    assert "no_such_column" not in r.text


def test_an_unreachable_database_is_an_outage(client):
    r = client.get("/down")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable"
    assert r.headers["Retry-After"] == "5"
