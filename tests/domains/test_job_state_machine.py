"""The job state machine under leases, as a hypothesis state machine on real Postgres.

Workers claim, renew, crash (their lease lapses), finish, fail and stop; the reaper
reaps; the API cancels, pauses and resumes; messages are delivered twice. Whatever
the order, a job has at most one live holder, never leaves a final state, never
exceeds max_attempts, writes exactly one final-state event, and a worker that no
longer holds the lease can write nothing.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import select, update

from app.core.db import session_scope, utcnow
from app.core.ids import new_id
from app.domains.jobs import lease as job_lease
from app.domains.jobs import service as jobs
from app.domains.jobs.errors import IllegalTransition
from app.domains.jobs.models import FineTuningJob, FineTuningJobEvent
from app.domains.jobs.spec import TrainingSpec
from app.domains.jobs.states import FINAL, JobStatus
from tests.factories import create_team

MAX_ATTEMPTS = 2
LEASE_SECONDS = 60.0
WORKERS = st.sampled_from(["w1", "w2", "w3"])
FINAL_EVENT_PREFIXES = ("Job cancelled", "The job has successfully completed", "The job failed")


def _row(job_id: str) -> FineTuningJob:
    with session_scope() as session:
        row = session.get(FineTuningJob, job_id)
        session.expunge(row)
        return row


class JobLifecycle(RuleBasedStateMachine):
    team_id: str
    job_id: str

    @initialize()
    def queued_job(self) -> None:
        self.team_id, _ = create_team()
        self.job_id = new_id("ftjob")
        with session_scope() as session:
            session.add(FineTuningJob(id=self.job_id, team_id=self.team_id, model="tiny-llama", training_file="file-x",
                                      status="queued", spec=TrainingSpec().model_dump(mode="json"), seed=1,
                                      attempts=0))
        self.tokens: dict[str, str] = {}  # each worker's token from its latest claim
        self.final: str | None = None

    def _holder(self) -> str | None:
        row = _row(self.job_id)
        return row.lease_token if row.status == "running" else None

    def _is_holder(self, worker: str) -> bool:
        holder = self._holder()
        return holder is not None and self.tokens.get(worker) == holder

    @rule(worker=WORKERS)
    def claim(self, worker: str) -> None:
        before = _row(self.job_id)
        with session_scope() as session:
            job = job_lease.claim(session, job_id=self.job_id, worker_id=worker, lease_seconds=LEASE_SECONDS,
                             max_attempts=MAX_ATTEMPTS)
            token = job.lease_token if job else None
        assert (token is not None) == (before.status == "queued" and before.attempts < MAX_ATTEMPTS)
        if token:
            self.tokens[worker] = token

    @rule(worker=WORKERS)
    def duplicate_delivery(self, worker: str) -> None:
        """The same message again while the job is leased: the claim refuses."""
        if _row(self.job_id).status != "running":
            return
        with session_scope() as session:
            assert job_lease.claim(session, job_id=self.job_id, worker_id=f"{worker}-dup", lease_seconds=LEASE_SECONDS,
                              max_attempts=MAX_ATTEMPTS) is None

    @rule(worker=WORKERS)
    def heartbeat(self, worker: str) -> None:
        expected = self._is_holder(worker)
        with session_scope() as session:
            renewed = job_lease.renew(session, job_id=self.job_id, lease_token=self.tokens.get(worker, "none"),
                                 lease_seconds=LEASE_SECONDS)
        assert renewed == expected

    @rule(reap_now=st.booleans())
    def crash(self, reap_now: bool) -> None:
        """The holder dies: its lease runs out (moved into the past instead of waiting for it), and
        maybe a reaper passes at once."""
        with session_scope() as session:
            session.execute(update(FineTuningJob).where(FineTuningJob.id == self.job_id,
                                                        FineTuningJob.status == "running")
                            .values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
        if reap_now:
            self.reap()

    @rule()
    def reap(self) -> None:
        before = _row(self.job_id)
        expired = before.status == "running" and before.lease_expires_at < utcnow()
        with session_scope() as session:
            requeued = job_lease.reap(session, max_attempts=MAX_ATTEMPTS)
        after = _row(self.job_id)
        if not expired:
            assert after.status == before.status and self.job_id not in requeued
        elif before.stop_request == "cancel":
            assert after.status == "cancelled"
        elif before.stop_request == "pause":
            assert after.status == "paused"
        elif before.attempts >= MAX_ATTEMPTS:
            assert after.status == "failed" and after.error["code"] == "lease_expired"
        else:
            assert after.status == "queued" and self.job_id in requeued

    @rule(worker=WORKERS)
    def complete(self, worker: str) -> None:
        row = _row(self.job_id)
        expected = self._is_holder(worker) and row.stop_request != "cancel"
        with session_scope() as session:
            done = job_lease.succeed(session, job_id=self.job_id, lease_token=self.tokens.get(worker, "none"),
                                fine_tuned_model=f"ft:tiny:{worker}", trained_tokens=1, usage={})
        assert done == expected
        if not expected:
            assert _row(self.job_id).status == row.status

    @rule(worker=WORKERS)
    def fail(self, worker: str) -> None:
        expected = self._is_holder(worker)
        with session_scope() as session:
            assert job_lease.fail(session, job_id=self.job_id, code="training_error", message="boom",
                             lease_token=self.tokens.get(worker, "none")) == expected

    @rule(worker=WORKERS, reason=st.sampled_from(["cancel", "pause", "shutdown"]))
    def stop(self, worker: str, reason: str) -> None:
        """The holder's trainer stopped (a request, or its worker shutting down) and settles the job."""
        row = _row(self.job_id)
        holder = self._is_holder(worker)
        with session_scope() as session:
            status = job_lease.release(session, job_id=self.job_id, lease_token=self.tokens.get(worker, "none"),
                                  reason=reason)
        if not holder:
            assert status is None and _row(self.job_id).status == row.status
        elif row.stop_request == "cancel":
            assert status == "cancelled"
        elif row.stop_request == "pause":
            assert status == "paused"
        elif reason != "cancel":
            assert status == "queued"

    @rule()
    def cancel(self) -> None:
        before = _row(self.job_id)
        try:
            with session_scope() as session:
                jobs.cancel(session, team_id=self.team_id, job_id=self.job_id)
        except IllegalTransition:
            assert before.status in ("succeeded", "failed")
            return
        after = _row(self.job_id)
        # A running job is only asked; every other unfinished job ends here.
        assert after.status == ("running" if before.status == "running" else "cancelled")
        if after.status == "running":
            assert after.stop_request == "cancel"

    @rule()
    def pause(self) -> None:
        before = _row(self.job_id)
        try:
            with session_scope() as session:
                jobs.pause(session, team_id=self.team_id, job_id=self.job_id)
        except IllegalTransition:
            assert before.status not in ("queued", "paused") and not (
                before.status == "running" and before.stop_request != "cancel")
            return
        after = _row(self.job_id)
        assert after.status == ("running" if before.status == "running" else "paused")

    @rule()
    def resume(self) -> None:
        before = _row(self.job_id)
        try:
            with session_scope() as session:
                job = jobs.resume(session, team_id=self.team_id, job_id=self.job_id)
                requeued = job.status == JobStatus.QUEUED
        except IllegalTransition:
            assert before.status != "paused" and not (before.status == "running" and before.stop_request == "pause")
            return
        assert requeued == (before.status == "paused")

    @invariant()
    def at_most_one_live_holder(self) -> None:
        if not hasattr(self, "job_id"):
            return
        row = _row(self.job_id)
        assert (row.lease_token is not None) == (row.status == "running")
        assert (row.lease_expires_at is not None) == (row.status == "running")
        with session_scope() as session:
            holding = [w for w, t in self.tokens.items()
                       if job_lease.holder_view(session, job_id=self.job_id, lease_token=t) != "lost"]
        assert len(holding) <= 1

    @invariant()
    def final_state_is_never_left_and_written_once(self) -> None:
        if not hasattr(self, "job_id"):
            return
        row = _row(self.job_id)
        if self.final is not None:
            assert row.status == self.final
        if row.status in FINAL:
            self.final = row.status
        with session_scope() as session:
            messages = session.scalars(select(FineTuningJobEvent.message)
                                       .where(FineTuningJobEvent.job_id == self.job_id)).all()
        finals = [m for m in messages if m.startswith(FINAL_EVENT_PREFIXES)]
        assert len(finals) == (1 if row.status in FINAL else 0), finals
        assert (row.finished_at is not None) == (row.status in FINAL)

    @invariant()
    def attempts_stay_within_max(self) -> None:
        if not hasattr(self, "job_id"):
            return
        with session_scope() as session:
            attempts = session.scalar(select(FineTuningJob.attempts).where(FineTuningJob.id == self.job_id))
        assert 0 <= attempts <= MAX_ATTEMPTS


@pytest.fixture
def lifecycle(private_database):
    """The state machine as a test case, bound to this session's database."""
    JobLifecycle.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
    return JobLifecycle.TestCase


def test_job_state_machine_holds_its_invariants(lifecycle):
    lifecycle().runTest()


def test_reaper_requeues_a_dead_holders_job_then_gives_up_after_max_attempts(private_database):
    """The path the machine reaches only sometimes, walked on purpose: claim, die, reap, twice."""
    machine = JobLifecycle()
    machine.queued_job()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        machine.claim(worker=f"w{attempt}")
        stale = machine.tokens[f"w{attempt}"]
        machine.crash(reap_now=True)
        row = _row(machine.job_id)
        assert row.attempts == attempt
        assert row.status == ("queued" if attempt < MAX_ATTEMPTS else "failed")
        with session_scope() as session:  # the dead holder, come back, can write nothing
            assert not job_lease.renew(session, job_id=machine.job_id, lease_token=stale, lease_seconds=LEASE_SECONDS)
            assert job_lease.release(session, job_id=machine.job_id, lease_token=stale, reason="shutdown") is None
        machine.final_state_is_never_left_and_written_once()
    assert _row(machine.job_id).error["code"] == "lease_expired"
    machine.claim(worker="w9")  # a late duplicate delivery of a failed job claims nothing
    assert "w9" not in machine.tokens
