"""Runs Alembic migrations programmatically (used by the CLI and the tests)."""

from __future__ import annotations

import fcntl
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url, pool

from app.core.config import get_settings

ROOT = Path(__file__).resolve().parents[2]


class SchemaNotCurrent(Exception):
    """The database is not at the schema of this code and is not one to migrate on the side."""


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    if url:
        cfg.attributes["url"] = url
    return cfg


def upgrade(url: str | None = None, revision: str = "heads") -> None:
    """alembic upgrade. A SQLite database is upgraded under a file lock beside it, so processes
    started together on the embedded default do not migrate it at once (its DDL is not transactional)."""
    effective = url or get_settings().effective_database_url
    if not effective.startswith("sqlite:///"):
        command.upgrade(alembic_config(url), revision)
        return
    # SQLite creates the file but not its folder: the embedded default starts from nothing.
    db_path = Path(effective.removeprefix("sqlite:///"))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with open(db_path.with_name(db_path.name + ".migrate-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def ensure_current(url: str | None = None) -> None:
    """Make sure the database is at the latest schema before a command uses it.

    A SQLite database (the embedded default) is upgraded in place: it belongs to this machine and
    every command may bring it up to date. Any other database is only checked: migrating a shared
    database is a deployment step (`tuneforge migrate`, docker-compose's migrate service).
    Raises SchemaNotCurrent, its message saying what to run, when that database is behind or ahead
    of this code, and sqlalchemy's OperationalError when it cannot be reached.
    """
    url = url or get_settings().effective_database_url
    if url.startswith("sqlite:///"):
        upgrade(url)
        return
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    if current == heads:
        return
    where = location(url)
    known = {rev.revision for rev in script.walk_revisions()}
    if current - known:
        raise SchemaNotCurrent(
            f"The database at {where} is at revision {', '.join(sorted(current - known))}, which this version "
            "of Tuneforge does not know: it was migrated by a newer version. Run that version, or upgrade this one.")
    at = f"revision {', '.join(sorted(current))}" if current else "no revision (an empty database)"
    raise SchemaNotCurrent(
        f"The database at {where} is at {at}, not the latest ({', '.join(sorted(heads))}). "
        "Run `tuneforge migrate` (alembic upgrade head) first.")


def location(url: str | None = None) -> str:
    """The database URL as messages may show it: without its password."""
    return make_url(url or get_settings().effective_database_url).render_as_string(hide_password=True)
