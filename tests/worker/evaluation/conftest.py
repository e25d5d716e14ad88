"""Fixtures for the evaluation tests: real sandboxes, strong where bubblewrap works here (the
tests that need one skip without it, saying why)."""

from __future__ import annotations

import pytest

from tests.worker.evaluation.support import ATTACK_TIMEOUT_S
from worker.evaluation.errors import SandboxUnavailable
from worker.evaluation.sandbox import Sandbox, SandboxLimits


def _strong(limits: SandboxLimits) -> Sandbox:
    try:
        return Sandbox(limits, mode="strong")
    except SandboxUnavailable as exc:
        pytest.skip(f"no bubblewrap sandbox on this machine (needs bwrap and user namespaces): {exc.message}")


@pytest.fixture(scope="session")
def strong_sandbox() -> Sandbox:
    return _strong(SandboxLimits(timeout_s=3.0))


@pytest.fixture(scope="session")
def attack_sandbox() -> Sandbox:
    """Tight limits, so bombs hit them fast."""
    return _strong(SandboxLimits(timeout_s=ATTACK_TIMEOUT_S, memory_bytes=256 << 20, max_processes=16,
                                 max_output_bytes=256 << 10, tmpfs_bytes=16 << 20, max_file_bytes=8 << 20))
