from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import ADMIN_ONLY, AdminDep, PageDep, SessionDep
from app.domains.audit import service as audit
from app.domains.audit.schemas import AuditEventList

router = APIRouter(prefix="/audit_events", tags=["audit"])


@router.get("", response_model=AuditEventList, openapi_extra=ADMIN_ONLY)
def list_audit_events(session: SessionDep, principal: AdminDep, page: PageDep,
                      action: Annotated[str | None, Query(max_length=255)] = None,
                      key_id: Annotated[str | None, Query(max_length=40)] = None) -> AuditEventList:
    """The team's audit log, newest first: every POST/PUT/PATCH/DELETE under /v1 made with its keys,
    refused ones included. Filter by `action` ("DELETE /v1/files/{file_id}") or `key_id`. Admin keys only."""
    return audit.list_page(session, team_id=principal.team_id, after=page.after, limit=page.limit,
                           action=action, key_id=key_id)
