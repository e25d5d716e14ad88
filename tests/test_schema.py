"""`alembic upgrade head` on an empty database yields exactly the models' schema."""

from __future__ import annotations

import secrets

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.core.migrate import downgrade, upgrade
from app.domains.registry import metadata
from tests.conftest import create_database, drop_database


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True,
                                                                             "compare_server_default": True}),
                                    metadata)
    finally:
        engine.dispose()


def test_upgrade_head_on_empty_database_matches_models(services_env):
    name = f"tuneforge_schema_{secrets.token_hex(4)}"
    url = create_database(name)
    try:
        upgrade(url)
        assert _diff(url) == []
        engine = create_engine(url)
        tables = set(inspect(engine).get_table_names())
        engine.dispose()
        assert set(metadata.tables) <= tables
    finally:
        drop_database(name)


def test_every_revision_downgrades_to_empty_and_upgrades_again(services_env):
    name = f"tuneforge_schema_{secrets.token_hex(4)}"
    url = create_database(name)
    try:
        upgrade(url)
        downgrade(url, "base")
        engine = create_engine(url)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        engine.dispose()
        upgrade(url)
        assert _diff(url) == []
    finally:
        drop_database(name)


def test_migrations_also_build_the_embedded_sqlite_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    assert _diff(url) == []
