"""Exports of an adapter: merged safetensors or GGUF, written by a worker, then downloaded."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session

from app.api.blobs import REDIRECT_RESPONSE, stream_blob
from app.api.deps import IdempotencyKey, PageDep, PrincipalDep, SessionDep
from app.api.idempotent import create_once
from app.core.errors import Conflict
from app.domains.exports import service as exports
from app.domains.exports.models import AdapterExport
from app.domains.exports.errors import ExportNotFound
from app.domains.exports.schemas import ExportCreate, ExportDeleted, ExportList, ExportRead
from app.domains.exports.states import ExportFormat, ExportStatus
from app.domains.quotas import service as quotas

router = APIRouter(tags=["exports"])


@router.post("/adapters/{adapter_id}/exports", response_model=ExportRead)
def create_export(adapter_id: str, body: ExportCreate, session: SessionDep, principal: PrincipalDep,
                  idempotency_key: IdempotencyKey = None) -> ExportRead:
    """Write the adapter out on a worker: format "merged" (the LoRA folded into the base's weights,
    in dtype bfloat16, float16 or float32, with the config and tokenizer, as a .tar.gz of a
    save_pretrained directory) or "gguf" (one file for llama.cpp and Ollama, Llama-family bases,
    quantization f16 or q8_0). Answers queued; poll GET /v1/exports/{id} until succeeded, then
    download /v1/exports/{id}/content. The result counts toward the team's storage quota: 409 when
the team's storage is already full, and the export fails (storage_quota_exceeded) when its file
does not fit."""
    row, _ = create_once(
        session, principal, endpoint="exports", key=idempotency_key,
        create=lambda: _create(session, principal.team_id, adapter_id, body),
        fetch=lambda export_id: exports.get(session, team_id=principal.team_id, export_id=export_id))
    return exports.to_read(row)


def _create(session: Session, team_id: str, adapter_id: str, body: ExportCreate) -> AdapterExport:
    row = exports.create(session, team_id=team_id, adapter_id=adapter_id, body=body)
    quotas.check_room(session, team_id=team_id, what="the export")
    return row


@router.get("/adapters/{adapter_id}/exports", response_model=ExportList)
def list_exports(adapter_id: str, session: SessionDep, principal: PrincipalDep, page: PageDep) -> ExportList:
    return exports.list_page(session, team_id=principal.team_id, adapter_id=adapter_id, after=page.after,
                             limit=page.limit)


@router.get("/exports/{export_id}", response_model=ExportRead)
def get_export(export_id: str, session: SessionDep, principal: PrincipalDep) -> ExportRead:
    return exports.to_read(exports.get(session, team_id=principal.team_id, export_id=export_id))


@router.get("/exports/{export_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/gzip": {}, "application/octet-stream": {}}},
                       **REDIRECT_RESPONSE})
def download_export(export_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """The export: a .tar.gz of the merged model directory (load it with from_pretrained), or the
    .gguf file. 409 until the export has succeeded."""
    row = exports.get(session, team_id=principal.team_id, export_id=export_id)
    if row.status != ExportStatus.SUCCEEDED or row.sha256 is None:
        raise Conflict(f"Export {export_id} is {row.status}; its content exists once it has succeeded.",
                       param="export_id", code="export_not_ready")
    gguf = row.format == ExportFormat.GGUF
    read = exports.to_read(row)
    return stream_blob(row.storage_key, missing=ExportNotFound(f"No such export: {export_id!r}.", param="export_id"),
                       media_type="application/octet-stream" if gguf else "application/gzip",
                       filename=read.filename, headers={"X-Export-SHA256": row.sha256})


@router.delete("/exports/{export_id}", response_model=ExportDeleted)
def delete_export(export_id: str, session: SessionDep, principal: PrincipalDep) -> ExportDeleted:
    """Delete the export and its file, freeing its bytes from the team's storage quota."""
    exports.delete(session, team_id=principal.team_id, export_id=export_id)
    return ExportDeleted(id=export_id)
