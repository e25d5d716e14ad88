"""The processes a Tuneforge machine runs, and how they are started and stopped together.

`tuneforge up` and `tuneforge demo` both run the API, a worker and inference processes as
children; the command lines and the stopping are written once, here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

STOP_TIMEOUT_S = 20.0  # how long a child may take to exit after SIGTERM before it is killed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, deadline_s: float = 60, what: str = "the API process") -> None:
    """Poll `url` until it answers 200; RuntimeError if `proc` (named `what` in the error) exits first,
    TimeoutError past deadline_s."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {deadline_s} s")


def serve_command(host: str, port: int) -> list[str]:
    """The API process (uvicorn on app.main:create_app)."""
    return [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", host,
            "--port", str(port), "--no-access-log"]


def worker_command(concurrency: int, queues: str | None = None) -> list[str]:
    """One Celery worker; by default on the training, evaluation and webhook delivery queues."""
    from app.core.config import get_settings

    settings = get_settings()
    queues = queues or f"{settings.training_queue},{settings.evaluation_queue},{settings.webhooks.queue}"
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO",
            "--concurrency", str(concurrency), "-Q", queues, "--hostname", f"worker-{os.getpid()}@%h"]


def inference_command(model: str, host: str = "127.0.0.1", port: int = 0) -> list[str]:
    """The inference process of one registered base model (`tuneforge inference`); port 0 picks a free one."""
    return [sys.executable, "-m", "tuneforge.cli", "inference", "--model", model, "--host", host, "--port", str(port)]


def start(command: list[str], *, env: Mapping[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start `command` as a child; its stdout and stderr go to `log` when given, else to ours."""
    if log is None:
        return subprocess.Popen(command, env=env)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every child still running, then kill those that have not exited within timeout_s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def supervise(procs: list[subprocess.Popen]) -> int:
    """Wait until SIGINT/SIGTERM or until one child exits, then stop them all. Returns the exit code:
    the highest of the children's, 0 when none failed."""

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop(procs)
    return max((p.returncode or 0) for p in procs) if any(p.returncode for p in procs) else 0
