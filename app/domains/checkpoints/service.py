"""Training checkpoints of jobs: rows pointing at resumable directories in blob storage.

The worker stores a checkpoint's files first and records the row after, so a
row always points at complete files; prune returns the prefixes of the rows it
deleted for the caller to remove from storage after commit.
"""

from __future__ import annotations

import math
import re
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import get_owned, unix
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.checkpoints.models import FineTuningCheckpoint
from app.domains.checkpoints.schemas import CheckpointList, CheckpointMetrics, CheckpointRead
from app.domains.jobs import service as jobs
from app.domains.jobs.errors import JobNotFound
from app.domains.jobs.models import FineTuningJob
from app.domains.teams.models import Team

# A checkpoint's model name: its job's fine-tuned model name (jobs.model_name, ending in the job id), then the step.
_MODEL_NAME = re.compile(r"(?P<job_model>ft:.*:(?P<job_id>[^:]+)):ckpt-step-(?P<step>[0-9]{1,9})")


def storage_prefix(*, team_id: str, job_id: str, step: int) -> str:
    """Where a checkpoint's files live; a step saved again replaces the same prefix."""
    return f"teams/{team_id}/jobs/{job_id}/checkpoints/step-{step:08d}"


def record(session: Session, *, job_id: str, team_id: str, step: int, metrics: dict[str, Any], prefix: str,
           size: int) -> FineTuningCheckpoint:
    """Add the row for a checkpoint whose files are already stored under prefix (size bytes in all).

    Replaces the job's row for the same step, if any: its files were overwritten under the same prefix.
    Non-finite numbers (a diverged loss) are left out of metrics: JSON has no NaN.
    """
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
    session.execute(delete(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id,
                                                       FineTuningCheckpoint.step == step))
    row = FineTuningCheckpoint(id=new_id("ftckpt"), job_id=job_id, team_id=team_id, step=step,
                               metrics={**metrics, "step": step}, storage_prefix=prefix, bytes=size)
    session.add(row)
    session.flush()
    return row


def latest(session: Session, job_id: str) -> FineTuningCheckpoint | None:
    """The job's checkpoint with the highest step (the newest among equal steps), or None."""
    return session.scalar(select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
                          .order_by(FineTuningCheckpoint.step.desc(), FineTuningCheckpoint.id.desc()).limit(1))


def prune(session: Session, *, job_id: str, keep: int) -> list[str]:
    """Delete all but the job's `keep` latest checkpoints (by step); returns their storage prefixes.

    Raises ValueError for keep < 1: the latest checkpoint is what a retried job resumes from.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    rows = list(session.scalars(select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
                                .order_by(FineTuningCheckpoint.step.desc(), FineTuningCheckpoint.id.desc())
                                .offset(keep)))
    for row in rows:
        session.delete(row)
    session.flush()
    return [row.storage_prefix for row in rows]


def list_page(session: Session, *, team_id: str, job_id: str, after: str | None, limit: int) -> CheckpointList:
    """The job's checkpoints, newest first. Raises JobNotFound for a missing job and another team's alike."""
    job = jobs.get(session, team_id=team_id, job_id=job_id)
    team = session.get(Team, team_id)
    assert team is not None  # the team owns the job just read
    model = jobs.model_name(base=job.model, team_name=team.name, suffix=job.suffix, job_id=job.id)
    stmt = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job.id)
    rows, has_more = paginate(session, stmt, FineTuningCheckpoint.id, after=after, limit=limit)
    data = [to_read(r, model=model) for r in rows]
    return CheckpointList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


def model_name(*, job_model: str, step: int) -> str:
    """The name a checkpoint is served under (OpenAI's fine_tuned_model_checkpoint); job_model is jobs.model_name."""
    return f"{job_model}:ckpt-step-{step}"


def get_by_model_name(session: Session, *, team_id: str, name: str) -> tuple[FineTuningCheckpoint, str] | None:
    """The team's checkpoint that a `ft:...:<job id>:ckpt-step-N` model name names, with the base model its job
    trained; None for any other name, a step the job has no checkpoint of (pruned, or deleted with the job's
    model), and another team's checkpoint, alike."""
    match = _MODEL_NAME.fullmatch(name)
    if match is None or model_name(job_model=match["job_model"], step=int(match["step"])) != name:
        return None  # not a checkpoint's name, or its step not as the list writes it (ckpt-step-04)
    try:
        job = jobs.get(session, team_id=team_id, job_id=match["job_id"])
    except JobNotFound:
        return None
    team = session.get(Team, team_id)
    assert team is not None  # the team owns the job just read
    if jobs.model_name(base=job.model, team_name=team.name, suffix=job.suffix, job_id=job.id) != match["job_model"]:
        return None
    row = session.scalar(select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job.id,
                                                            FineTuningCheckpoint.step == int(match["step"])))
    return (row, job.model) if row is not None else None


def list_models(session: Session, *, team_id: str) -> list[tuple[str, FineTuningCheckpoint, str]]:
    """The team's checkpoints as models, newest first: (model name, checkpoint, its job's base model), each name
    one that get_by_model_name resolves."""
    team = session.get(Team, team_id)
    if team is None:
        return []
    rows = session.execute(select(FineTuningCheckpoint, FineTuningJob)
                           .join(FineTuningJob, FineTuningJob.id == FineTuningCheckpoint.job_id)
                           .where(FineTuningCheckpoint.team_id == team_id, FineTuningJob.team_id == team_id)
                           .order_by(FineTuningCheckpoint.created_at.desc(), FineTuningCheckpoint.id.desc()))
    return [(model_name(job_model=jobs.model_name(base=job.model, team_name=team.name, suffix=job.suffix,
                                                  job_id=job.id), step=row.step), row, job.model)
            for row, job in rows.tuples()]


def get(session: Session, *, team_id: str, checkpoint_id: str) -> tuple[FineTuningCheckpoint, str] | None:
    """The team's checkpoint by id, with its job's base model; None for a missing id and another team's alike."""
    row = get_owned(session, FineTuningCheckpoint, checkpoint_id, team_id)
    if row is None:
        return None
    job = jobs.get(session, team_id=team_id, job_id=row.job_id)
    return row, job.model


def delete_for_job(session: Session, *, job_id: str) -> int:
    """Delete the job's checkpoints (their model names then answer 404); their files are removed after commit.
    Returns how many there were."""
    rows = list(session.scalars(select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)))
    for row in rows:
        session.delete(row)
        queue.delete_after_commit(session, row.storage_prefix)
    session.flush()
    return len(rows)


def to_read(row: FineTuningCheckpoint, *, model: str) -> CheckpointRead:
    """OpenAI's checkpoint object; model is the job's fine-tuned model name (jobs.model_name)."""
    return CheckpointRead(id=row.id, created_at=unix(row.created_at), fine_tuning_job_id=row.job_id,
                          fine_tuned_model_checkpoint=model_name(job_model=model, step=row.step), step_number=row.step,
                          metrics=CheckpointMetrics(**{**row.metrics, "step": row.step}))
