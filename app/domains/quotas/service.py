"""Per-team quotas: jobs running at once, jobs waiting, storage bytes (files, adapters and their
succeeded exports) and number of files.

Limits are the settings' defaults (TUNEFORGE_QUOTAS__*) unless the team's team_quota row overrides
them. Each check that precedes a write locks the team's row first (teams.lock_team), so two
concurrent requests of one team cannot both take the last unit: the second waits, then sees the
first one's row. Over quota answers 429 where waiting helps (queued jobs) and 409 where it does not
until the team frees something (storage, files); every message names the limit and the usage.

Quotas do not know job states: the jobs domain passes in the queries that count a team's jobs
(JobCounts), run here after the team's row is locked.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.domains.adapters.models import Adapter
from app.domains.exports.models import AdapterExport
from app.domains.files.models import File
from app.domains.quotas.errors import CostLimitExceeded, QueueFull, StorageFull, TooManyFiles
from app.domains.quotas.models import TeamQuota
from app.domains.quotas.schemas import QuotaItem, QuotaRead
from app.domains.teams import service as teams

OVERRIDABLE = ("running_jobs", "queued_jobs", "storage_bytes", "files", "rate_per_second", "rate_burst",
               "trained_tokens", "job_wall_seconds", "evaluation_wall_seconds")


@dataclass(frozen=True)
class JobCounts:
    """Queries (SELECT count) of one team's jobs: running, and waiting to start."""

    running: Select
    waiting: Select


@dataclass(frozen=True)
class Limits:
    running_jobs: int
    queued_jobs: int
    storage_bytes: int
    files: int
    rate_per_second: float
    rate_burst: int
    trained_tokens: int
    job_wall_seconds: int
    evaluation_wall_seconds: int


def limits(session: Session, team_id: str) -> Limits:
    """The team's effective limits: its overrides, else the defaults. Read once per session (a create
    checks several; the identity map cannot remember a team with no overrides row), and read again
    in the session after set_overrides changes them."""
    cache: dict[str, Limits] = session.info.setdefault(_LIMITS_CACHE, {})
    if team_id not in cache:
        settings = get_settings()
        row = session.get(TeamQuota, team_id)
        defaults = {**settings.quotas.model_dump(), "rate_per_second": settings.rate_limit.per_second,
                    "rate_burst": settings.rate_limit.burst}
        cache[team_id] = Limits(**{name: (getattr(row, name) if row is not None and getattr(row, name) is not None
                                          else default) for name, default in defaults.items()})
    return cache[team_id]


_LIMITS_CACHE = "tuneforge.quota_limits"


def _count(session: Session, query: Select) -> int:
    return session.scalar(query) or 0


def _storage(session: Session, team_id: str) -> tuple[int, int]:
    """(files, bytes stored): uploaded files, trained adapters and their exports, what a team can
    delete. Checkpoints are not counted: a job keeps at most keep_checkpoints of them. An export
    counts once its blob is stored (bytes is set when it succeeds)."""
    count, files = session.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0))
                                   .where(File.team_id == team_id)).one()
    adapters = session.scalar(select(func.coalesce(func.sum(Adapter.bytes), 0)).where(Adapter.team_id == team_id))
    exports = session.scalar(select(func.coalesce(func.sum(AdapterExport.bytes), 0))
                             .where(AdapterExport.team_id == team_id))
    return int(count), int(files) + int(adapters or 0) + int(exports or 0)


def check_room(session: Session, *, team_id: str, what: str) -> None:
    """Before work whose result is stored later (an export, whose size is known once written):
    raises StorageFull when the team's storage is already at its limit, so nothing could be kept."""
    quota = limits(session, team_id)
    used = _storage(session, team_id)[1]
    if used >= quota.storage_bytes:
        raise StorageFull(f"Storage quota exceeded: the team's files, adapters and exports use {used} bytes and the "
                          f"limit is {quota.storage_bytes} bytes, so {what} could not be kept. Delete files, adapters "
                          "or exports, or ask an operator to raise the quota.", param=None,
                          extra={"limit": quota.storage_bytes, "usage": used})


def check_stored(session: Session, *, team_id: str, size: int, what: str) -> None:
    """Before a worker's artifact of `size` bytes is recorded (an export). Raises StorageFull when it
    does not fit; locks the team's row until the transaction ends."""
    teams.lock_team(session, team_id)
    quota = limits(session, team_id)
    used = _storage(session, team_id)[1]
    if used + size > quota.storage_bytes:
        raise StorageFull(f"Storage quota exceeded: the team's files, adapters and exports use {used} bytes, "
                          f"{what} adds {size} and the limit is {quota.storage_bytes} bytes. Delete files, adapters "
                          "or exports (DELETE /v1/exports/{id}) or ask an operator to raise the quota.",
                          param=None, extra={"limit": quota.storage_bytes, "usage": used})


def may_start(session: Session, team_id: str, *, jobs: JobCounts) -> bool:
    """Whether one more of the team's jobs may start running now. Call it in the claim's transaction,
    right before the claiming UPDATE: it locks the team's row until that transaction ends, so two
    workers claiming jobs of one team at once cannot both take the last running slot."""
    teams.lock_team(session, team_id)
    return _count(session, jobs.running) < limits(session, team_id).running_jobs


def check_can_queue(session: Session, *, team_id: str, jobs: JobCounts) -> None:
    """Before a job is created. Raises QueueFull (429) when the team already has its limit of jobs
    waiting to start. Locks the team's row until the transaction ends."""
    teams.lock_team(session, team_id)
    limit = limits(session, team_id).queued_jobs
    waiting = _count(session, jobs.waiting)
    if waiting >= limit:
        raise QueueFull(f"Queued jobs quota exceeded: the team has {waiting} job(s) waiting to start and its limit "
                        f"is {limit}. Retry when some have started, or cancel some.", param=None,
                        extra={"limit": limit, "usage": waiting})


def check_upload(session: Session, *, team_id: str, size: int, lock: bool = True) -> None:
    """Before a file of `size` bytes is stored. Raises TooManyFiles or StorageFull (409). With lock (the
    final check, in the transaction that records the file) the team's row is locked until it ends;
    the early check before reading the body passes lock=False and size=1."""
    if lock:
        teams.lock_team(session, team_id)
    quota = limits(session, team_id)
    count, used = _storage(session, team_id)
    if count + 1 > quota.files:
        raise TooManyFiles(f"Files quota exceeded: the team has {count} file(s) and its limit is {quota.files}. "
                           "Delete files (DELETE /v1/files/{id}) or ask an operator to raise the quota.",
                           param="file", extra={"limit": quota.files, "usage": count})
    if used + size > quota.storage_bytes:
        raise StorageFull(f"Storage quota exceeded: the team's files and adapters use {used} bytes, this upload "
                          f"adds {size} and the limit is {quota.storage_bytes} bytes. Delete files or adapters "
                          "(DELETE /v1/files/{id}, /v1/adapters/{id}) or ask an operator to raise the quota.",
                          param="file", extra={"limit": quota.storage_bytes, "usage": used})


def read(session: Session, *, team_id: str, jobs: JobCounts) -> QuotaRead:
    quota = limits(session, team_id)
    count, used = _storage(session, team_id)
    return QuotaRead(
        running_jobs=QuotaItem(limit=quota.running_jobs, usage=_count(session, jobs.running)),
        queued_jobs=QuotaItem(limit=quota.queued_jobs, usage=_count(session, jobs.waiting)),
        storage_bytes=QuotaItem(limit=quota.storage_bytes, usage=used),
        files=QuotaItem(limit=quota.files, usage=count),
        rate_limit_per_second=quota.rate_per_second, rate_limit_burst=quota.rate_burst,
        trained_tokens_per_job=quota.trained_tokens, job_wall_seconds=quota.job_wall_seconds,
        evaluation_wall_seconds=quota.evaluation_wall_seconds)


def set_overrides(session: Session, *, team_id: str, **values: int | float | None) -> TeamQuota:
    """Set (a number) or clear (None) the team's overrides; names not given are left as they are."""
    unknown = set(values) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"unknown quota(s): {', '.join(sorted(unknown))}")
    row = session.get(TeamQuota, team_id) or TeamQuota(team_id=team_id)
    for name, value in values.items():
        setattr(row, name, value)
    session.add(row)
    session.flush()
    session.info.get(_LIMITS_CACHE, {}).pop(team_id, None)
    return row


def check_trained_tokens(session: Session, *, team_id: str, estimate: int, how: str, param: str) -> None:
    """Before a job is created: raises CostLimitExceeded (400) when `estimate`, an upper bound of
    the tokens the job would train on (`how` says how it was reached), passes the team's
    trained_tokens limit."""
    limit = limits(session, team_id).trained_tokens
    if estimate > limit:
        raise CostLimitExceeded(
            f"The job would train on up to {estimate:,} tokens ({how}); the team's limit is {limit:,} tokens per "
            "job. Train fewer epochs or steps, lower training.max_seq_length, use a smaller file, or ask an "
            "operator to raise the limit (tuneforge admin set-quota --trained-tokens).",
            param=param, extra={"limit": limit, "estimate": estimate})
