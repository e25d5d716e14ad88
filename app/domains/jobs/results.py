"""A job's result files: OpenAI's metrics CSV, written from its metrics events when training ends."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.storage import get_storage
from app.domains.files import service as files
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
    earlier = session.scalar(select(FineTuningJob.result_files).where(FineTuningJob.id == job_id)) or []
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                    .values(result_files=[*earlier, row.id]).execution_options(synchronize_session=False))
    return row.id
