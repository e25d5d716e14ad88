"""A private API process with this session's environment plus overrides: for tests that need other
limits, or a database or broker that is down, without touching the shared server or services."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import _stop, start_api


@contextmanager
def private_api(services_env: dict[str, str], **overrides: str) -> Iterator[str]:
    """Yields the base URL of a uvicorn process started with `overrides` (TUNEFORGE_... variables)."""
    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / f"api-{secrets.token_hex(3)}.log"
    proc, base = start_api({**services_env, **overrides}, log)
    try:
        yield base
    finally:
        _stop(proc)
