"""Files: validated JSONL datasets, user_data stored as sent, and jobs' result files, in storage
under the team's prefix; each may expire (expires_after), and the reaper deletes it then."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import get_owned, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import Order, paginate
from app.core.storage import Storage
from app.domains.files.errors import FileInUse, FileInvalid, FileNotFound
from app.domains.files.models import File
from app.domains.files.schemas import FileList, FileRead
from app.domains.files.validation import ValidationReport

# What an upload may give: fine-tune (training and validation data), evals (code tasks, completions)
# and user_data (stored as sent, unvalidated, readable back; no job or evaluation reads it).
USER_DATA = "user_data"
PURPOSES = ("fine-tune", "evals", USER_DATA)
# Written by Tuneforge only: a job's metrics CSV (its result_files).
RESULTS_PURPOSE = "fine-tune-results"
LISTED_PURPOSES = (*PURPOSES, RESULTS_PURPOSE)
# OpenAI's purposes for APIs Tuneforge does not have: refused by name, saying what exists instead.
_OTHER_APIS = {"assistants": "the Assistants API", "assistants_output": "the Assistants API",
               "batch": "the Batch API", "batch_output": "the Batch API", "vision": "vision fine-tuning"}
# The format of a user_data file: never validated, so no job or evaluation (which check formats) takes it.
UNVALIDATED = "unvalidated"
RESULTS_FORMAT = "csv"
# A result file that is a gzipped tar of a folder a job wrote (its TensorBoard event files).
ARCHIVE_FORMAT = "tar.gz"
# OpenAI's range for expires_after.seconds: one hour to 30 days.
EXPIRES_MIN_SECONDS, EXPIRES_MAX_SECONDS = 3600, 30 * 24 * 3600
# The multipart form fields an upload takes besides the file (OpenAI's, expires_after flattened).
UPLOAD_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
RESULT_COLUMNS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]")


def check_purpose(purpose: str | None) -> str:
    """The upload's purpose. Raises FileInvalid (param purpose) for any other, naming those that exist."""
    if purpose in PURPOSES:
        return purpose
    if purpose in _OTHER_APIS:
        message = (f"purpose {purpose!r} is for {_OTHER_APIS[purpose]}, which Tuneforge does not offer; "
                   f"upload with one of {', '.join(PURPOSES)}.")
    elif purpose == RESULTS_PURPOSE:
        message = (f"purpose {RESULTS_PURPOSE!r} is written by Tuneforge (a job's result_files) and cannot be "
                   f"uploaded; upload with one of {', '.join(PURPOSES)}.")
    else:
        message = f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}."
    raise FileInvalid(message, param="purpose", code="invalid_purpose")


def check_fields(fields: Mapping[str, str]) -> None:
    """Raises FileInvalid naming the first form field an upload does not take: none is ignored."""
    for name in fields:
        if name not in UPLOAD_FIELDS:
            raise FileInvalid(f"Unknown form field {name!r}; an upload takes 'file', 'purpose' and, optionally, "
                              "'expires_after[anchor]' with 'expires_after[seconds]'.", param=name,
                              code="unknown_parameter")


def expires_after(fields: Mapping[str, str]) -> int | None:
    """Seconds after creation at which the file expires, from OpenAI's expires_after form fields
    (anchor "created_at", seconds 3600..2592000), or None when none is given. Raises FileInvalid
    (param expires_after.anchor or expires_after.seconds)."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise FileInvalid(f"expires_after.anchor must be 'created_at' (the only anchor); got {anchor!r}.",
                          param="expires_after.anchor", code="invalid_value")
    try:
        value = int(seconds) if seconds is not None else None
    except ValueError:
        value = None
    if value is None or not EXPIRES_MIN_SECONDS <= value <= EXPIRES_MAX_SECONDS:
        raise FileInvalid(f"expires_after.seconds must be a whole number from {EXPIRES_MIN_SECONDS} (an hour) to "
                          f"{EXPIRES_MAX_SECONDS} (30 days); got {seconds!r}.", param="expires_after.seconds",
                          code="invalid_value")
    return value


def display_name(filename: str) -> str:
    """The name shown back to the user. It is never used as a path."""
    name = _UNSAFE.sub("_", os.path.basename(filename.replace("\\", "/")))[:255]
    # "." and ".." survive basename(); a client saving the file under its name must not get them.
    return name if name.strip(".") else "upload.jsonl"


def check_report(purpose: str, report: ValidationReport, *, size: int) -> None:
    """Raises FileInvalid unless the upload's content suits its purpose: valid JSONL records for
    fine-tune and evals (report_errors), anything but nothing for user_data."""
    if purpose != USER_DATA:
        report_errors(report)
    elif size == 0:
        raise FileInvalid("The file is empty; user_data files must hold something.", param="file")


def report_errors(report: ValidationReport) -> None:
    """Raise FileInvalid listing the first line errors, or return when the file is valid."""
    if not report.errors and report.examples > 0:
        return
    errors = report.errors or []
    shown = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message for e in errors)
    total = max(report.error_count, len(errors))
    more = f" ({len(errors)} of {total} errors shown; the file has {report.lines} lines)" if total > 1 else ""
    raise FileInvalid(f"The file is not valid JSONL for fine-tuning: {shown}{more}", param="file",
                      extra={"errors": [{"line": e.line, "message": e.message} for e in errors]})


def storage_key(*, team_id: str, file_id: str, extension: str = "jsonl") -> str:
    """Where a file's bytes live: the one definition of the files' key layout."""
    return f"teams/{team_id}/files/{file_id}.{extension}"


def create(session: Session, *, team_id: str, storage: Storage, temp_path: str, filename: str,
           purpose: str, size: int, sha256: str, report: ValidationReport,
           expires_after_seconds: int | None = None) -> File:
    """Move an upload into storage and record it, expiring expires_after_seconds after now when
    given. Raises FileInvalid when the report does not suit the purpose (check_report; the caller
    discards the temp file). The blob is written before the row; if the transaction later fails,
    the caller removes the blob via `storage_key`. A user_data file is recorded as UNVALIDATED."""
    check_report(purpose, report, size=size)
    file_id = new_id("file")
    key = storage_key(team_id=team_id, file_id=file_id)
    storage.commit(temp_path, key)
    validated = purpose != USER_DATA
    now = utcnow()
    row = File(id=file_id, team_id=team_id, filename=display_name(filename), purpose=purpose, bytes=size,
               sha256=sha256, format=(report.format or "unknown") if validated else UNVALIDATED,
               examples=report.examples if validated else 0, storage_key=key, created_at=now,
               expires_at=now + dt.timedelta(seconds=expires_after_seconds) if expires_after_seconds else None)
    session.add(row)
    session.flush()
    return row


def get(session: Session, *, team_id: str, file_id: str, lock: bool = False) -> File:
    """The team's file. Raises FileNotFound for a missing id and for another team's, alike.
    lock: hold a share lock on its row until the transaction ends, so the reaper cannot delete
    it meanwhile (a job or evaluation about to use it takes one)."""
    row = get_owned(session, File, file_id, team_id)
    if row is not None and lock:
        row = session.scalar(select(File).where(File.id == file_id).with_for_update(read=True)
                             .execution_options(populate_existing=True))
    if row is None:
        raise FileNotFound(f"No such file: {file_id!r}.", param="file_id")
    return row


def expired(file: File, *, now: dt.datetime | None = None) -> bool:
    """Whether the file's expires_at has passed (the reaper deletes it at its next pass, unless in use)."""
    return file.expires_at is not None and file.expires_at <= (now or utcnow())


def list_page(session: Session, *, team_id: str, after: str | None, limit: int, order: Order = "desc",
              purpose: str | None = None) -> FileList:
    """The team's files by created_at (their ids sort by creation), newest first or, with order
    "asc", oldest first; `after` is the last id of the previous page."""
    stmt = select(File).where(File.team_id == team_id)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    rows, has_more = paginate(session, stmt, File.id, after=after, limit=limit, order=order)
    data = [to_read(r) for r in rows]
    return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


def delete(session: Session, *, team_id: str, file_id: str,
           active_job_ids: list[str], active_evaluation_ids: list[str]) -> str:
    """Delete the row; its blob is removed after commit (so a failed commit never leaves a row
    without its blob). Returns the blob's storage key. Raises FileNotFound, or FileInUse while an
    unfinished job or evaluation uses the file (the callers' lists, found by their domains)."""
    row = get(session, team_id=team_id, file_id=file_id)
    users = ([f"unfinished job(s) {', '.join(active_job_ids)}"] if active_job_ids else []) + (
        [f"unfinished evaluation(s) {', '.join(active_evaluation_ids)}"] if active_evaluation_ids else [])
    if users:
        raise FileInUse(f"File {file_id} is used by {' and '.join(users)}; cancel them or wait until they end.",
                        param="file_id")
    session.delete(row)
    session.flush()
    queue.delete_after_commit(session, row.storage_key)
    return row.storage_key


def expired_page(session: Session, *, now: dt.datetime, after: tuple[dt.datetime, str] | None = None,
                 limit: int = 100) -> list[File]:
    """Up to `limit` files whose expires_at has passed, by (expires_at, id) past `after` (the last
    one of the previous page), each locked (skipping rows another transaction holds: a job being
    created on one, or another reaper), so the caller can check that nothing uses them and delete
    them before a new user appears."""
    stmt: Select = select(File).where(File.expires_at.is_not(None), File.expires_at <= now)
    if after is not None:
        stmt = stmt.where(tuple_(File.expires_at, File.id) > tuple_(*after))
    return list(session.scalars(stmt.order_by(File.expires_at, File.id).limit(limit)
                                .with_for_update(skip_locked=True)))


def create_results(session: Session, *, team_id: str, storage: Storage,
                   rows: Iterable[Sequence[float | int | None]]) -> File:
    """Write a job's metrics as OpenAI's result CSV (RESULT_COLUMNS; an empty cell where a value is
    unknown) and record it as a fine-tune-results file. The blob is written before the row and
    removed if the transaction rolls back."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    count = 0
    for values in rows:
        writer.writerow(["" if v is None else v for v in values])
        count += 1
    data = text.getvalue().encode()
    file_id = new_id("file")
    key = storage_key(team_id=team_id, file_id=file_id, extension=RESULTS_FORMAT)
    with storage.temp_file() as temp:
        temp.write(data)
        temp.flush()
        temp_name = temp.name
    storage.commit(temp_name, key)
    queue.delete_after_rollback(session, key)
    row = File(id=file_id, team_id=team_id, filename="step_metrics.csv", purpose=RESULTS_PURPOSE, bytes=len(data),
               sha256=hashlib.sha256(data).hexdigest(), format=RESULTS_FORMAT, examples=count, storage_key=key)
    session.add(row)
    session.flush()
    return row


def media_type(row: File) -> str:
    """The Content-Type its content is sent with."""
    if row.format == RESULTS_FORMAT:
        return "text/csv"
    if row.format == ARCHIVE_FORMAT:
        return "application/gzip"
    return "application/octet-stream" if row.format == UNVALIDATED else "application/jsonl"


def to_read(row: File) -> FileRead:
    return FileRead(id=row.id, bytes=row.bytes, created_at=unix(row.created_at), filename=row.filename,
                    purpose=row.purpose, sha256=row.sha256, format=row.format, examples=row.examples,
                    expires_at=unix(row.expires_at))
