"""The sandbox: what a result says, and attack probes that must do no harm, end within the
timeout + 2 s, leave no process of a sandbox uid behind, and leave the sandbox working."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.worker.evaluation.support import ATTACK_TIMEOUT_S, host_processes_of
from worker.evaluation.harness import humaneval_program, load_humaneval
from worker.evaluation.sandbox import Sandbox, SandboxLimits

# --------------------------------------------------------------------------- results


def test_a_clean_exit_passes_and_says_strong(strong_sandbox):
    result = strong_sandbox.run("print('hello')")
    assert (result.status, result.exit_code, result.stdout, result.mode) == ("passed", 0, "hello\n", "strong")


def test_an_exception_fails_with_its_traceback(strong_sandbox):
    result = strong_sandbox.run("x = 1\nraise ValueError('boom')\n")
    assert (result.status, result.exit_code) == ("failed", 1)
    assert "ValueError: boom" in result.stderr
    assert 'main.py", line 2' in result.stderr


def test_exit_codes_and_exit_builtin_are_kept(strong_sandbox):
    assert strong_sandbox.run("import sys; sys.exit(3)").exit_code == 3
    assert strong_sandbox.run("exit(0)").status == "passed"


def test_the_program_runs_as_main_in_its_scratch_dir(strong_sandbox):
    result = strong_sandbox.run(
        "import os\n"
        "if __name__ == '__main__':\n"
        "    open('f', 'w').write('x')\n"
        "    print(os.getcwd(), sorted(os.listdir('.')))\n"
    )
    assert result.stdout == "/sandbox ['f', 'main.py']\n"


def test_the_program_sees_no_worker_environment(strong_sandbox, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_SECRET_PROBE", "s3cret")
    result = strong_sandbox.run("import os; print(sorted(os.environ))")
    assert "TUNEFORGE_SECRET_PROBE" not in result.stdout
    assert result.stdout == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']\n"


def test_self_check_passes_in_strong_mode(strong_sandbox):
    report = strong_sandbox.self_check()
    assert report.ok and report.mode == "strong"
    assert all(p.required and p.held for p in report.probes.values()), report.probes
    assert {"network_6379", "network_5432", "host_dir_write", "etc_write", "process_cap", "memory_cap",
            "worker_environ", "worker_files_hidden", "unprivileged"} <= report.probes.keys()


def test_auto_mode_picks_strong_where_bubblewrap_works(strong_sandbox):
    assert Sandbox(SandboxLimits(timeout_s=3.0)).mode == "strong"


# --------------------------------------------------------------------------- attacks


@pytest.fixture
def host_targets(tmp_path) -> Iterator[list[Path]]:
    """Host paths an attack tries to create: one in a test dir, one directly in /tmp (which a
    strong sandbox replaces with its own tmpfs, so a write there must stay inside)."""
    targets = [tmp_path / "pwned", Path(f"/tmp/tuneforge-pwned-{uuid.uuid4().hex}")]
    yield targets
    for target in targets:
        target.unlink(missing_ok=True)


def _attack(sandbox: Sandbox, program: str):
    start = time.monotonic()
    result = sandbox.run(program)
    elapsed = time.monotonic() - start
    assert elapsed < ATTACK_TIMEOUT_S + 2.0, f"attack took {elapsed:.1f} s"
    uids = {i.uid for i in sandbox.identities}
    assert host_processes_of(uids) == [], "processes of a sandbox uid were left behind"
    follow_up = sandbox.run("print(sum(range(10)))")
    assert (follow_up.status, follow_up.stdout) == ("passed", "45\n"), follow_up
    return result


def _touch_all(targets: list[Path]) -> str:
    return " ".join(str(t) for t in targets)


def test_reloaded_os_system_cannot_touch_host_files(attack_sandbox, host_targets):
    program = f"import importlib, os\nimportlib.reload(os)\nprint(os.system('touch {_touch_all(host_targets)}'))"
    result = _attack(attack_sandbox, program)
    assert result.stdout.strip().isdigit(), result  # os.system really ran
    assert not any(t.exists() for t in host_targets)


def test_posix_spawn_cannot_touch_host_files(attack_sandbox, host_targets):
    program = (
        "import os\n"
        f"for t in {[str(t) for t in host_targets]!r}:\n"
        "    pid = os.posix_spawn('/usr/bin/touch', ['touch', t], {})\n"
        "    print(t, os.waitpid(pid, 0)[1])\n"
    )
    result = _attack(attack_sandbox, program)
    # The spawn itself works (the /tmp one even succeeds, inside the sandbox's own /tmp)...
    assert result.stdout.count("\n") == 2, result
    assert result.stdout.splitlines()[1].endswith(" 0")
    # ...and nothing reaches the host.
    assert not any(t.exists() for t in host_targets)


def test_ctypes_libc_system_cannot_touch_host_files(attack_sandbox, host_targets):
    program = (
        "import ctypes, ctypes.util\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')\n"
        f"print('rc', libc.system(b'touch {_touch_all(host_targets)}'))\n"
    )
    result = _attack(attack_sandbox, program)
    assert result.stdout.startswith("rc "), result
    assert not any(t.exists() for t in host_targets)


def test_writes_outside_the_scratch_dir_do_not_reach_the_host(attack_sandbox, host_targets):
    paths = [str(t) for t in host_targets] + ["/usr/lib/tuneforge-pwned", "/etc/passwd", "/tuneforge-pwned", "../pwned"]
    program = (
        f"for path in {paths!r}:\n"
        "    try:\n"
        "        open(path, 'a').write('pwned')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.errno)\n"
    )
    passwd_before = Path("/etc/passwd").read_bytes()
    result = _attack(attack_sandbox, program)
    assert not any(t.exists() for t in host_targets)
    assert not Path("/usr/lib/tuneforge-pwned").exists() and not Path("/tuneforge-pwned").exists()
    assert Path("/etc/passwd").read_bytes() == passwd_before
    # Only the sandbox's own /tmp took a write.
    assert [line for line in result.stdout.splitlines() if line.startswith("wrote")] == [f"wrote {host_targets[1]}"]


@pytest.mark.parametrize("port", [6379, 5432], ids=["redis", "postgres"])
def test_sockets_to_local_services_are_refused(attack_sandbox, port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        pytest.skip(f"nothing listens on 127.0.0.1:{port} here, so the probe would prove nothing")
    program = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1.0)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('refused', e)\n"
    )
    result = _attack(attack_sandbox, program)
    assert result.stdout.startswith("refused"), result


def test_fork_bomb_is_capped_and_killed(attack_sandbox):
    program = (
        "import os\n"
        "refused = 0\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        refused += 1\n"
        "        if refused == 1 and os.getpid() == 1:\n"
        "            print('refused', flush=True)\n"
    )
    result = _attack(attack_sandbox, program)
    assert result.status == "timeout"
    assert "refused" in result.stdout


def test_fork_bomb_does_not_starve_a_neighbour(strong_sandbox):
    """The process cap counts per sandbox, not per uid: a bomb at its cap next door must not make
    a correct program fail."""
    problem = load_humaneval()["HumanEval/2"]
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    bomb_result = {}
    bomber = threading.Thread(target=lambda: bomb_result.update(r=strong_sandbox.run(bomb, timeout_s=2.0)))
    bomber.start()
    # A correct solution that also forks a little: it must get its processes.
    forks = "\nimport os\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n" \
            "    os.waitpid(pid, 0)\n"
    program = humaneval_program(problem, problem.canonical_solution) + forks
    neighbours = [strong_sandbox.run(program) for _ in range(5)]
    bomber.join()
    assert bomb_result["r"].status == "timeout"
    assert [n.status for n in neighbours] == ["passed"] * 5, neighbours


def test_memory_bomb_hits_the_memory_cap(attack_sandbox):
    result = _attack(attack_sandbox, "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n")
    assert result.status == "failed"
    assert "MemoryError" in result.stderr


def test_filling_the_disk_stops_at_the_caps(attack_sandbox):
    program = (
        "import os\n"
        "chunk = b'x' * (1 << 20)\n"
        "for target in ('/sandbox', '/tmp'):\n"
        "    written = 0\n"
        "    try:\n"
        "        for i in range(10_000):\n"
        "            with open(f'{target}/fill{i}', 'wb') as f:\n"
        "                for _ in range(4):\n"
        "                    f.write(chunk); written += 1\n"
        "    except OSError as e:\n"
        "        print(target, 'stopped', e.errno, 'after MiB', written)\n"
    )
    result = _attack(attack_sandbox, program)
    lines = result.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [["/sandbox", "stopped", "28"], ["/tmp", "stopped", "28"]], result
    # 28 is ENOSPC: the size-capped tmpfs (16 MiB here) filled, and nothing of it is on disk.
    assert all(int(line.split()[-1]) <= 16 for line in lines)


def test_a_single_file_stops_at_the_file_size_cap(attack_sandbox):
    program = (
        "import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "f = open('big', 'wb')\n"
        "try:\n"
        "    for _ in range(64):\n"
        "        f.write(b'x' * (1 << 20)); f.flush()\n"
        "except OSError as e:\n"
        "    print('stopped', e.errno)\n"
    )
    result = _attack(attack_sandbox, program)
    assert result.stdout.strip() in ("stopped 27", "stopped 28"), result  # EFBIG (or ENOSPC first)


def test_an_infinite_loop_ignoring_sigterm_is_killed_at_the_timeout(attack_sandbox):
    program = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    result = _attack(attack_sandbox, program)
    assert result.status == "timeout"
    assert result.wall_s >= ATTACK_TIMEOUT_S


def test_a_child_that_outlives_its_parent_is_killed_with_it(attack_sandbox):
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\nprint('parent done')\n"
    result = _attack(attack_sandbox, program)
    assert result.status == "passed"


def test_a_gigabyte_on_stdout_is_cut_at_the_output_cap(attack_sandbox):
    program = "import sys\nchunk = b'y' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.buffer.write(chunk)\n"
    result = _attack(attack_sandbox, program)
    assert (result.status, result.truncated) == ("failed", True)
    assert len(result.stdout) == attack_sandbox.limits.max_output_bytes
    assert result.wall_s < ATTACK_TIMEOUT_S


def test_a_sandbox_dies_with_its_worker(strong_sandbox, tmp_path):
    """If the worker process is killed mid-run, nothing it sandboxed keeps running."""
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom worker.evaluation.sandbox import Sandbox, SandboxLimits\n"
         "sandbox = Sandbox(SandboxLimits(timeout_s=60.0), mode='strong')\n"
         "print('running', flush=True)\n"
         "sandbox.run('import os, time\\nos.fork()\\nprint(1, flush=True)\\ntime.sleep(600)')\n"],
        cwd=Path(__file__).resolve().parents[3], stdout=subprocess.PIPE, text=True,
    )
    uids = {i.uid for i in strong_sandbox.identities}
    try:
        assert worker.stdout.readline() == "running\n"
        wait_until(lambda: len(host_processes_of(uids)) >= 3, timeout=10, message="the sandbox to start")
    finally:
        worker.kill()
        worker.wait()
    wait_until(lambda: not [p for p in host_processes_of(uids) if not p[2].startswith("Z")], timeout=5,
               message="the sandbox to die with its worker")
    # bwrap and setpriv lost their parent and wait, as zombies, for the host's init to reap them.
    wait_until(lambda: not host_processes_of(uids), timeout=15, message="the host's init to reap them")
