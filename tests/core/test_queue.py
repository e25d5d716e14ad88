"""queue.after_commit: work decided in a transaction runs only once that transaction commits."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.core import queue
from app.core.db import session_scope


def test_after_commit_runs_after_the_commit_and_never_after_a_rollback(services_env):
    ran: list[str] = []
    with session_scope() as session:
        queue.after_commit(session, ran.append, "committed")
        session.execute(text("select 1"))
        assert ran == []
    assert ran == ["committed"]

    with pytest.raises(RuntimeError), session_scope() as session:
        queue.after_commit(session, ran.append, "rolled back")
        raise RuntimeError("the transaction fails")
    assert ran == ["committed"]


def test_a_failing_after_commit_callback_is_logged_and_the_others_still_run(services_env, caplog):
    ran: list[str] = []

    def broken() -> None:
        raise ConnectionError("broker down")

    with session_scope() as session:
        queue.after_commit(session, broken)
        queue.after_commit(session, ran.append, "next")
    assert ran == ["next"]
    assert "broken" in caplog.text and "broker down" in caplog.text


def test_a_savepoint_does_not_run_what_the_outer_transaction_registered(services_env):
    ran: list[str] = []
    with session_scope() as session:
        queue.after_commit(session, ran.append, "outer")
        with session.begin_nested():
            session.execute(text("select 1"))
        assert ran == []
    assert ran == ["outer"]
