from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session

from app.api.blobs import REDIRECT_RESPONSE, stream_blob
from app.api.deps import IdempotencyKey, PrincipalDep, SessionDep, in_unit_of_work
from app.api.idempotent import create_once
from app.api.upload import receive_upload
from app.core.config import get_settings
from app.core.storage import get_storage
from app.domains.evaluations import service as evaluations
from app.domains.files import service as files
from app.domains.files.errors import FileNotFound
from app.domains.files.models import File
from app.domains.files.schemas import FileDeleted, FileList, FileRead
from app.domains.files.validation import JsonlValidator
from app.domains.idempotency import service as idempotency
from app.domains.jobs import service as jobs
from app.domains.quotas import service as quotas

router = APIRouter(prefix="/files", tags=["files"])

_UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": list(files.PURPOSES)},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {"type": "integer", "minimum": files.EXPIRES_MIN_SECONDS,
                                              "maximum": files.EXPIRES_MAX_SECONDS}}}}}}}


@router.post("", response_model=FileRead, openapi_extra=_UPLOAD_DOC,
             summary="Upload a file (multipart: purpose=fine-tune|evals|user_data, file=@data.jsonl)")
async def upload_file(request: Request, principal: PrincipalDep,
                      idempotency_key: IdempotencyKey = None) -> FileRead:
    """Streams the upload to storage while hashing and validating it line by line.
    400 with the first errors and their line numbers for an invalid file, 413 over the size limit,
    409 over the team's storage or files quota; nothing is stored in any of these cases. user_data
    files are stored as sent, unvalidated. With expires_after (anchor created_at, seconds 3600 to
    2592000) the file expires then: the reaper deletes it, once no unfinished job or evaluation uses it.
    No connection is held while the body streams in: the checks before it and the write after it
    each run in a short transaction of their own."""
    def seen(session: Session) -> FileRead | None:
        existing = idempotency.lookup(session, team_id=principal.team_id, endpoint="files", key=idempotency_key)
        if existing:
            return files.to_read(files.get(session, team_id=principal.team_id, file_id=existing))
        # Refuse a team already at its quota before reading the body; the final check is below.
        quotas.check_upload(session, team_id=principal.team_id, size=1, lock=False)
        return None

    earlier = await in_unit_of_work(seen)
    if earlier is not None:
        return earlier
    settings = get_settings()
    storage = get_storage()
    upload = await receive_upload(
        request, storage=storage, max_bytes=settings.upload_max_bytes,
        validator=JsonlValidator(max_errors=settings.upload_max_errors,
                                 max_line_bytes=settings.upload_max_line_bytes))
    stored: list[str] = []  # the blob's key, once the upload is moved into storage

    def create(session: Session):
        files.check_fields(upload.fields)
        purpose = files.check_purpose(upload.fields.get("purpose"))
        expires = files.expires_after(upload.fields)
        files.check_report(purpose, upload.report, size=upload.bytes)
        quotas.check_upload(session, team_id=principal.team_id, size=upload.bytes)
        row = files.create(session, team_id=principal.team_id, storage=storage, temp_path=upload.temp_path,
                           filename=upload.filename, purpose=purpose, size=upload.bytes, sha256=upload.sha256,
                           report=upload.report, expires_after_seconds=expires)
        stored.append(row.storage_key)
        return row

    def record(session: Session) -> tuple[File, bool]:
        return create_once(
            session, principal, endpoint="files", key=idempotency_key, create=lambda: create(session),
            fetch=lambda file_id: files.get(session, team_id=principal.team_id, file_id=file_id))

    try:
        row, created = await in_unit_of_work(record)
    except BaseException:
        _drop(upload, storage, stored)
        raise
    if not created:  # a concurrent request with the same Idempotency-Key won: answer with its file
        _drop(upload, storage, stored)
    return files.to_read(row)


def _drop(upload, storage, stored: list[str]) -> None:
    """Remove an upload that was not recorded: its temporary file, or the blob it became."""
    upload.discard()
    for key in stored:
        storage.delete(key)


@router.get("", response_model=FileList)
def list_files(session: SessionDep, principal: PrincipalDep,
               after: Annotated[str | None, Query(max_length=64)] = None,
               limit: Annotated[int, Query(ge=1, le=10_000, description="1 to 10,000, as OpenAI's")] = 10_000,
               order: Annotated[Literal["asc", "desc"], Query(description="By created_at")] = "desc",
               purpose: Annotated[str | None, Query(max_length=32)] = None) -> FileList:
    """The team's files, newest first (order=desc) or oldest first (asc); page with after=<last id>."""
    return files.list_page(session, team_id=principal.team_id, after=after, limit=limit, order=order,
                           purpose=purpose)


@router.get("/{file_id}", response_model=FileRead)
def get_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> FileRead:
    return files.to_read(files.get(session, team_id=principal.team_id, file_id=file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/jsonl": {}, "text/csv": {}, "application/octet-stream": {}}},
                       **REDIRECT_RESPONSE})
def file_content(file_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """The whole file, or 404: a file deleted while this answers is still sent whole once opened. JSONL
    datasets as application/jsonl, a job's metrics CSV as text/csv, user_data as application/octet-stream."""
    row = files.get(session, team_id=principal.team_id, file_id=file_id)
    return stream_blob(row.storage_key, missing=FileNotFound(f"No such file: {file_id!r}.", param="file_id"),
                       media_type=files.media_type(row))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> FileDeleted:
    """409 while an unfinished job (its training, validation or eval.tasks file) or a queued or running
    evaluation (its tasks or completions_file) uses the file."""
    files.delete(session, team_id=principal.team_id, file_id=file_id,
                 active_job_ids=jobs.active_jobs_using_file(session, team_id=principal.team_id, file_id=file_id),
                 active_evaluation_ids=evaluations.unfinished_using_file(session, team_id=principal.team_id,
                                                                         file_id=file_id))
    return FileDeleted(id=file_id)
