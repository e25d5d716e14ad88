"""Datasets: validated JSONL files in storage under the team's prefix."""

from __future__ import annotations

import os
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import get_owned, unix
from app.core.ids import new_id
from app.core.pagination import paginate
from app.core.storage import Storage
from app.domains.files.errors import FileInUse, FileInvalid, FileNotFound
from app.domains.files.models import File
from app.domains.files.schemas import FileList, FileRead
from app.domains.files.validation import ValidationReport

PURPOSES = ("fine-tune", "evals")
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]")


def check_purpose(purpose: str | None) -> str:
    if purpose not in PURPOSES:
        raise FileInvalid(f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}.", param="purpose",
                          code="invalid_purpose")
    return purpose


def display_name(filename: str) -> str:
    """The name shown back to the user. It is never used as a path."""
    name = _UNSAFE.sub("_", os.path.basename(filename.replace("\\", "/")))[:255]
    # "." and ".." survive basename(); a client saving the file under its name must not get them.
    return name if name.strip(".") else "upload.jsonl"


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


def storage_key(*, team_id: str, file_id: str) -> str:
    """Where an uploaded file's bytes live: the one definition of the files' key layout."""
    return f"teams/{team_id}/files/{file_id}.jsonl"


def create(session: Session, *, team_id: str, storage: Storage, temp_path: str, filename: str,
           purpose: str, size: int, sha256: str, report: ValidationReport) -> File:
    """Move a validated upload into storage and record it. Raises FileInvalid for an invalid report
    (the caller discards the temp file). The blob is written before the row; if the transaction
    later fails, the caller removes the blob via `storage_key`."""
    report_errors(report)
    file_id = new_id("file")
    key = storage_key(team_id=team_id, file_id=file_id)
    storage.commit(temp_path, key)
    row = File(id=file_id, team_id=team_id, filename=display_name(filename), purpose=purpose, bytes=size,
               sha256=sha256, format=report.format or "unknown", examples=report.examples, storage_key=key)
    session.add(row)
    session.flush()
    return row


def get(session: Session, *, team_id: str, file_id: str) -> File:
    """The team's file. Raises FileNotFound for a missing id and for another team's, alike."""
    row = get_owned(session, File, file_id, team_id)
    if row is None:
        raise FileNotFound(f"No such file: {file_id!r}.", param="file_id")
    return row


def list_page(session: Session, *, team_id: str, after: str | None, limit: int,
              purpose: str | None = None) -> FileList:
    stmt = select(File).where(File.team_id == team_id)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    rows, has_more = paginate(session, stmt, File.id, after=after, limit=limit)
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


def to_read(row: File) -> FileRead:
    return FileRead(id=row.id, bytes=row.bytes, created_at=unix(row.created_at), filename=row.filename,
                    purpose=row.purpose, sha256=row.sha256, format=row.format, examples=row.examples)
