"""Teams and API keys.

A key looks like ``tf_<prefix>_<secret>``. It is shown once at creation; the
database keeps only the prefix (to find the row) and a sha256 of the whole key,
compared in constant time. Keys are admin (manage keys, read the audit log) or
member (everything else); a team's first key is admin. A revoked key is refused
from the next request on: every request reads the key's row, nothing is cached.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import get_owned, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.teams.errors import InvalidApiKey, InvalidTeamName, KeyNotFound, KeyRevoked, LastAdminKey, TeamExists
from app.domains.teams.models import ApiKey, Team
from app.domains.teams.schemas import KeyCreated, KeyList, KeyRead

_TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_KEY = re.compile(r"^tf_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_DUMMY_HASH = hashlib.sha256(b"timing-equaliser").hexdigest()
ROLES = ("admin", "member")


@dataclass(frozen=True)
class Principal:
    team_id: str
    team_name: str
    key_id: str
    role: str = "member"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(session: Session, *, name: str) -> tuple[Team, str]:
    """Create a team and its first key, an admin key. Returns (team, plaintext key).
    Raises TeamExists, InvalidTeamName."""
    if not _TEAM_NAME.match(name):
        raise InvalidTeamName(
            f"Team name {name!r} is invalid: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit.",
            param="name")
    if session.scalar(select(Team.id).where(Team.name == name)):
        raise TeamExists(f"A team named {name!r} already exists.", param="name")
    team = Team(id=new_id("team"), name=name)
    session.add(team)
    session.flush()
    _, key = create_key(session, team_id=team.id, role="admin")
    return team, key


def create_key(session: Session, *, team_id: str, name: str = "default", role: str = "member") -> tuple[ApiKey, str]:
    """Mint a key for a team. Returns (row, plaintext); the plaintext is not stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    prefix = secrets.token_hex(8)
    key = f"tf_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=new_id("key"), team_id=team_id, name=name, role=role, prefix=prefix, key_hash=_hash(key))
    session.add(row)
    session.flush()
    return row, key


def _active(row: ApiKey, now: dt.datetime) -> bool:
    return row.revoked_at is None or row.revoked_at > now


def authenticate(session: Session, key: str | None) -> Principal:
    """Resolve a bearer key to its team. Raises InvalidApiKey for a missing, malformed, unknown or revoked key
    (a rotated key with a grace period works until its revoked_at)."""
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
    if not (row and ok) or not _active(row[0], utcnow()):
        raise InvalidApiKey("Invalid API key.")
    api_key, team_name = row
    return Principal(team_id=api_key.team_id, team_name=team_name, key_id=api_key.id, role=api_key.role)


def get_team_by_name(session: Session, name: str) -> Team | None:
    return session.scalar(select(Team).where(Team.name == name))


def lock_team(session: Session, team_id: str) -> None:
    """Serialise check-then-write sequences of one team (quotas, last-admin checks) until the
    transaction ends: a row lock on Postgres (NO KEY UPDATE, so inserts of rows referencing the team
    are not blocked by it). SQLite has no row locks and ignores FOR UPDATE, and its driver begins a
    transaction only at the first write, so the counts that follow would be read before any lock:
    a no-op UPDATE of the team takes the database's write lock first (waiting out busy_timeout),
    and the reads after it see every committed write."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Team).where(Team.id == team_id).values(name=Team.name)
                        .execution_options(synchronize_session=False))
        return
    session.execute(select(Team.id).where(Team.id == team_id).with_for_update(key_share=True))


# -- key management (admin keys only; the API layer checks the role) -----------------------------

def get_key(session: Session, *, team_id: str, key_id: str) -> ApiKey:
    """The team's key. Raises KeyNotFound for a missing id and for another team's, alike."""
    row = get_owned(session, ApiKey, key_id, team_id)
    if row is None:
        raise KeyNotFound(f"No such API key: {key_id!r}.", param="key_id")
    return row


def list_keys(session: Session, *, team_id: str, after: str | None, limit: int) -> KeyList:
    """Newest first, revoked keys included (with revoked_at)."""
    rows, has_more = paginate(session, select(ApiKey).where(ApiKey.team_id == team_id), ApiKey.id,
                              after=after, limit=limit)
    data = [to_read(r) for r in rows]
    return KeyList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                   last_id=data[-1].id if data else None)


def _refuse_last_admin(session: Session, row: ApiKey) -> None:
    """Only an admin key with no end (revoked_at unset) keeps the team manageable: a key rotated with
    grace stops working at its revoked_at, so it neither counts as another admin nor needs guarding."""
    if row.role != "admin" or row.revoked_at is not None:
        return
    others = session.scalar(select(ApiKey.id).where(
        ApiKey.team_id == row.team_id, ApiKey.role == "admin", ApiKey.id != row.id,
        ApiKey.revoked_at.is_(None)).limit(1))
    if others is None:
        raise LastAdminKey(f"Key {row.id} is the team's last admin key; revoking it would leave nobody able to "
                           "manage keys. Create another admin key first, or rotate this one.", param="key_id")


def revoke_key(session: Session, *, team_id: str, key_id: str) -> ApiKey:
    """Revoke a key now; it answers 401 from the next request on. Idempotent (a key in a rotation grace
    period is revoked at once). Raises KeyNotFound, LastAdminKey."""
    lock_team(session, team_id)
    row = get_key(session, team_id=team_id, key_id=key_id)
    now = utcnow()
    if _active(row, now):
        _refuse_last_admin(session, row)
        row.revoked_at = now
        session.flush()
    return row


def rotate_key(session: Session, *, team_id: str, key_id: str, grace_seconds: int = 0) -> tuple[ApiKey, str]:
    """Replace a key with a new one of the same name and role; the old key stops working after
    `grace_seconds` (at once for 0). Returns (new row, plaintext). Raises KeyNotFound, and KeyRevoked
    for a key that is revoked or already rotated."""
    lock_team(session, team_id)
    row = get_key(session, team_id=team_id, key_id=key_id)
    if row.revoked_at is not None:
        raise KeyRevoked(f"Key {key_id} is already revoked or rotated; rotate or create an active key instead.",
                         param="key_id")
    new_row, key = create_key(session, team_id=team_id, name=row.name, role=row.role)
    row.revoked_at = utcnow() + dt.timedelta(seconds=grace_seconds)
    session.flush()
    return new_row, key


def to_read(row: ApiKey) -> KeyRead:
    return KeyRead(id=row.id, name=row.name, role=row.role, redacted_value=f"tf_{row.prefix}_…",
                   created_at=unix(row.created_at), revoked_at=unix(row.revoked_at))


def to_created(row: ApiKey, key: str) -> KeyCreated:
    return KeyCreated(**to_read(row).model_dump(), key=key)
