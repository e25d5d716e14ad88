from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class AuditEventRead(BaseModel):
    id: str
    object: Literal["audit_event"] = "audit_event"
    team_id: str | None
    key_id: str | None
    action: str
    object_id: str | None
    status_code: int
    created_at: int


class AuditEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEventRead]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
