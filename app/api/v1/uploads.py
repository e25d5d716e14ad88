"""OpenAI's Uploads API: a file past the single-request limit of POST /v1/files, sent in parts.

No connection is held while a part streams in or the parts are assembled: the checks before and the
writes after each run in a short transaction of their own (in_unit_of_work), as uploads do."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.api.deps import IdempotencyKey, PrincipalDep, SessionDep, in_unit_of_work
from app.api.idempotent import create_once
from app.api.upload import receive_part
from app.core.config import get_settings
from app.core.storage import get_storage
from app.domains.files.models import File
from app.domains.files.validation import JsonlValidator
from app.domains.uploads import service as uploads
from app.domains.uploads.schemas import UploadComplete, UploadCreate, UploadPartRead, UploadRead

router = APIRouter(prefix="/uploads", tags=["uploads"])

_PART_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "format": "binary"}}}}}}}


@router.post("", response_model=UploadRead)
def create_upload(body: UploadCreate, session: SessionDep, principal: PrincipalDep,
                  idempotency_key: IdempotencyKey = None) -> UploadRead:
    """A pending upload of `bytes` bytes, expiring in an hour (expires_at). 400 for a purpose files
    refuse, bytes over TUNEFORGE_UPLOADS__MAX_BYTES or a mime_type that is not JSONL's; 409 when a
    file that size would not fit the team's quota."""
    row, _ = create_once(
        session, principal, endpoint="uploads", key=idempotency_key,
        create=lambda: uploads.create(session, team_id=principal.team_id, body=body),
        fetch=lambda upload_id: uploads.get(session, team_id=principal.team_id, upload_id=upload_id))
    return uploads.to_read(session, row)


@router.post("/{upload_id}/parts", response_model=UploadPartRead, openapi_extra=_PART_DOC,
             summary="Add a part (multipart: data=@part), up to 64 MB")
async def add_part(upload_id: str, request: Request, principal: PrincipalDep) -> UploadPartRead:
    """Streams the part to storage (memory stays flat). 404 for another team's upload, 409 unless it
    is pending, 413 over TUNEFORGE_UPLOADS__PART_MAX_BYTES, 400 for an empty part or one that takes
    the parts past the upload's bytes; nothing is kept of a refused part."""
    await in_unit_of_work(lambda s: uploads.check_pending(s, team_id=principal.team_id, upload_id=upload_id))
    storage = get_storage()
    part = await receive_part(request, storage=storage, max_bytes=get_settings().uploads.part_max_bytes)
    try:
        return await in_unit_of_work(lambda s: uploads.part_to_read(uploads.add_part(
            s, team_id=principal.team_id, upload_id=upload_id, storage=storage, temp_path=part.temp_path,
            size=part.bytes)))
    finally:
        part.discard()  # moved into storage when recorded; else removed here (the blob, if any, on rollback)


@router.post("/{upload_id}/complete", response_model=UploadRead)
async def complete_upload(upload_id: str, body: UploadComplete, principal: PrincipalDep) -> UploadRead:
    """Assembles the parts in part_ids' order into a File, validated as POST /v1/files validates (400
    with the first errors and their line numbers, and no File); 400 for an unknown or repeated part,
    a byte count other than the upload's bytes or a wrong md5; 409 unless the upload is pending."""
    team_id = principal.team_id
    assembly = await in_unit_of_work(lambda s: uploads.plan_assembly(
        s, team_id=team_id, upload_id=upload_id, part_ids=body.part_ids, md5=body.md5))
    settings = get_settings()
    storage = get_storage()
    validator = JsonlValidator(max_errors=settings.upload_max_errors, max_line_bytes=settings.upload_max_line_bytes)
    try:
        assembled = await run_in_threadpool(uploads.assemble, storage, assembly, validator=validator)
    except uploads.PartsGone:
        # Cancelled or expired while the parts were read: say so.
        await in_unit_of_work(lambda s: uploads.check_pending(s, team_id=team_id, upload_id=upload_id))
        raise
    stored: list[str] = []

    def record(session: Session) -> UploadRead:
        row = uploads.complete(session, team_id=team_id, upload_id=upload_id, storage=storage, assembled=assembled,
                               md5=body.md5)
        file = session.get(File, row.file_id)
        assert file is not None  # complete() just created it
        stored.append(file.storage_key)
        return uploads.to_read(session, row)

    try:
        return await in_unit_of_work(record)
    except BaseException:
        assembled.discard()
        for key in stored:
            storage.delete(key)
        raise


@router.post("/{upload_id}/cancel", response_model=UploadRead)
def cancel_upload(upload_id: str, session: SessionDep, principal: PrincipalDep) -> UploadRead:
    """Cancels a pending upload and deletes its parts. 409 once completed, cancelled or expired."""
    return uploads.to_read(session, uploads.cancel(session, team_id=principal.team_id, upload_id=upload_id))

