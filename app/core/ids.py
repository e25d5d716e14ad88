"""Prefixed, time-sortable ids (file-…, ftjob-…, ftevent-…).

The body is 16 hex digits of nanoseconds since the epoch, strictly increasing
within a process, plus 8 random hex digits, so ordering by id is ordering by
creation and cursor pagination needs no extra column.
"""

from __future__ import annotations

import secrets
import threading
import time

_lock = threading.Lock()
_last_ns = 0


def new_id(prefix: str) -> str:
    global _last_ns
    with _lock:
        now = time.time_ns()
        _last_ns = now if now > _last_ns else _last_ns + 1
        stamp = _last_ns
    return f"{prefix}-{stamp:016x}{secrets.token_hex(4)}"
