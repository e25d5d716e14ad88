"""Host-side views the evaluation tests check the sandbox against (not our code's own)."""

from __future__ import annotations

import os

# The attack probes' timeout: every probe must end within it + 2 s.
ATTACK_TIMEOUT_S = 2.0


def host_processes_of(uids: set[int]) -> list[tuple[int, int, str]]:
    """(pid, uid, state) of every process, zombies included, whose real/effective/saved uid is
    one of `uids`, read straight from /proc."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        ids = {int(u) for u in fields["Uid"].split()[:3]}
        if ids & uids:
            found.append((int(name), min(ids & uids), fields["State"].strip()))
    return found
