"""Multipart uploads (OpenAI's Uploads API): a file past the single-request limit, sent as parts of
up to uploads.part_max_bytes, then assembled in the order the client names into one File that is
validated like any upload.

Every change of an upload starts with one conditional UPDATE on its row (pending and unexpired),
which also locks the row until the transaction ends: a part being recorded, a completion, a cancel
and the reaper's expiry never interleave, and only one of them wins a race for the final state.
Part blobs live under the upload's storage prefix; they are deleted, after commit, once the upload
completes, is cancelled or expires.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.core import queue
from app.core.config import get_settings
from app.core.db import get_owned, unix, utcnow
from app.core.ids import new_id
from app.core.storage import Storage
from app.domains.files import service as files
from app.domains.files.models import File
from app.domains.files.validation import JsonlValidator, ValidationReport
from app.domains.quotas import service as quotas
from app.domains.uploads.errors import UploadInvalid, UploadNotFound, UploadNotPending
from app.domains.uploads.models import Upload, UploadPart
from app.domains.uploads.schemas import MD5_HEX, UploadCreate, UploadPartRead, UploadRead
from app.domains.uploads.states import UploadStatus

# The types a JSONL file is sent as (parameters such as "; charset=utf-8" aside).
JSONL_MIME_TYPES = ("application/jsonl", "application/x-jsonl", "application/jsonlines",
                    "application/x-jsonlines", "application/x-ndjson", "application/json", "text/jsonl",
                    "text/plain")
_MD5 = re.compile(MD5_HEX)


@dataclass
class Assembly:
    """What complete() needs of a pending upload, read in a short transaction before the parts are
    streamed together (with no connection held meanwhile)."""

    upload_id: str
    keys: list[str]  # the parts' blobs, in the order given
    bytes: int


@dataclass
class Assembled:
    """The parts streamed into one temporary file, with what was learnt on the way."""

    temp_path: str
    bytes: int
    sha256: str
    md5: str
    report: ValidationReport

    def discard(self) -> None:
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


class PartsGone(Exception):
    """A part's blob vanished while the parts were assembled: the upload was cancelled or expired meanwhile."""


def parts_prefix(*, team_id: str, upload_id: str) -> str:
    """Where an upload's parts live: the one definition of their key layout."""
    return f"teams/{team_id}/uploads/{upload_id}"


def part_key(*, team_id: str, upload_id: str, part_id: str) -> str:
    return f"{parts_prefix(team_id=team_id, upload_id=upload_id)}/{part_id}.part"


def create(session: Session, *, team_id: str, body: UploadCreate) -> Upload:
    """A pending upload that expires uploads.expire_seconds from now. Raises FileInvalid (purpose),
    UploadInvalid (bytes over uploads.max_bytes, a mime_type that is not JSONL's), or TooManyFiles /
    StorageFull (409) when a file of `bytes` would not fit the team's quota now."""
    settings = get_settings().uploads
    purpose = files.check_purpose(body.purpose)
    media_type = body.mime_type.split(";", 1)[0].strip().lower()
    if media_type not in JSONL_MIME_TYPES:
        raise UploadInvalid(f"mime_type must be a JSONL type, such as application/jsonl (one of "
                            f"{', '.join(JSONL_MIME_TYPES)}); got {body.mime_type!r}.", param="mime_type",
                            code="invalid_mime_type")
    if body.bytes > settings.max_bytes:
        raise UploadInvalid(f"bytes is {body.bytes}, over the limit of {settings.max_bytes} bytes an upload may "
                            "hold.", param="bytes", code="upload_too_large")
    quotas.check_upload(session, team_id=team_id, size=body.bytes, lock=False)
    now = utcnow()
    row = Upload(id=new_id("upload"), team_id=team_id, filename=files.display_name(body.filename), purpose=purpose,
                 bytes=body.bytes, mime_type=body.mime_type, status=UploadStatus.PENDING,
                 file_expires_after_seconds=body.expires_after.seconds if body.expires_after else None,
                 created_at=now, expires_at=now + dt.timedelta(seconds=settings.expire_seconds))
    session.add(row)
    session.flush()
    return row


def get(session: Session, *, team_id: str, upload_id: str) -> Upload:
    """The team's upload. Raises UploadNotFound for a missing id and for another team's, alike."""
    row = get_owned(session, Upload, upload_id, team_id)
    if row is None:
        raise UploadNotFound(f"No such upload: {upload_id!r}.", param="upload_id")
    return row


def status(row: Upload, *, now: dt.datetime | None = None) -> UploadStatus:
    """The upload's status as the client sees it: a pending upload past expires_at is expired
    already, before the reaper has marked it so."""
    if row.status == UploadStatus.PENDING and row.expires_at <= (now or utcnow()):
        return UploadStatus.EXPIRED
    return UploadStatus(row.status)


def check_pending(session: Session, *, team_id: str, upload_id: str) -> Upload:
    """The team's upload if it still takes parts. Raises UploadNotFound or UploadNotPending. For the
    early check before a part's body is read; add_part checks again, under the row's lock."""
    row = get(session, team_id=team_id, upload_id=upload_id)
    _refuse_unless_pending(row)
    return row


def add_part(session: Session, *, team_id: str, upload_id: str, storage: Storage, temp_path: str,
             size: int) -> UploadPart:
    """Move a received part into storage and record it. Raises UploadNotFound, UploadNotPending, or
    UploadInvalid for an empty part or one that would take the parts past the upload's `bytes`
    (the caller discards the temp file). The blob is written before the row, and removed if the
    transaction does not commit."""
    row = _claim(session, team_id=team_id, upload_id=upload_id, to=UploadStatus.PENDING)
    if size == 0:
        raise UploadInvalid("The part is empty; send at least one byte in 'data'.", param="data", code="empty_part")
    held = session.scalar(select(func.coalesce(func.sum(UploadPart.bytes), 0))
                          .where(UploadPart.upload_id == row.id)) or 0
    if held + size > row.bytes:
        raise UploadInvalid(f"This part of {size} bytes would take the upload's parts to {held + size} bytes, past "
                            f"the {row.bytes} it was created for. Create the upload with the file's exact size.",
                            param="data", code="upload_too_large")
    part_id = new_id("part")
    key = part_key(team_id=team_id, upload_id=row.id, part_id=part_id)
    storage.commit(temp_path, key)
    queue.delete_after_rollback(session, key)
    part = UploadPart(id=part_id, upload_id=row.id, bytes=size, storage_key=key)
    session.add(part)
    session.flush()
    return part


def plan_assembly(session: Session, *, team_id: str, upload_id: str, part_ids: Sequence[str],
                  md5: str | None) -> Assembly:
    """Check a completion before any byte is read: the upload is pending, md5 is hex, every id is a
    part of this upload named once, and the parts hold exactly the upload's `bytes`. Raises
    UploadNotFound, UploadNotPending, UploadInvalid (param md5, part_ids.N or part_ids), or
    TooManyFiles / StorageFull (409) when the file would not fit the team's quota now."""
    row = check_pending(session, team_id=team_id, upload_id=upload_id)
    if md5 is not None and not _MD5.fullmatch(md5):
        raise UploadInvalid(f"md5 must be 32 hexadecimal digits; got {md5!r}.", param="md5", code="invalid_md5")
    found = {p.id: p for p in session.scalars(select(UploadPart).where(UploadPart.id.in_(set(part_ids))))}
    seen: set[str] = set()
    for index, part_id in enumerate(part_ids):
        part = found.get(part_id)
        if part is None or part.upload_id != row.id:
            raise UploadInvalid(f"{part_id!r} is not a part of upload {row.id}; list only the ids its parts "
                                "(POST /v1/uploads/{upload_id}/parts) answered with.", param=f"part_ids.{index}",
                                code="unknown_part")
        if part_id in seen:
            raise UploadInvalid(f"Part {part_id} is listed twice; list each part once.", param=f"part_ids.{index}",
                                code="duplicate_part")
        seen.add(part_id)
    total = sum(found[p].bytes for p in part_ids)
    if total != row.bytes:
        raise UploadInvalid(f"The listed parts hold {total} bytes, but the upload was created for {row.bytes}: "
                            "send the missing parts, or list them all.", param="part_ids", code="bytes_mismatch")
    quotas.check_upload(session, team_id=team_id, size=row.bytes, lock=False)
    return Assembly(upload_id=row.id, keys=[found[p].storage_key for p in part_ids], bytes=total)


def assemble(storage: Storage, assembly: Assembly, *, validator: JsonlValidator) -> Assembled:
    """Stream the parts, in order, into one temporary file while counting, hashing (sha256 and md5)
    and validating them: memory holds one chunk at a time. Raises PartsGone when a part's blob is
    gone (the upload ended meanwhile); the temporary file is then removed."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with storage.temp_file() as out:
        try:
            for key in assembly.keys:
                for chunk in storage.iter_bytes(key):
                    out.write(chunk)
                    sha256.update(chunk)
                    md5.update(chunk)
                    validator.feed(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            out.close()
            os.unlink(out.name)
            raise PartsGone(assembly.upload_id) from None
    return Assembled(temp_path=out.name, bytes=size, sha256=sha256.hexdigest(), md5=md5.hexdigest(),
                     report=validator.finish())


def complete(session: Session, *, team_id: str, upload_id: str, storage: Storage, assembled: Assembled,
             md5: str | None) -> Upload:
    """Turn the assembled parts into a File and the upload into completed, its parts deleted after
    commit. Raises UploadNotPending (completed, cancelled or expired meanwhile), UploadInvalid (md5
    or byte count mismatch), FileInvalid (the content fails validation, line by line, as an upload
    does), or TooManyFiles / StorageFull; in each case nothing is recorded and the caller discards
    the temporary file. The File's blob is written before the commit; if the transaction later
    fails, the caller removes it (the File's storage_key)."""
    row = _claim(session, team_id=team_id, upload_id=upload_id, to=UploadStatus.COMPLETED)
    if md5 is not None and md5.lower() != assembled.md5:
        raise UploadInvalid(f"The md5 of the assembled parts is {assembled.md5}, not {md5.lower()}: a part is "
                            "missing, corrupted or out of order.", param="md5", code="md5_mismatch")
    if assembled.bytes != row.bytes:  # plan_assembly checked the parts' sizes; this checks their blobs
        raise UploadInvalid(f"The assembled parts hold {assembled.bytes} bytes, not the {row.bytes} the upload was "
                            "created for.", param="part_ids", code="bytes_mismatch")
    quotas.check_upload(session, team_id=team_id, size=assembled.bytes)
    created = files.create(session, team_id=team_id, storage=storage, temp_path=assembled.temp_path,
                           filename=row.filename, purpose=row.purpose, size=assembled.bytes,
                           sha256=assembled.sha256, report=assembled.report,
                           expires_after_seconds=row.file_expires_after_seconds)
    row.file_id = created.id
    _drop_parts(session, row)
    session.flush()
    return row


def cancel(session: Session, *, team_id: str, upload_id: str) -> Upload:
    """Cancel a pending upload; its parts are deleted after commit. Raises UploadNotFound, or
    UploadNotPending for one already completed, cancelled or expired."""
    row = _claim(session, team_id=team_id, upload_id=upload_id, to=UploadStatus.CANCELLED)
    _drop_parts(session, row)
    session.flush()
    return row


def expire(session: Session, *, now: dt.datetime | None = None) -> list[str]:
    """Mark every pending upload past its expires_at expired and delete its parts after commit (the
    reaper's step). Returns their ids. Idempotent: an upload already marked matches no more."""
    now = now or utcnow()
    rows = session.execute(update(Upload).where(Upload.status == UploadStatus.PENDING, Upload.expires_at <= now)
                           .values(status=UploadStatus.EXPIRED).returning(Upload.id, Upload.team_id)).all()
    for upload_id, team_id in rows:
        session.execute(delete(UploadPart).where(UploadPart.upload_id == upload_id))
        queue.delete_after_commit(session, parts_prefix(team_id=team_id, upload_id=upload_id))
    return [upload_id for upload_id, _ in rows]


def to_read(session: Session, row: Upload) -> UploadRead:
    file = session.get(File, row.file_id) if row.file_id else None
    return UploadRead(id=row.id, bytes=row.bytes, created_at=unix(row.created_at), expires_at=unix(row.expires_at),
                      filename=row.filename, purpose=row.purpose, status=status(row),
                      file=files.to_read(file) if file is not None else None)


def part_to_read(part: UploadPart) -> UploadPartRead:
    return UploadPartRead(id=part.id, created_at=unix(part.created_at), upload_id=part.upload_id)


def _claim(session: Session, *, team_id: str, upload_id: str, to: UploadStatus) -> Upload:
    """Move a pending, unexpired upload to `to` (pending itself: only lock it) in one conditional
    UPDATE, which holds the row's lock until the transaction ends. Raises UploadNotFound, or
    UploadNotPending when the upload is in any other state."""
    now = utcnow()
    claimed = session.execute(
        update(Upload).where(Upload.id == upload_id, Upload.team_id == team_id, Upload.status == UploadStatus.PENDING,
                             Upload.expires_at > now)
        .values(status=to).returning(Upload.id)).scalar_one_or_none()
    row = get(session, team_id=team_id, upload_id=upload_id)
    session.refresh(row)
    if claimed is None:
        _refuse_unless_pending(row, now=now)
    return row


def _refuse_unless_pending(row: Upload, *, now: dt.datetime | None = None) -> None:
    current = status(row, now=now)
    if current == UploadStatus.PENDING:
        return
    hint = {UploadStatus.COMPLETED: f"its file is {row.file_id}" if row.file_id else "its file was deleted since",
            UploadStatus.CANCELLED: "create a new upload",
            UploadStatus.EXPIRED: "its expires_at has passed; create a new upload"}[current]
    raise UploadNotPending(f"Upload {row.id} is {current.value}, so it takes no more parts and cannot be completed "
                           f"or cancelled ({hint}).", param="upload_id")


def _drop_parts(session: Session, row: Upload) -> None:
    session.execute(delete(UploadPart).where(UploadPart.upload_id == row.id))
    queue.delete_after_commit(session, parts_prefix(team_id=row.team_id, upload_id=row.id))
