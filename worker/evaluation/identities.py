"""The host uids sandboxes run as, and the sweep that kills whatever a sandbox uid left running.

As root, each parallel slot gets its own dedicated system user (tuneforge-sbx0, tuneforge-sbx1,
...; created idempotently with useradd), held through a lock file while a program runs, so no
two sandboxes (in this process or another worker process) share a uid at the same time. That is
what makes it safe to kill every process of the uid after a weak-mode run, and to count a uid's
processes as one run's. Where users cannot be created, every slot is nobody (65534), not
dedicated. When the worker is not root, it cannot switch uids: the sandbox runs as its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import queue
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from worker.evaluation.errors import SandboxUnavailable

NOBODY_UID = 65534
USER_PREFIX = "tuneforge-sbx"
# Root-owned and world-traversable: per-uid lock files and the staged interpreter's mount point.
RUN_DIR = Path("/run/tuneforge-sandbox")
# The only environment the host-side tools (setpriv, bwrap, useradd) run with.
TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class SandboxIdentity:
    """The host uid/gid a sandbox runs as. dedicated: nothing but one sandbox at a time uses it,
    so its leftovers may be swept by uid."""

    uid: int
    gid: int
    name: str
    dedicated: bool


def is_root() -> bool:
    return os.geteuid() == 0


@cache
def tool(name: str) -> str:
    """Absolute path of a host tool. Raises SandboxUnavailable when it is not installed."""
    path = shutil.which(name, path=TOOL_ENV["PATH"])
    if path is None:
        raise SandboxUnavailable(f"the sandbox needs `{name}` (util-linux/bubblewrap); install it")
    return path


def run_dir() -> Path:
    """RUN_DIR, created root-owned 0755 if missing (root only)."""
    RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    return RUN_DIR


def _lock_dir() -> Path:
    # Root-only: a sandbox (weak mode sees the host) must not take another uid's lock.
    locks = run_dir() / "locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    return locks


def _lookup(name: str) -> SandboxIdentity | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return SandboxIdentity(pw.pw_uid, pw.pw_gid, name, dedicated=True)


def ensure_sandbox_users(count: int, prefix: str = USER_PREFIX) -> list[SandboxIdentity]:
    """Return `count` dedicated identities {prefix}0..{prefix}{count-1}, creating the missing
    system users (no home, no login shell, own group) with useradd.

    Needs root. Idempotent, and safe against a concurrent creator: it re-reads the user
    database after useradd, whatever useradd said. Raises SandboxUnavailable when a user can
    neither be found nor created, or has uid/gid 0. Side effect: edits /etc/passwd and /etc/group.
    """
    identities = []
    for i in range(count):
        name = f"{prefix}{i}"
        ident = _lookup(name)
        if ident is None and shutil.which("useradd", path=TOOL_ENV["PATH"]):
            subprocess.run(
                [tool("useradd"), "--system", "--user-group", "--no-create-home", "--home-dir",
                 "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment", "Tuneforge evaluation sandbox", name],
                env=TOOL_ENV, capture_output=True, check=False,
            )
            ident = _lookup(name)
        if ident is None:
            raise SandboxUnavailable(
                f"cannot create the sandbox user {name!r}; create it as root with: "
                f"useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {name}"
            )
        if ident.uid == 0 or ident.gid == 0:
            raise SandboxUnavailable(f"sandbox user {name!r} has uid or gid 0; it must be unprivileged")
        identities.append(ident)
    return identities


def default_identities(slots: int) -> list[SandboxIdentity]:
    """One identity per slot: dedicated users as root (nobody if they cannot be created), the
    worker's own uid otherwise."""
    if not is_root():
        uid = os.getuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return [SandboxIdentity(uid, os.getgid(), name, dedicated=False)] * slots
    try:
        return ensure_sandbox_users(slots)
    except SandboxUnavailable:
        return [SandboxIdentity(NOBODY_UID, NOBODY_UID, "nobody", dedicated=False)] * slots


class SlotPool:
    """Hands out identities, one per concurrent run. As root, also holds an flock on a per-uid
    lock file while the run lasts, so another worker process never runs the same dedicated uid
    at the same time (its sweep would kill our sandbox)."""

    def __init__(self, identities: Sequence[SandboxIdentity]) -> None:
        if not identities:
            raise ValueError("a slot pool needs at least one identity")
        self._free: queue.SimpleQueue[SandboxIdentity] = queue.SimpleQueue()
        for ident in identities:
            self._free.put(ident)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[SandboxIdentity]:
        """Block until an identity is free; yield it; give it back."""
        ident = self._free.get()
        lock = None
        try:
            if ident.dedicated and is_root():
                lock = open(_lock_dir() / f"uid-{ident.uid}.lock", "a+b")  # noqa: SIM115 - held across the yield
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield ident
        finally:
            if lock is not None:
                lock.close()  # releases the flock
            self._free.put(ident)


def processes_of(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose real, effective or saved uid is `uid`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        uids = {int(u) for u in fields.get(b"Uid", b"").split()[:3]}
        if uid in uids and not fields.get(b"State", b"").strip().startswith(b"Z"):
            pids.append(int(entry.name))
    return pids


def sweep(ident: SandboxIdentity) -> int | None:
    """Kill every process of a dedicated identity; returns how many were still alive after.

    kill(-1, SIGKILL) sent *as* that uid reaches all of its processes in one kernel pass, so a
    fork bomb cannot outrun it. Does nothing and returns None unless the identity is dedicated
    and we are root: for a shared uid it would kill processes that are not ours.
    """
    if not (ident.dedicated and is_root()):
        return None
    found = processes_of(ident.uid)
    for _ in range(5):
        if not found:
            break
        subprocess.run(
            # The shell's builtin kill: procps' kill binary is absent from slim images.
            [tool("setpriv"), f"--reuid={ident.uid}", f"--regid={ident.gid}", "--clear-groups",
             "--", "/bin/sh", "-c", "kill -KILL -1"],
            env=TOOL_ENV, capture_output=True, check=False,
        )
        found = processes_of(ident.uid)
    return len(found)
