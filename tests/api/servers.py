"""A private API process with this session's environment plus overrides: for tests that need other
limits, or a database or broker that is down, without touching the shared server or services; and
the embedded default (SQLite, filesystem broker) for such a process to serve."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import _clear_caches, _stop, start_api


@contextmanager
def private_api(services_env: dict[str, str], **overrides: str) -> Iterator[str]:
    """Yields the base URL of a uvicorn process started with `overrides` (TUNEFORGE_... variables)."""
    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / f"api-{secrets.token_hex(3)}.log"
    proc, base = start_api({**services_env, **overrides}, log)
    try:
        yield base
    finally:
        _stop(proc)


@contextmanager
def embedded_instance(tmp_path: Path, tiny_model: Path) -> Iterator[dict[str, str]]:
    """The embedded default in a data dir of its own: SQLite, migrated, with tiny-llama registered,
    and the filesystem broker (no worker consumes it, so jobs stay queued). Yields the overrides that
    make private_api serve it; until the block ends the test process uses it too, so make_team
    creates teams in it."""
    from app.core.db import session_scope
    from app.core.migrate import upgrade
    from app.domains.base_models import service as base_models

    env = {"TUNEFORGE_DATA_DIR": str(tmp_path), "TUNEFORGE_DATABASE_URL": f"sqlite:///{tmp_path / 'tuneforge.db'}",
           "TUNEFORGE_BROKER_URL": ""}
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    _clear_caches()
    try:
        upgrade()
        with session_scope() as session:
            base_models.register(session, name="tiny-llama", path=tiny_model)
        yield env
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _clear_caches()
