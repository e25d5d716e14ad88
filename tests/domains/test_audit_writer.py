"""The audit writer: refused requests' rows and unauthenticated counts, written off the request path."""

from __future__ import annotations

import logging
import secrets
import threading
import time

from sqlalchemy import create_engine, func, select

from app.core.db import get_engine, session_scope, utcnow
from app.domains.audit.models import AuditEvent, AuditUnauthenticated
from app.domains.audit.writer import BACKOFF_SECONDS, Writer
from tests.conftest import wait_until


def _row(team_id: str, i: int) -> dict:
    return {"team_id": team_id, "key_id": None, "action": "DELETE /v1/files/{file_id}", "object_id": f"file-{i}",
            "status_code": 404, "created_at": utcnow()}


def test_queued_rows_and_counts_are_all_written_and_each_row_reported_done(services_env):
    writer = Writer(create_engine(get_engine().url, pool_size=1, max_overflow=0))
    team_id, done = f"team-{secrets.token_hex(6)}", threading.Semaphore(0)
    for i in range(1200):  # more than one batch
        writer.submit(_row(team_id, i), done.release)
    minute, route = utcnow().replace(second=0, microsecond=0), f"/v1/{secrets.token_hex(6)}"
    for _ in range(50):
        writer.count((minute, "POST", route, 404, "192.0.2.0/24"))
    assert all(done.acquire(timeout=30) for _ in range(1200))

    def counted() -> int:
        with session_scope() as session:
            return session.scalar(select(func.sum(AuditUnauthenticated.count))
                                  .where(AuditUnauthenticated.route == route))

    assert wait_until(counted, timeout=15, message="the counts to be written") == 50
    with session_scope() as session:
        objects = session.scalars(select(AuditEvent.object_id).where(AuditEvent.team_id == team_id)).all()
    assert sorted(objects) == sorted(f"file-{i}" for i in range(1200))
    assert writer.dropped() == 0


def test_rows_the_database_never_takes_are_retried_then_counted_as_dropped_and_logged(caplog):
    writer = Writer(create_engine("postgresql+psycopg://tuneforge@127.0.0.1:1/tuneforge", pool_size=1, max_overflow=0))
    done, started = threading.Semaphore(0), time.monotonic()
    with caplog.at_level(logging.ERROR, logger="tuneforge.audit"):
        for i in range(3):
            writer.submit(_row("team-gone", i), done.release)
        assert all(done.acquire(timeout=30) for _ in range(3))
    assert time.monotonic() - started >= sum(BACKOFF_SECONDS)  # retried, backing off, before giving up
    assert writer.dropped() == 3
    assert any("3 audit row(s) dropped" in r.getMessage() and "could not write audit rows" in r.getMessage()
               for r in caplog.records)
