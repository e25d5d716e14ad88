"""Quota checks hold under concurrency: the check and the write it guards are serialised per team."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from app.core.db import get_sessionmaker, session_scope
from app.core.ids import new_id
from app.domains.files.models import File
from app.domains.quotas import service as quotas
from app.domains.quotas.errors import TooManyFiles
from tests.conftest import wait_until


def _file(team_id: str) -> File:
    file_id = new_id("file")
    return File(id=file_id, team_id=team_id, filename="x.jsonl", purpose="fine-tune", bytes=10, sha256="0" * 64,
                format="text", examples=1, storage_key=f"teams/{team_id}/files/{file_id}.jsonl")


def test_a_second_check_waits_for_the_first_writer_and_then_sees_its_row(make_team):
    team_id, _ = make_team()
    with session_scope() as session:
        quotas.set_overrides(session, team_id=team_id, files=1)
    first = get_sessionmaker()()
    try:
        quotas.check_upload(first, team_id=team_id, size=10)
        first.add(_file(team_id))
        first.flush()
        pid = first.execute(text("SELECT pg_backend_pid()")).scalar()

        def second() -> None:
            with session_scope() as session:
                session.execute(text("SET application_name = 'quota-second'"))
                quotas.check_upload(session, team_id=team_id, size=10)

        with ThreadPoolExecutor(max_workers=1) as pool:
            outcome = pool.submit(second)

            def second_is_blocked_by_first() -> bool:
                with session_scope() as probe:
                    return probe.execute(text(
                        "SELECT :pid = ANY(pg_blocking_pids(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'quota-second'"), {"pid": pid}).scalar() or False

            wait_until(second_is_blocked_by_first, timeout=10, message="the second check to wait on the team lock")
            first.commit()
            with pytest.raises(TooManyFiles, match="limit is 1"):
                outcome.result(timeout=10)
    finally:
        first.close()
