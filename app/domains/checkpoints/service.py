"""Training checkpoints of jobs: rows pointing at resumable directories in blob storage.

The worker stores a checkpoint's files first and records the row after, so a
row always points at complete files; prune returns the prefixes of the rows it
deleted for the caller to remove from storage after commit.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.db import unix
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.checkpoints.models import FineTuningCheckpoint
from app.domains.checkpoints.schemas import CheckpointList, CheckpointMetrics, CheckpointRead
from app.domains.jobs import service as jobs
from app.domains.teams.models import Team


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


def to_read(row: FineTuningCheckpoint, *, model: str) -> CheckpointRead:
    """OpenAI's checkpoint object; model is the job's fine-tuned model name (jobs.model_name)."""
    return CheckpointRead(id=row.id, created_at=unix(row.created_at), fine_tuning_job_id=row.job_id,
                          fine_tuned_model_checkpoint=f"{model}:ckpt-step-{row.step}", step_number=row.step,
                          metrics=CheckpointMetrics(**{**row.metrics, "step": row.step}))
