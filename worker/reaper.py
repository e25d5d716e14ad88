"""The reaper: every worker runs one pass every reaper_interval_seconds, over jobs and
evaluations alike. It takes back running work whose lease expired (requeued, or failed after
max_attempts claims), re-sends queued work whose message may have been lost, deletes files
whose expires_after passed, expires uploads left pending past their hour, and removes the work
folders that a killed worker on this host left behind. Two reapers at
once are harmless: each takeover is one conditional UPDATE, so only one of them matches, a
duplicate message is refused by the claim, and an expired file is locked by the reaper that
deletes it (the other skips it)."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
from typing import NamedTuple

from sqlalchemy import select

from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.domains.evaluations import service as evaluations
from app.domains.exports import service as exports
from app.domains.exports.models import AdapterExport
from app.domains.exports.states import ExportStatus
from app.domains.files import service as files
from app.domains.jobs import lease as job_lease
from app.domains.jobs import service as jobs
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.states import FINAL
from app.domains.uploads import service as uploads
from app.domains.webhooks import service as webhooks

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
        requeued_exports = exports.reap(session, max_attempts=max_attempts)
    if requeued_exports:
        log.warning("requeued exports with expired leases: %s", ", ".join(requeued_exports))
    if jobs:
        log.warning("reaped %d job(s) with expired leases: %s", len(jobs), ", ".join(jobs))
    if requeued or given_up:
        log.warning("reaped evaluations with expired leases: requeued %s, failed %s",
                    requeued, [e for e, _ in given_up])
    return Recovered(jobs=jobs, evaluations=requeued)


def redispatch_stale(older_than_seconds: float | None = None) -> Recovered:
    """Re-send queued jobs and evaluations not enqueued for longer than the threshold
    (redispatch_after_seconds by default): a lost enqueue, a message lost with the broker, a claim
    the quota deferred; and webhook deliveries whose attempt was due that long ago and never came."""
    seconds = older_than_seconds if older_than_seconds is not None else get_settings().redispatch_after_seconds
    older_than = utcnow() - dt.timedelta(seconds=seconds)
    with session_scope() as session:
        recovered = Recovered(jobs=job_lease.redispatch_stale(session, older_than=older_than),
                              evaluations=[e for e, _ in evaluations.redispatch_stale(session, older_than=older_than)])
        deliveries = webhooks.redispatch_stale(session, older_than=older_than)
        stale_exports = exports.redispatch_stale(session, older_than=older_than)
    if stale_exports:
        log.info("re-dispatched queued exports: %s", stale_exports)
    if deliveries:
        log.info("re-sent webhook deliveries whose attempt never came: %s", deliveries)
    if recovered.jobs or recovered.evaluations:
        log.info("re-dispatched queued work: jobs %s, evaluations %s", recovered.jobs, recovered.evaluations)
    return recovered


def delete_expired_files() -> list[str]:
    """Delete files whose expires_at passed, rows and (after commit) blobs, a page per transaction.
    A file that an unfinished job (training, validation or eval tasks file) or a queued or running
    evaluation still reads is kept, and deleted at the first pass after they end. Returns the ids
    deleted."""
    deleted: list[str] = []
    now, after = utcnow(), None
    while True:
        with session_scope() as session:
            page = files.expired_page(session, now=now, after=after)
            for row in page:
                team_id, file_id = row.team_id, row.id
                if (jobs.active_jobs_using_file(session, team_id=team_id, file_id=file_id)
                        or evaluations.unfinished_using_file(session, team_id=team_id, file_id=file_id)):
                    continue
                files.delete(session, team_id=team_id, file_id=file_id, active_job_ids=[], active_evaluation_ids=[])
                deleted.append(file_id)
            after = (page[-1].expires_at or now, page[-1].id) if page else None
        if after is None:
            break
    if deleted:
        log.info("deleted %d expired file(s): %s", len(deleted), ", ".join(deleted))
    return deleted


def expire_uploads(now: dt.datetime | None = None) -> list[str]:
    """Expire pending uploads past their expires_at (now by default) and delete their parts; returns their ids."""
    with session_scope() as session:
        expired = uploads.expire(session, now=now)
    if expired:
        log.info("expired %d upload(s): %s", len(expired), ", ".join(expired))
    return expired


def sweep_work_dirs() -> list[str]:
    """Remove data_dir/work/<id> folders whose job or export has ended (or no longer exists): a
    claim removes its own folder when it ends, so these are what a killed worker left on this host.
    The folders of unfinished work are kept, since a claim may be writing there, or may take it up
    again. Returns the ids swept."""
    root = get_settings().data_dir / "work"
    found = {p.name: p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    if not found:
        return []
    with session_scope() as session:
        unfinished = set(session.scalars(select(FineTuningJob.id).where(
            FineTuningJob.id.in_(found), FineTuningJob.status.not_in(FINAL))))
        unfinished |= set(session.scalars(select(AdapterExport.id).where(
            AdapterExport.id.in_(found), AdapterExport.status.in_((ExportStatus.QUEUED, ExportStatus.RUNNING)))))
    swept = sorted(set(found) - unfinished)
    for object_id in swept:
        shutil.rmtree(found[object_id], ignore_errors=True)
    if swept:
        log.info("removed the work folders of ended work: %s", ", ".join(swept))
    return swept


def run_reaper(stop: threading.Event) -> None:
    """Every reaper_interval_seconds until `stop`: one reaper pass."""
    settings = get_settings()
    while not stop.wait(settings.reaper_interval_seconds):
        for step in (reap_expired, redispatch_stale, delete_expired_files, expire_uploads, sweep_work_dirs):
            try:
                step()
            except Exception:  # the database or broker is down: try again next round
                log.exception("reaper pass (%s) failed", step.__name__)
