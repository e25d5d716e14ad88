"""Teams and API keys.

A key looks like ``tf_<prefix>_<secret>``. It is shown once at creation; the
database keeps only the prefix (to find the row) and a sha256 of the whole key,
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.ids import new_id
from app.domains.teams.errors import InvalidApiKey, InvalidTeamName, TeamExists
from app.domains.teams.models import ApiKey, Team

_TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_KEY = re.compile(r"^tf_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_DUMMY_HASH = hashlib.sha256(b"timing-equaliser").hexdigest()


@dataclass(frozen=True)
class Principal:
    team_id: str
    team_name: str
    key_id: str


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(session: Session, *, name: str) -> tuple[Team, str]:
    """Create a team and its first key. Returns (team, plaintext key). Raises TeamExists, InvalidTeamName."""
    if not _TEAM_NAME.match(name):
        raise InvalidTeamName(
            f"Team name {name!r} is invalid: use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit.",
            param="name")
    if session.scalar(select(Team.id).where(Team.name == name)):
        raise TeamExists(f"A team named {name!r} already exists.", param="name")
    team = Team(id=new_id("team"), name=name)
    session.add(team)
    session.flush()
    _, key = create_key(session, team_id=team.id)
    return team, key


def create_key(session: Session, *, team_id: str, name: str = "default") -> tuple[ApiKey, str]:
    """Mint a key for a team. Returns (row, plaintext); the plaintext is not stored."""
    prefix = secrets.token_hex(8)
    key = f"tf_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=new_id("key"), team_id=team_id, name=name, prefix=prefix, key_hash=_hash(key))
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, key: str | None) -> Principal:
    """Resolve a bearer key to its team. Raises InvalidApiKey for a missing, malformed, unknown or revoked key."""
    if not key:
        raise InvalidApiKey("Missing API key. Send 'Authorization: Bearer <key>'.")
    match = _KEY.match(key)
    row = None
    if match:
        row = session.execute(
            select(ApiKey, Team.name).join(Team, Team.id == ApiKey.team_id).where(ApiKey.prefix == match.group(1))
        ).first()
    # Compare even when no row was found, so timing does not reveal valid prefixes.
    ok = hmac.compare_digest(row[0].key_hash if row else _DUMMY_HASH, _hash(key))
    if not (row and ok) or row[0].revoked_at is not None:
        raise InvalidApiKey("Invalid API key.")
    api_key, team_name = row
    return Principal(team_id=api_key.team_id, team_name=team_name, key_id=api_key.id)


def get_team_by_name(session: Session, name: str) -> Team | None:
    return session.scalar(select(Team).where(Team.name == name))
