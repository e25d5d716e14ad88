"""A job's result files: OpenAI's metrics CSV, written from its metrics events when training ends, and
archives the worker wrote (the TensorBoard event files of a job with the tensorboard integration)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core import queue
from app.core.ids import new_id
from app.core.storage import get_storage
from app.domains.files import service as files
from app.domains.files.models import File
from app.domains.jobs.models import FineTuningJob, FineTuningJobEvent

# The CSV's metric columns after step (files.RESULT_COLUMNS), and the event keys each is read from:
# a training log carries train_loss (and, before it was added, only loss), a validation result valid_loss.
_SOURCES = (("train_loss", "loss"), ("train_mean_token_accuracy",), ("valid_loss",), ("valid_mean_token_accuracy",))


def metric_rows(session: Session, job_id: str) -> list[tuple[int, float | None, float | None, float | None,
                                                             float | None]]:
    """One row per step that logged a training or validation metric, in step order: (step,
    train_loss, train_mean_token_accuracy, valid_loss, valid_mean_token_accuracy), None where the
    step did not log it. A step logged twice (trained again after a resume from an earlier
    checkpoint) keeps its latest values."""
    steps: dict[int, list[float | None]] = {}
    events = session.scalars(select(FineTuningJobEvent.data).where(
        FineTuningJobEvent.job_id == job_id, FineTuningJobEvent.type == "metrics").order_by(FineTuningJobEvent.id))
    for data in events:
        if not data or not isinstance(data.get("step"), int):
            continue
        found = [next((data[k] for k in keys if isinstance(data.get(k), int | float)), None) for keys in _SOURCES]
        if all(v is None for v in found):
            continue
        row = steps.setdefault(data["step"], [None] * len(_SOURCES))
        # A training log and the validation at the same step are two events: each fills its own cells.
        for cells in (slice(0, 2), slice(2, 4)):
            if any(v is not None for v in found[cells]):
                row[cells] = found[cells]
    return [(step, *values) for step, values in sorted(steps.items())]  # type: ignore[misc]


def attach(session: Session, *, job_id: str, team_id: str) -> str | None:
    """Write the job's metrics CSV (a fine-tune-results file of its team) and add it to the job's
    result_files; returns its id, or None when the job logged no metrics (nothing is written).
    Call it in the transaction that records the job's end of training: a rollback removes the
    file's row and blob alike."""
    rows = metric_rows(session, job_id)
    if not rows:
        return None
    row = files.create_results(session, team_id=team_id, storage=get_storage(), rows=rows)
    _add(session, job_id, row.id)
    return row.id


def attach_archive(session: Session, *, job_id: str, team_id: str, path: Path, filename: str) -> str:
    """Store the archive at `path` (a .tar.gz the worker wrote) as a fine-tune-results file of the team
    named `filename`, and add it to the job's result_files; returns its id. The blob is written
    before the row and removed if the transaction rolls back."""
    file_id = new_id("file")
    key = files.storage_key(team_id=team_id, file_id=file_id, extension=files.ARCHIVE_FORMAT)
    blob = get_storage().put_file(path, key)
    queue.delete_after_rollback(session, key)
    session.add(File(id=file_id, team_id=team_id, filename=filename, purpose=files.RESULTS_PURPOSE, bytes=blob.bytes,
                     sha256=blob.sha256, format=files.ARCHIVE_FORMAT, examples=0, storage_key=key))
    session.flush()
    _add(session, job_id, file_id)
    return file_id


def _add(session: Session, job_id: str, file_id: str) -> None:
    earlier = session.scalar(select(FineTuningJob.result_files).where(FineTuningJob.id == job_id)) or []
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                    .values(result_files=[*earlier, file_id]).execution_options(synchronize_session=False))
