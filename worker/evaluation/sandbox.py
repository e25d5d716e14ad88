"""Runs one untrusted Python program, isolated from the worker, and reports what happened.

Two strengths; every result says which one ran it:

strong  bubblewrap, launched as an unprivileged uid (never root: as root the sandbox uid maps
        to host root and RLIMIT_NPROC is ignored), with new user, pid, net, ipc, uts and cgroup
        namespaces. The program sees read-only /usr and the base interpreter, a fresh /proc and
        /dev, a size-capped tmpfs /tmp and a size-capped tmpfs scratch dir /sandbox (its cwd and
        the only writable place), only its own loopback, an empty environment, no capabilities.
weak    no namespaces: the same resource limits, a new session, a clean environment, a scratch
        dir on the host as cwd, no_new_privs, and a dedicated unprivileged uid when the worker
        is root. The network and every world-readable host file stay reachable, so it only runs
        when the caller passes allow_weak_sandbox=True.

Resource limits (address space, CPU seconds, processes, file size, open files, core=0) are set
by a short bootstrap inside the sandbox, before the program's first line. Setting RLIMIT_NPROC
there, after bubblewrap made its user namespace, makes the cap count this sandbox's processes
only (the kernel counts per user namespace and uid); set before bubblewrap, one cap would be
shared by every sandbox of the uid, and a fork bomb in one would make its neighbours fail.
The parent enforces a wall-clock timeout and an output cap and kills with SIGKILL only: a
program that ignores SIGTERM cannot hang anything.

Which uid runs a sandbox: see worker.evaluation.identities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from worker.evaluation.errors import SandboxUnavailable
from worker.evaluation.identities import (
    TOOL_ENV,
    SandboxIdentity,
    SlotPool,
    default_identities,
    is_root,
    run_dir,
    sweep,
    tool,
)
from worker.evaluation.runs import Mode, SandboxLimits, SandboxResult, Status
from worker.evaluation.selfcheck import SelfCheckReport, run_self_check

# Where the program and its scratch dir appear inside a strong sandbox.
SANDBOX_DIR = "/sandbox"
PROGRAM_NAME = "main.py"
_SANDBOX_PATH = "/usr/bin:/bin"
_PY_FLAGS = ["-I", "-S", "-B"]  # isolated, no site (so no site-packages), no .pyc writes


# --------------------------------------------------------------------------- interpreter


@dataclass(frozen=True)
class _Interpreter:
    """The base interpreter (not the venv: the sandbox must not see the worker's packages).

    prefix: sys.base_prefix, bound read-only into the sandbox at the same path.
    executable: the real binary under prefix.
    stage: where a root worker bind-mounts prefix, inside a private mount namespace, when the
    sandbox uid cannot reach prefix itself (say, under root's 0700 home); None when reachable.
    """

    prefix: str
    executable: str
    stage: str | None


def _base_interpreter() -> tuple[str, str]:
    prefix = os.path.realpath(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [getattr(sys, "_base_executable", ""), os.path.join(prefix, "bin", version),
                  os.path.join(prefix, "bin", "python3")]
    for candidate in filter(None, candidates):
        real = os.path.realpath(candidate)
        if real.startswith(prefix + os.sep) and os.access(real, os.X_OK):
            return prefix, real
    raise SandboxUnavailable(
        f"cannot find the base Python interpreter under {prefix}; the sandbox runs programs with it"
    )


def _reachable_by(path: str, ident: SandboxIdentity, need: int) -> bool:
    """Whether ident can traverse every parent of path and has `need` (R_OK|X_OK mask) on it.
    Mode bits only; ACLs are ignored (a wrong answer is caught by the trial run)."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        try:
            st = os.stat(os.path.join(*parts[:i]))
        except OSError:
            return False
        mask = need if i == len(parts) else os.X_OK
        shift = 6 if st.st_uid == ident.uid else 3 if st.st_gid == ident.gid else 0
        if (st.st_mode >> shift) & mask != mask:
            return False
    return True


@functools.cache
def _interpreter_for(ident: SandboxIdentity) -> _Interpreter:
    prefix, executable = _base_interpreter()
    if _reachable_by(executable, ident, os.R_OK | os.X_OK):
        return _Interpreter(prefix, executable, None)
    if not is_root():
        raise SandboxUnavailable(
            f"the interpreter {executable} is not readable by uid {ident.uid}; install Python where "
            "the worker's user can read it"
        )
    stage = run_dir() / "python"
    stage.mkdir(mode=0o755, exist_ok=True)
    return _Interpreter(prefix, executable, str(stage))


# --------------------------------------------------------------------------- command lines


def _stage_prefix(interp: _Interpreter) -> list[str]:
    """Commands that bind the interpreter onto its stage in a private mount namespace (the
    host's mount table never changes) and then exec the rest of the command line."""
    if interp.stage is None:
        return []
    return [
        tool("unshare"), "--mount", "--propagation", "private", "--",
        "/bin/sh", "-c", f'{tool("mount")} --bind -o ro "$1" "$2" && shift 2 && exec "$@"',
        "tuneforge-stage", interp.prefix, interp.stage,
    ]


def _drop_privileges(ident: SandboxIdentity) -> list[str]:
    # setpriv rather than Popen(user=...): the uid must drop after the staging mount.
    # --no-new-privs: setuid binaries (su, mount, passwd) gain nothing. --pdeathsig: if the
    # worker dies, the sandbox dies with it instead of outliving its timeout.
    args = [tool("setpriv")]
    if is_root():
        args += [f"--reuid={ident.uid}", f"--regid={ident.gid}", "--clear-groups", "--inh-caps=-all"]
    return args + ["--no-new-privs", "--pdeathsig=KILL", "--"]


# Runs first inside the sandbox, before any line of the program: applies the limits (never above
# a hard limit the worker already has, which cannot be raised), says
# "started" on the marker fd (so a setup failure is never mistaken for a failing program),
# closes every inherited fd, then runs the program as __main__ (a real script: tracebacks show
# its lines). -S drops site's exit()/quit(); programs may call them.
_BOOTSTRAP = """\
import os, sys, resource, builtins
for _n, _s, _h in %(limits)r:
    _r = getattr(resource, _n)
    _cap = resource.getrlimit(_r)[1]
    if _cap != resource.RLIM_INFINITY:
        _s, _h = min(_s, _cap), min(_h, _cap)
    resource.setrlimit(_r, (_s, _h))
os.write(%(marker)d, b"1")
os.closerange(3, 1 << 16)
builtins.exit = builtins.quit = sys.exit
def _tf_run(path=sys.argv[1], argv=sys.argv):
    import __main__
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    g = __main__.__dict__
    keep = ("__builtins__", "__name__", "__doc__", "__spec__", "__loader__", "__package__")
    for k in [k for k in g if k not in keep]:
        del g[k]
    g["__file__"] = path
    argv[:] = [path]
    exec(code, g)
_tf_run()
"""


def _bootstrap(limits: SandboxLimits, marker_fd: int) -> str:
    return _BOOTSTRAP % {"limits": limits.rlimits(), "marker": marker_fd}


def _root_dirs_args() -> list[str]:
    """/bin, /lib, /lib64, /sbin: symlinks into /usr on merged-/usr systems, real dirs elsewhere."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{name}"
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    return args


def _prefix_args(interp: _Interpreter) -> list[str]:
    if interp.prefix == "/usr" or interp.prefix.startswith("/usr/"):
        return []  # already inside the /usr bind
    return ["--ro-bind", interp.stage or interp.prefix, interp.prefix]


@dataclass
class _Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...]
    cleanup_dir: str | None = None


def _strong_launch(ident: SandboxIdentity, interp: _Interpreter, limits: SandboxLimits,
                   program_fd: int, marker_fd: int, info_fd: int) -> _Launch:
    program_path = f"{SANDBOX_DIR}/{PROGRAM_NAME}"
    argv = [
        *_stage_prefix(interp), *_drop_privileges(ident), tool("bwrap"),
        "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns",
        # The program is pid 1 of its namespace: when it exits or is killed, the kernel kills
        # all it started, and bwrap reaps it. (With bwrap's own init as pid 1, bwrap exits
        # without reaping that init, which then waits for the host's init as a zombie of the
        # sandbox uid.)
        "--as-pid-1",
        "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
        "--ro-bind", "/usr", "/usr", *_root_dirs_args(),
        "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
        *_prefix_args(interp),
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp",
        "--size", str(limits.tmpfs_bytes), "--tmpfs", SANDBOX_DIR,
        "--ro-bind-data", str(program_fd), program_path,
        # bwrap builds / and /dev as tmpfs mounts the program could fill without any size cap
        # (new files in /etc, /dev, /): read-only once everything is mounted. Device nodes such
        # as /dev/null stay writable on a read-only mount.
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", SANDBOX_DIR,
        "--setenv", "PATH", _SANDBOX_PATH, "--setenv", "HOME", SANDBOX_DIR,
        "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
        "--info-fd", str(info_fd),
        "--", interp.executable, *_PY_FLAGS, "-c", _bootstrap(limits, marker_fd), program_path,
    ]
    return _Launch(argv, dict(TOOL_ENV), "/", (program_fd, marker_fd, info_fd))


def _weak_launch(ident: SandboxIdentity, interp: _Interpreter, limits: SandboxLimits,
                 program: bytes, marker_fd: int) -> _Launch:
    base = tempfile.mkdtemp(prefix="tuneforge-sbx-")
    try:
        os.chmod(base, 0o711)  # the sandbox uid may traverse it, not list it
        program_path = os.path.join(base, PROGRAM_NAME)
        with open(program_path, "wb") as f:
            f.write(program)
        os.chmod(program_path, 0o644)
        scratch = os.path.join(base, "scratch")
        os.mkdir(scratch, 0o700)
        if is_root():
            os.chown(scratch, ident.uid, ident.gid)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    executable = interp.executable
    env = {"PATH": _SANDBOX_PATH, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    if interp.stage is not None:
        # The binary's RUNPATH points under prefix, which this uid cannot reach: load libpython
        # from the stage; Python then finds its stdlib next to the staged binary.
        executable = interp.stage + interp.executable[len(interp.prefix):]
        env["LD_LIBRARY_PATH"] = os.path.join(interp.stage, "lib")
    argv = [*_stage_prefix(interp), *_drop_privileges(ident),
            executable, *_PY_FLAGS, "-c", _bootstrap(limits, marker_fd), program_path]
    return _Launch(argv, env, scratch, (marker_fd,), cleanup_dir=base)


# --------------------------------------------------------------------------- supervision


@dataclass
class _Collected:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    info: bytearray = field(default_factory=bytearray)
    started: bool = False
    reason: str | None = None  # "timeout" | "output_limit": it must be killed


def _ready(fd: int) -> bool:
    with selectors.DefaultSelector() as one:
        one.register(fd, selectors.EVENT_READ)
        return bool(one.select(0))


def _supervise(proc: subprocess.Popen, fds: dict[str, int], limits: SandboxLimits, deadline: float) -> _Collected:
    """Read stdout/stderr (capped together), the started marker and bwrap's info until the
    process exits, the deadline passes, or the output cap is hit. Kills nothing itself."""
    out = _Collected()
    sel = selectors.DefaultSelector()
    for name, fd in fds.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.reason = "timeout"
                return out
            for key, _ in sel.select(remaining):
                if key.data == "exit":
                    # The process is gone. Whatever still holds its pipes (a weak-mode
                    # leftover) must not keep us waiting: take what is buffered and stop.
                    sel.unregister(pidfd)
                    _drain(sel, out, limits)
                    return out
                if _consume(key, sel, out, limits):
                    out.reason = "output_limit"
                    return out
    finally:
        sel.close()
        os.close(pidfd)


def _consume(key: selectors.SelectorKey, sel: selectors.BaseSelector, out: _Collected, limits: SandboxLimits) -> bool:
    """Read one chunk from a ready fd. Returns True when the output cap was exceeded."""
    try:
        data = os.read(key.fd, 65536)
    except BlockingIOError:
        return False
    if not data:
        sel.unregister(key.fd)
        return False
    if key.data == "marker":
        out.started = True
    elif key.data == "info":
        out.info += data[: 1 << 16]
    else:
        room = limits.max_output_bytes - len(out.stdout) - len(out.stderr)
        getattr(out, key.data).extend(data[:room])
        return len(data) > room
    return False


def _drain(sel: selectors.BaseSelector, out: _Collected, limits: SandboxLimits) -> None:
    """Read what is buffered in every pipe, without waiting. Bounded: a pipe holds 64 KiB; a
    leftover writer still filling it stops at the output cap or after 64 chunks."""
    for key in list(sel.get_map().values()):
        for _ in range(64):
            if key.fd not in sel.get_map() or not _ready(key.fd):
                break
            if _consume(key, sel, out, limits):
                out.reason = "output_limit"
                return


def _child_pid(info: bytes) -> int | None:
    """The program's host pid from bwrap's --info-fd JSON (its first object: nothing after it
    can come from bwrap)."""
    try:
        obj, _ = json.JSONDecoder().raw_decode(info.decode("utf-8", "replace").lstrip())
        return int(obj["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _read_available(fd: int, sink: bytearray) -> None:
    with contextlib.suppress(OSError):
        while _ready(fd):
            data = os.read(fd, 65536)
            if not data:
                return
            sink += data


def _kill(proc: subprocess.Popen, child_pid: int | None) -> None:
    """SIGKILL the sandbox and reap it. In strong mode the program is pid 1 of its namespace:
    killing it makes the kernel kill everything inside, and bwrap (our child) reaps it, so no
    orphan is left to the host's init. Then, or without a child pid, the process group."""
    if child_pid is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child_pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _classify(
    proc: subprocess.Popen, out: _Collected, mode: Mode, limits: SandboxLimits,
) -> tuple[Status, int | None, str]:
    code = proc.returncode
    if out.reason == "timeout":
        return "timeout", None, f"wall-clock timeout after {limits.timeout_s:g} s; killed"
    if out.reason == "output_limit":
        return "failed", None, f"output exceeded {limits.max_output_bytes} bytes; killed"
    if not out.started:
        return "sandbox_error", code, "the sandbox did not start the program (see stderr)"
    if code == 0:
        return "passed", 0, ""
    # bwrap reports a signal-killed program as 128 + signal; Popen as a negative number.
    sig = -code if code < 0 else (code - 128 if mode == "strong" and code > 128 else None)
    if sig == signal.SIGXCPU:
        return "timeout", code, f"killed by SIGXCPU: CPU-time limit of {limits.cpu_seconds} s"
    if sig == signal.SIGKILL:
        # The hard CPU limit (a pid 1 ignores SIGXCPU) or the kernel's OOM killer.
        return "timeout", code, f"killed by SIGKILL: CPU-time limit of {limits.cpu_seconds} s, or out of memory"
    return "failed", code, f"exit code {code}"


class _Fds:
    """Fds of one run, each closed exactly once: closing one twice could close an fd another
    thread has just been given."""

    def __init__(self) -> None:
        self._open: list[int] = []

    def add(self, fd: int) -> int:
        self._open.append(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        return self.add(r), self.add(w)

    def close(self, fd: int) -> None:
        if fd in self._open:
            self._open.remove(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in list(self._open):
            self.close(fd)


def _run_one(mode: Mode, ident: SandboxIdentity, limits: SandboxLimits, program: bytes) -> SandboxResult:
    """One program in a fresh sandbox. Setup failures (fds, temp dirs, missing tools) come back
    as a "sandbox_error" result, never as an exception."""
    try:
        return _try_run_one(mode, ident, limits, program)
    except (OSError, SandboxUnavailable) as exc:
        return SandboxResult("sandbox_error", None, "", str(exc), 0.0, mode, detail=f"cannot set up the sandbox: {exc}")


def _try_run_one(mode: Mode, ident: SandboxIdentity, limits: SandboxLimits, program: bytes) -> SandboxResult:
    interp = _interpreter_for(ident)
    fds = _Fds()
    launch: _Launch | None = None
    try:
        marker_r, marker_w = fds.pipe()
        if mode == "strong":
            info_r, info_w = fds.pipe()
            program_fd = fds.add(os.memfd_create("tuneforge-program", os.MFD_CLOEXEC))
            os.write(program_fd, program)
            os.lseek(program_fd, 0, os.SEEK_SET)
            launch = _strong_launch(ident, interp, limits, program_fd, marker_w, info_w)
            readers = {"marker": marker_r, "info": info_r}
        else:
            # Leftovers of a worker that died mid-run (its pdeathsig reaches the program, not
            # the program's children): this uid is ours now, so they go before we start.
            sweep(ident)
            launch = _weak_launch(ident, interp, limits, program, marker_w)
            readers = {"marker": marker_r}
        return _spawn_and_wait(mode, ident, limits, launch, readers, fds)
    finally:
        fds.close_all()
        if launch is not None and launch.cleanup_dir:
            shutil.rmtree(launch.cleanup_dir, ignore_errors=True)


def _spawn_and_wait(mode: Mode, ident: SandboxIdentity, limits: SandboxLimits, launch: _Launch,
                    readers: dict[str, int], fds: _Fds) -> SandboxResult:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            launch.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=launch.env, cwd=launch.cwd, pass_fds=launch.pass_fds, start_new_session=True,
        )
    except OSError as exc:
        return SandboxResult("sandbox_error", None, "", str(exc), 0.0, mode, detail=f"cannot start: {exc}")
    # The child has its copies; ours must go, or the pipes never reach EOF.
    for fd in launch.pass_fds:
        fds.close(fd)
    out = _Collected()
    try:
        out = _supervise(proc, {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno(), **readers},
                         limits, start + limits.timeout_s)
        if out.reason is not None:
            child = None
            if mode == "strong":
                _read_available(readers["info"], out.info)
                child = _child_pid(bytes(out.info))
            _kill(proc, child)
        elif mode == "weak":
            # Before reaping: while the leader is an unreaped zombie its pid, and so the group
            # id, cannot be reused, so killpg cannot hit a stranger.
            _killpg(proc)
        proc.wait()
    finally:
        if proc.poll() is None:
            _kill(proc, None)
        proc.stdout.close()
        proc.stderr.close()
        if mode == "weak":
            sweep(ident)
    status, code, detail = _classify(proc, out, mode, limits)
    return SandboxResult(
        status=status, exit_code=code,
        stdout=out.stdout.decode("utf-8", "replace"), stderr=out.stderr.decode("utf-8", "replace"),
        wall_s=time.monotonic() - start, mode=mode, truncated=out.reason == "output_limit", detail=detail,
    )


def _killpg(proc: subprocess.Popen) -> None:
    """Without a pid namespace (weak mode), children may outlive the program: kill its group.
    Children that left the group with setsid are for identities.sweep."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the sandbox


@functools.cache
def _mode_problem(mode: Mode, ident: SandboxIdentity) -> str | None:
    if mode == "strong" and shutil.which("bwrap", path=TOOL_ENV["PATH"]) is None:
        return "bwrap is not installed"
    result = _run_one(mode, ident, SandboxLimits(timeout_s=10.0), b"pass\n")
    if result.status != "passed":
        return f"a trial run ended {result.status}: {result.stderr.strip()[-500:] or result.detail}"
    return None


def sandbox_problem(mode: Mode, ident: SandboxIdentity) -> str | None:
    """Why a sandbox of `mode` cannot run programs as `ident` here, or None when it can. Runs
    one trial program the first time per mode, identity and process; cached after."""
    return _mode_problem(mode, ident)


class Sandbox:
    """Runs untrusted Python programs, one per run() call; thread-safe, up to `slots` (default:
    CPU count) at once, further calls wait for a free slot.

    mode="auto" picks strong when bubblewrap works here, else weak if allow_weak_sandbox, else
    raises SandboxUnavailable. mode="strong" raises when bubblewrap does not work; mode="weak"
    raises unless allow_weak_sandbox. Side effects of construction: as root, creates the
    sandbox users if missing (see identities.ensure_sandbox_users); runs one trial program.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        mode: Literal["auto", "strong", "weak"] = "auto",
        allow_weak_sandbox: bool = False,
        slots: int | None = None,
        identities: Sequence[SandboxIdentity] | None = None,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self._identities = list(identities) if identities else default_identities(slots or os.cpu_count() or 1)
        if any(i.uid == 0 or i.gid == 0 for i in self._identities):
            raise SandboxUnavailable("a sandbox identity has uid or gid 0; sandboxes never run as root")
        self._pool = SlotPool(self._identities)
        self._checked: SelfCheckReport | None = None
        self._check_lock = threading.Lock()
        self.mode: Mode = self._resolve_mode(mode, allow_weak_sandbox)

    @property
    def identities(self) -> list[SandboxIdentity]:
        return list(self._identities)

    def _resolve_mode(self, wanted: str, allow_weak: bool) -> Mode:
        if wanted not in ("auto", "strong", "weak"):
            raise ValueError(f'mode must be "auto", "strong" or "weak", got {wanted!r}')
        if wanted == "weak" and not allow_weak:
            raise SandboxUnavailable(
                "weak sandbox requested but not allowed: it leaves the network and world-readable "
                "host files reachable; pass allow_weak_sandbox=True to accept that"
            )
        with self._pool.acquire() as ident:
            problem = None if wanted == "weak" else sandbox_problem("strong", ident)
            if problem is None and wanted != "weak":
                return "strong"
            if wanted == "strong" or not allow_weak:
                raise SandboxUnavailable(
                    f"bubblewrap sandbox unavailable: {problem}. Install bubblewrap (scripts/system-deps.sh) "
                    "and allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                    "or a container seccomp profile that permits them), or pass allow_weak_sandbox=True "
                    "to accept a sandbox without namespaces"
                )
            weak_problem = sandbox_problem("weak", ident)
        if weak_problem is not None:
            raise SandboxUnavailable(f"weak sandbox unavailable too: {weak_problem}")
        return "weak"

    def visible_paths(self) -> list[str]:
        """Host paths a program in this sandbox is meant to see (strong mode), read-only."""
        interp = _interpreter_for(self._identities[0])
        return ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                "/proc", "/dev", "/tmp", SANDBOX_DIR, interp.prefix]

    def run(self, program: str, *, timeout_s: float | None = None) -> SandboxResult:
        """Run `program` (Python source) and report. Never raises for anything the program does;
        a failure to set the sandbox up is a result with status "sandbox_error". Blocks while
        all slots are busy. Leaves nothing behind: scratch space and processes are gone on
        return (in weak mode, as far as described in identities.sweep)."""
        limits = self.limits if timeout_s is None else dataclasses.replace(self.limits, timeout_s=timeout_s)
        with self._pool.acquire() as ident:
            return _run_one(self.mode, ident, limits, program.encode("utf-8", "surrogatepass"))

    def self_check(self, hidden_paths: Sequence[str] = ()) -> SelfCheckReport:
        """Prove the sandbox holds; see worker.evaluation.selfcheck. Raises SandboxBreach
        listing every required protection that did not hold."""
        return run_self_check(self, hidden_paths)

    def ensure_checked(self) -> SelfCheckReport:
        """self_check() once per Sandbox (the first caller runs it, others wait); raises
        SandboxBreach each time until a check passes."""
        with self._check_lock:
            if self._checked is None:
                self._checked = self.self_check()
            return self._checked
