from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from app.api.blobs import REDIRECT_RESPONSE, stream_blob
from app.api.deps import PageDep, PrincipalDep, SessionDep
from app.domains.adapters import service as adapters
from app.domains.adapters.errors import AdapterNotFound
from app.domains.adapters.schemas import AdapterDeleted, AdapterList, AdapterRead

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("", response_model=AdapterList)
def list_adapters(session: SessionDep, principal: PrincipalDep, page: PageDep) -> AdapterList:
    return adapters.list_page(session, team_id=principal.team_id, after=page.after, limit=page.limit)


@router.get("/{adapter_id}", response_model=AdapterRead)
def get_adapter(adapter_id: str, session: SessionDep, principal: PrincipalDep) -> AdapterRead:
    return adapters.to_read(adapters.get(session, team_id=principal.team_id, adapter_id=adapter_id))


@router.get("/{adapter_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/gzip": {}}}, **REDIRECT_RESPONSE})
def download_adapter(adapter_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """A .tar.gz of the peft adapter directory (adapter_config.json, adapter_model.safetensors and
    the tokenizer): extract it and pass the folder to peft.PeftModel.from_pretrained."""
    row = adapters.get(session, team_id=principal.team_id, adapter_id=adapter_id)
    # An adapter deleted while this answers is still sent whole once opened, else 404.
    return stream_blob(row.archive_key, missing=AdapterNotFound(f"No such adapter: {adapter_id!r}.",
                                                                param="adapter_id"),
                       media_type="application/gzip", filename=f"{row.id}.tar.gz",
                       headers={"X-Adapter-SHA256": row.sha256})


@router.delete("/{adapter_id}", response_model=AdapterDeleted)
def delete_adapter(adapter_id: str, session: SessionDep, principal: PrincipalDep) -> AdapterDeleted:
    adapters.delete(session, team_id=principal.team_id, adapter_id=adapter_id)
    return AdapterDeleted(id=adapter_id)
