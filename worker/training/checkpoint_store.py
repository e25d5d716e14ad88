"""Training checkpoints in blob storage: upload (record, prune) and download the latest.

Called for the jobs.train task: upload from JobHooks.on_checkpoint (worker.training.job_hooks),
download_latest before building the recipe, so a retried, resumed or
handed-back job continues from its newest checkpoint. No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.db import session_scope
from app.core.storage import get_storage
from app.domains.checkpoints import service as checkpoints


def upload(*, job_id: str, team_id: str, step: int, local_dir: Path, metrics: dict[str, Any], keep: int) -> str:
    """Store local_dir's files, record the checkpoint, keep the job's `keep` latest; returns the checkpoint id.

    The files are stored before the row is committed, so a listed checkpoint is
    always complete; pruned checkpoints' files are deleted after the commit.
    Uploading the same step again replaces that checkpoint (idempotent for a
    step that is saved twice, e.g. by a job resumed from it and paused again).
    """
    storage = get_storage()
    prefix = checkpoints.storage_prefix(team_id=team_id, job_id=job_id, step=step)
    storage.put_tree(Path(local_dir), prefix)
    size = sum(p.stat().st_size for p in Path(local_dir).rglob("*") if p.is_file())
    with session_scope() as session:
        row = checkpoints.record(session, job_id=job_id, team_id=team_id, step=step, metrics=metrics, prefix=prefix,
                                 size=size)
        pruned = checkpoints.prune(session, job_id=job_id, keep=keep)
        checkpoint_id = row.id
    for old in pruned:
        storage.delete(old)
    return checkpoint_id


def download_latest(*, job_id: str, dest: Path) -> tuple[int, Path] | None:
    """Copy the job's newest checkpoint to dest/step-XXXXXXXX; (its step, that directory), or None if it has none.

    Raises FileNotFoundError when the recorded checkpoint's files are missing from storage.
    """
    with session_scope() as session:
        row = checkpoints.latest(session, job_id)
        if row is None:
            return None
        step, prefix = row.step, row.storage_prefix
    target = Path(dest) / f"step-{step:08d}"
    try:
        get_storage().fetch_tree_to(prefix, target)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint files of job {job_id} at step {step} are missing from storage "
                                f"({prefix})") from None
    return step, target
