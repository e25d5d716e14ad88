"""The sandbox's self-check: a probe program tries what evaluated code must never manage, and
the worker judges the outcome, checking on the host side too where a probe could lie.

Required in every mode: no write into a host dir made for the check, into /etc, / or /dev; the
process and memory caps refuse; the worker's environment (secrets) cannot be read; the program
is not root and has no_new_privs. Required in strong mode only: 127.0.0.1:6379 and :5432
(Redis, Postgres) unreachable, the worker's files (its prefix, cwd, caller-given paths)
invisible. Weak mode reports those two without requiring them: that is what weak means.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from worker.evaluation.errors import SandboxBreach
from worker.evaluation.identities import SandboxIdentity
from worker.evaluation.runs import Mode, SandboxLimits, SandboxResult

PROBE_PORTS = (6379, 5432)
# The probe's own timeout: it waits on two connects and forks up to the process cap.
PROBE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ProbeOutcome:
    held: bool
    required: bool
    detail: str


@dataclass(frozen=True)
class SelfCheckReport:
    """Probe name -> outcome. ok: every required protection held."""

    mode: Mode
    identity: SandboxIdentity
    probes: dict[str, ProbeOutcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(p.held for p in self.probes.values() if p.required)

    def failures(self) -> list[str]:
        return [f"{name}: {p.detail}" for name, p in self.probes.items() if p.required and not p.held]


class SandboxUnderCheck(Protocol):
    """What the check needs of a sandbox (worker.evaluation.sandbox.Sandbox is one): it runs the
    probe like any other program and judges the result against the sandbox's own promises."""

    mode: Mode
    limits: SandboxLimits

    @property
    def identities(self) -> list[SandboxIdentity]: ...

    def visible_paths(self) -> list[str]: ...

    def run(self, program: str, *, timeout_s: float | None = None) -> SandboxResult: ...


# %-formatted with the probe's configuration (as JSON); %% is a literal %.
_PROBE = r'''
import json, os, socket
cfg = json.loads(%(cfg)r)

def connect(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(("127.0.0.1", port))
        return "connected"
    except OSError as e:
        return "blocked: %%s" %% e
    finally:
        s.close()

def write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "written"
    except OSError as e:
        return "blocked: %%s" %% e

def read(path):
    try:
        with open(path, "rb") as f:
            return "read %%d bytes" %% len(f.read())
    except OSError as e:
        return "blocked: %%s" %% e

def fork_until_refused(limit):
    # Children wait on a pipe, so they all exist at once, then exit when it closes.
    r, w = os.pipe()
    kids, error = [], ""
    for _ in range(limit):
        try:
            pid = os.fork()
        except OSError as e:
            error = str(e)
            break
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        kids.append(pid)
    os.close(w)
    for pid in kids:
        os.waitpid(pid, 0)
    return len(kids), error

def allocate(n):
    try:
        bytearray(n)
        return "allocated"
    except MemoryError:
        return "blocked: MemoryError"

status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({
    "network": {str(p): connect(p) for p in cfg["ports"]},
    "host_dir_write": write(cfg["host_dir"] + "/probe"),
    "etc_write": write("/etc/tuneforge-probe"),
    "root_write": write("/tuneforge-probe"),
    "dev_write": write("/dev/tuneforge-probe"),
    "forks": fork_until_refused(cfg["max_processes"] + 8),
    "memory": allocate(cfg["memory_bytes"]),
    "worker_environ": read("/proc/%%d/environ" %% cfg["worker_pid"]),
    "visible": {p: os.path.exists(p) for p in cfg["hidden"]},
    "uid": os.getuid(),
    "no_new_privs": status["NoNewPrivs"].strip(),
}))
'''


def run_self_check(sandbox: SandboxUnderCheck, hidden_paths: Sequence[str] = ()) -> SelfCheckReport:
    """Run the probe in `sandbox` and judge it. Raises SandboxBreach listing every required
    protection that failed (or when the probe itself did not complete). Side effect: a temporary
    host dir, removed before returning."""
    host_dir = tempfile.mkdtemp(prefix="tuneforge-selfcheck-")
    try:
        os.chmod(host_dir, 0o755)  # any uid can reach it; only the worker's may write
        hidden = _checkable(sandbox, [sys.prefix, os.getcwd(), *hidden_paths])
        cfg = {
            "ports": list(PROBE_PORTS), "host_dir": host_dir, "hidden": hidden,
            "max_processes": sandbox.limits.max_processes, "memory_bytes": sandbox.limits.memory_bytes,
            "worker_pid": os.getpid(),
        }
        timeout = max(sandbox.limits.timeout_s, PROBE_TIMEOUT_S)
        result = sandbox.run(_PROBE % {"cfg": json.dumps(cfg)}, timeout_s=timeout)
        if result.status != "passed":
            raise SandboxBreach(
                f"the sandbox self-check probe did not complete ({result.status}: {result.detail}); "
                f"stderr: {result.stderr[-1000:]}"
            )
        probes = _judge(sandbox, json.loads(result.stdout), host_dir)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
    report = SelfCheckReport(sandbox.mode, sandbox.identities[0], probes)
    if not report.ok:
        raise SandboxBreach(f"sandbox self-check failed in {report.mode} mode: " + "; ".join(report.failures()))
    return report


def _checkable(sandbox: SandboxUnderCheck, paths: Sequence[str]) -> list[str]:
    """The paths whose invisibility means something: not /, not the paths the sandbox shows on
    purpose (/usr, the interpreter, ...), nor their ancestors (bwrap creates those as dirs)."""
    shown = sandbox.visible_paths()
    out = set()
    for path in map(os.path.realpath, paths):
        inside = any(path == s or path.startswith(s.rstrip("/") + "/") or s.startswith(path.rstrip("/") + "/")
                     for s in shown)
        if path != "/" and not inside:
            out.add(path)
    return sorted(out)


def _blocked(text: str) -> bool:
    return text.startswith("blocked")


def _judge(sandbox: SandboxUnderCheck, probe: dict, host_dir: str) -> dict[str, ProbeOutcome]:
    strong = sandbox.mode == "strong"
    limit = sandbox.limits.max_processes
    forks, fork_error = probe["forks"]
    host_written = bool(os.listdir(host_dir))
    visible = [p for p, seen in probe["visible"].items() if seen]
    outcomes = {
        f"network_{port}": ProbeOutcome(_blocked(result), strong, result)
        for port, result in probe["network"].items()
    }
    outcomes.update({
        "host_dir_write": ProbeOutcome(
            _blocked(probe["host_dir_write"]) and not host_written, True,
            f"{probe['host_dir_write']}; host dir {'changed' if host_written else 'unchanged'}"),
        "etc_write": ProbeOutcome(_blocked(probe["etc_write"]) and not os.path.exists("/etc/tuneforge-probe"),
                                  True, probe["etc_write"]),
        "root_write": ProbeOutcome(_blocked(probe["root_write"]), True, probe["root_write"]),
        "dev_write": ProbeOutcome(_blocked(probe["dev_write"]), True, probe["dev_write"]),
        "process_cap": ProbeOutcome(forks < limit and bool(fork_error), True,
                                    f"{forks} forks before refusal ({fork_error or 'never refused'}); cap {limit}"),
        "memory_cap": ProbeOutcome(_blocked(probe["memory"]), True, probe["memory"]),
        "worker_environ": ProbeOutcome(_blocked(probe["worker_environ"]), True, probe["worker_environ"]),
        "worker_files_hidden": ProbeOutcome(not visible, strong, f"visible: {visible}" if visible else "none visible"),
        "unprivileged": ProbeOutcome(probe["uid"] != 0, True, f"uid inside: {probe['uid']}"),
        "no_new_privs": ProbeOutcome(probe["no_new_privs"] == "1", True, f"NoNewPrivs={probe['no_new_privs']}"),
    })
    return outcomes
