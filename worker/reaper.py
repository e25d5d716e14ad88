"""The reaper: every worker runs one pass every reaper_interval_seconds, over jobs and
evaluations alike. It takes back running work whose lease expired (requeued, or failed after
max_attempts claims) and re-sends queued work whose message may have been lost. Two reapers at
once are harmless: each takeover is one conditional UPDATE, so only one of them matches, and a
duplicate message is refused by the claim."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import NamedTuple

from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.domains.evaluations import service as evaluations
from app.domains.jobs import lease as job_lease

log = logging.getLogger("tuneforge.worker")


class Recovered(NamedTuple):
    """The ids a reaper step sent to the queue again."""

    jobs: list[str]
    evaluations: list[str]


def reap_expired() -> Recovered:
    """Take back running jobs and evaluations whose lease expired, in one transaction; each is
    requeued and re-sent after commit, or failed after max_attempts (a job whose evaluation is given
    up fails with it). A job's pending cancel or pause request is settled instead."""
    max_attempts = get_settings().max_attempts
    with session_scope() as session:
        jobs = job_lease.reap(session, max_attempts=max_attempts)
        requeued, given_up = evaluations.reap(session, max_attempts=max_attempts)
        for evaluation_id, job_id in given_up:
            if job_id:
                job_lease.give_up_evaluation(session, job_id=job_id, evaluation_id=evaluation_id)
    if jobs:
        log.warning("reaped %d job(s) with expired leases: %s", len(jobs), ", ".join(jobs))
    if requeued or given_up:
        log.warning("reaped evaluations with expired leases: requeued %s, failed %s",
                    requeued, [e for e, _ in given_up])
    return Recovered(jobs=jobs, evaluations=requeued)


def redispatch_stale(older_than_seconds: float | None = None) -> Recovered:
    """Re-send queued jobs and evaluations not enqueued for longer than the threshold
    (redispatch_after_seconds by default): a lost enqueue, a message lost with the broker, a claim
    the quota deferred."""
    seconds = older_than_seconds if older_than_seconds is not None else get_settings().redispatch_after_seconds
    older_than = utcnow() - dt.timedelta(seconds=seconds)
    with session_scope() as session:
        recovered = Recovered(jobs=job_lease.redispatch_stale(session, older_than=older_than),
                              evaluations=[e for e, _ in evaluations.redispatch_stale(session, older_than=older_than)])
    if recovered.jobs or recovered.evaluations:
        log.info("re-dispatched queued work: jobs %s, evaluations %s", recovered.jobs, recovered.evaluations)
    return recovered


def run_reaper(stop: threading.Event) -> None:
    """Every reaper_interval_seconds until `stop`: one reaper pass."""
    settings = get_settings()
    while not stop.wait(settings.reaper_interval_seconds):
        for step in (reap_expired, redispatch_stale):
            try:
                step()
            except Exception:  # the database or broker is down: try again next round
                log.exception("reaper pass (%s) failed", step.__name__)
