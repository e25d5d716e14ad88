"""Evaluation leases: a claim holds a lease that only its holder renews and finishes under; the
reaper requeues (and re-sends) an evaluation whose worker stopped renewing, and gives it up after
max_attempts claims, failing its job with it; queued evaluations whose message may be lost are
re-sent at most once per interval. Runs on a database of its own (no other worker's reaper sees
these rows) and a queue of its own (the messages sent are read back from Redis)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets

import pytest
import redis

from app.core.db import session_scope, utcnow
from app.core.ids import new_id
from app.domains.evaluations import service as evaluations
from app.domains.evaluations.models import Evaluation
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.spec import TrainingSpec
from tests.conftest import REDIS_URL, _clear_caches
from tests.factories import create_team

SETTINGS = {"n": 1, "k": [1], "temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "stop": None, "limit": 1,
            "timeout_seconds": 5.0}


@pytest.fixture
def queue(private_database, monkeypatch):
    """This test's evaluation queue, and what was sent to it: [(task name, argument)]."""
    name = f"evaluation-leases-{secrets.token_hex(3)}"
    monkeypatch.setenv("TUNEFORGE_EVALUATION_QUEUE", name)
    _clear_caches()
    r = redis.Redis.from_url(REDIS_URL)

    def sent() -> list[tuple[str, str]]:
        messages = [json.loads(m) for m in r.lrange(name, 0, -1)]
        # kombu's Redis envelope: the task name in headers, the base64-encoded JSON (args, kwargs, embed) in body.
        return sorted((m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0][0]) for m in messages)

    yield sent
    r.delete(name)
    monkeypatch.undo()
    _clear_caches()


def _evaluation(team_id: str, job_id: str | None = None, role: str | None = None) -> str:
    with session_scope() as session:
        row = Evaluation(id=new_id("eval"), team_id=team_id, job_id=job_id, role=role, status="queued",
                         tasks="humaneval", settings=SETTINGS)
        session.add(row)
        return row.id


def _row(evaluation_id: str) -> Evaluation:
    with session_scope() as session:
        row = session.get(Evaluation, evaluation_id)
        session.expunge(row)
        return row


def _claim(ids: list[str], lease_seconds: float = 30, max_attempts: int = 2) -> tuple[str, list[str]]:
    with session_scope() as session:
        return evaluations.claim(session, ids=ids, lease_seconds=lease_seconds, max_attempts=max_attempts)


def test_only_the_holder_renews_and_finishes_and_a_second_claim_wins_nothing(queue):
    team_id, _ = create_team()
    eid = _evaluation(team_id)
    token, won = _claim([eid])
    assert won == [eid]
    assert _claim([eid])[1] == []
    with session_scope() as session:
        assert not evaluations.renew(session, ids=[eid], lease_token="someone-else", lease_seconds=30)
        assert evaluations.renew(session, ids=[eid], lease_token=token, lease_seconds=30)
        assert not evaluations.succeed(session, evaluation_id=eid, lease_token="someone-else", result={},
                                       results_key="k")
        assert evaluations.succeed(session, evaluation_id=eid, lease_token=token, result={"passed": 1},
                                   results_key="k")
    row = _row(eid)
    assert (row.status, row.attempts, row.result, row.lease_token) == ("succeeded", 1, {"passed": 1}, None)
    with session_scope() as session:  # ended: nothing renews or finishes it again
        assert not evaluations.renew(session, ids=[eid], lease_token=token, lease_seconds=30)
        assert not evaluations.fail(session, evaluation_id=eid, lease_token=token, code="x", message="x")


def test_an_expired_lease_is_requeued_and_resent_then_given_up_with_its_job(queue, monkeypatch):
    from worker.reaper import reap_expired

    monkeypatch.setenv("TUNEFORGE_MAX_ATTEMPTS", "2")
    _clear_caches()
    team_id, _ = create_team()
    job_id = new_id("ftjob")
    with session_scope() as session:
        session.add(FineTuningJob(id=job_id, team_id=team_id, model="tiny-llama", training_file="file-x",
                                  status="evaluating", spec=TrainingSpec().model_dump(mode="json"), seed=1,
                                  attempts=1))
    standalone = _evaluation(team_id)
    base, tuned = _evaluation(team_id, job_id, "base"), _evaluation(team_id, job_id, "tuned")
    fresh = _evaluation(team_id)
    _claim([fresh], lease_seconds=300)  # a live lease: never reaped

    # First claims, leases already lapsed (their workers "died"): requeued and re-sent.
    old_token, _ = _claim([standalone, base, tuned], lease_seconds=-1)
    assert sorted(reap_expired().evaluations) == sorted([standalone, base, tuned])
    assert [_row(e).status for e in (standalone, base, tuned, fresh)] == ["queued", "queued", "queued", "running"]
    # The standalone one as itself, the job's two as one job evaluation.
    assert queue() == sorted([("evaluations.run", standalone), ("evaluations.run_job", job_id)])
    with session_scope() as session:  # the old holder's late result is refused
        assert not evaluations.succeed(session, evaluation_id=standalone, lease_token=old_token, result={},
                                       results_key="k")

    # Second (and last) claims lapse too: given up, and the job fails with its evaluation.
    _claim([standalone, base, tuned], lease_seconds=-1)
    assert reap_expired().evaluations == []
    for eid in (standalone, base, tuned):
        row = _row(eid)
        assert (row.status, row.attempts, row.error["code"]) == ("failed", 2, "lease_expired")
        assert "on all 2 attempts" in row.error["message"]
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert (job.status, job.error["code"]) == ("failed", "lease_expired")
    assert _row(fresh).status == "running"
    # Used up: no claim succeeds any more.
    assert _claim([standalone])[1] == []


def test_queued_evaluations_are_resent_at_most_once_per_interval(queue):
    from worker.reaper import redispatch_stale

    team_id, _ = create_team()
    eid = _evaluation(team_id)
    assert redispatch_stale(older_than_seconds=3600).evaluations == []  # just created: its message may be on its way
    assert redispatch_stale(older_than_seconds=0).evaluations == [eid]
    assert queue() == [("evaluations.run", eid)]
    # Marked as enqueued now: the next pass within the interval sends nothing.
    assert redispatch_stale(older_than_seconds=60).evaluations == []
    with session_scope() as session:
        assert evaluations.redispatch_stale(session, older_than=utcnow() + dt.timedelta(seconds=1)) == [(eid, None)]


def test_an_evaluation_whose_inputs_are_gone_fails_at_once_instead_of_waiting_for_the_reaper(queue):
    from worker.tasks.evaluation import run

    team_id, _ = create_team()
    with session_scope() as session:
        row = Evaluation(id=new_id("eval"), team_id=team_id, status="queued", tasks="file-deleted-meanwhile",
                         settings=SETTINGS)
        session.add(row)
        eid = row.id
    assert run(eid) == "failed"
    row = _row(eid)
    assert (row.status, row.error["code"], row.lease_token) == ("failed", "evaluation_error", None)
    assert "file-deleted-meanwhile" in row.error["message"]
