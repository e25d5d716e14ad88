"""API key management: admin keys only. A new key's secret is shown once, in the creating response."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ADMIN_ONLY, AdminDep, PageDep, SessionDep
from app.domains.teams import service as teams
from app.domains.teams.schemas import KeyCreate, KeyCreated, KeyList, KeyRead, KeyRotate

router = APIRouter(prefix="/keys", tags=["keys"])


@router.post("", response_model=KeyCreated, openapi_extra=ADMIN_ONLY)
def create_key(body: KeyCreate, session: SessionDep, principal: AdminDep) -> KeyCreated:
    """A new key for the caller's team (role admin or member). `key` is shown only in this response."""
    row, key = teams.create_key(session, team_id=principal.team_id, name=body.name, role=body.role)
    return teams.to_created(row, key)


@router.get("", response_model=KeyList, openapi_extra=ADMIN_ONLY)
def list_keys(session: SessionDep, principal: AdminDep, page: PageDep) -> KeyList:
    """Newest first, revoked keys included. Never the secret or its hash."""
    return teams.list_keys(session, team_id=principal.team_id, after=page.after, limit=page.limit)


@router.get("/{key_id}", response_model=KeyRead, openapi_extra=ADMIN_ONLY)
def get_key(key_id: str, session: SessionDep, principal: AdminDep) -> KeyRead:
    return teams.to_read(teams.get_key(session, team_id=principal.team_id, key_id=key_id))


@router.delete("/{key_id}", response_model=KeyRead, openapi_extra=ADMIN_ONLY)
def revoke_key(key_id: str, session: SessionDep, principal: AdminDep) -> KeyRead:
    """Revoke the key: it answers 401 from the next request on. The row stays, for the audit log.
    409 for the team's last active admin key."""
    return teams.to_read(teams.revoke_key(session, team_id=principal.team_id, key_id=key_id))


@router.post("/{key_id}/rotate", response_model=KeyCreated, openapi_extra=ADMIN_ONLY)
def rotate_key(key_id: str, session: SessionDep, principal: AdminDep, body: KeyRotate | None = None) -> KeyCreated:
    """A new key with the same name and role; the old one stops working after grace_seconds (default 0:
    at once). 409 for a key already revoked or rotated."""
    grace = body.grace_seconds if body else 0
    row, key = teams.rotate_key(session, team_id=principal.team_id, key_id=key_id, grace_seconds=grace)
    return teams.to_created(row, key)
