"""`tuneforge jobs follow ID`: a job's progress through the API until it ends.

Polls GET /v1/fine_tuning/jobs/{id} and its newest events. Metrics events move a progress line
(steps, loss, tokens/s, ETA); other events are printed as they come. On a terminal the progress line
is redrawn in place; elsewhere (a pipe, a log) each new step is a line of its own. Ends with the final
status line; the exit code says how the job ended (EXIT_CODES).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import httpx

FINAL = ("succeeded", "failed", "cancelled")
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2}
BAR_WIDTH = 24
EVENTS_PAGE = 100  # the newest events read at each poll
TRANSIENT_S = 30.0  # how long the API may be unreachable before following gives up


class FollowError(Exception):
    """The job cannot be followed: it does not exist, the key is refused, or the API does not answer."""


def progress_line(data: dict) -> str:
    """`[#####-----] step 12/40  loss 1.2345  312 tok/s  ETA 1m23s` from a metrics event's data."""
    step, total = int(data.get("step") or 0), int(data.get("total_steps") or 0)
    filled = round(BAR_WIDTH * step / total) if total else 0
    parts = [f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] step {step}/{total or '?'}"]
    if data.get("loss") is not None:
        parts.append(f"loss {data['loss']:.4f}")
    if data.get("tokens_per_second") is not None:
        parts.append(f"{data['tokens_per_second']:.0f} tok/s")
    if data.get("eta_seconds") is not None:
        parts.append(f"ETA {_duration(data['eta_seconds'])}")
    return "  ".join(parts)


def final_line(job: dict) -> str:
    line = f"job {job['id']} {job['status']}"
    if job["status"] == "succeeded":
        line += f": model {job.get('fine_tuned_model')}, {job.get('trained_tokens') or 0} trained tokens"
    elif job["status"] == "failed" and job.get("error"):
        error = job["error"]
        line += f": {error.get('message') if isinstance(error, dict) else error}"
    return line


def follow(client: httpx.Client, job_id: str, *, out: TextIO | None = None, interval: float = 1.0,
           prefix: str = "", check: Callable[[], None] | None = None, timeout: float | None = None) -> dict:
    """Follow job_id with `client` (base_url .../v1, the team's key) until it ends; return the job.
    `check()` runs before each poll and may raise to stop (the demo checks its processes). Raises
    FollowError (404, 401, the API unreachable for TRANSIENT_S), TimeoutError past `timeout`."""
    out = out or sys.stdout
    tty = out.isatty()
    seen: set[str] = set()
    status: str | None = None
    drawn = False  # a progress line is on the terminal, not ended by a newline
    deadline = None if timeout is None else time.monotonic() + timeout

    def say(text: str) -> None:
        nonlocal drawn
        out.write(("\n" if drawn else "") + prefix + text + "\n")
        drawn = False
        out.flush()

    def draw(text: str) -> None:
        nonlocal drawn
        if tty:
            out.write("\r\x1b[2K" + prefix + text)
            drawn = True
        else:
            out.write(prefix + text + "\n")
        out.flush()

    while True:
        if check is not None:
            check()
        job = _get(client, f"/fine_tuning/jobs/{job_id}")
        events = _get(client, f"/fine_tuning/jobs/{job_id}/events", params={"limit": EVENTS_PAGE})["data"]
        for event in reversed(events):  # the API lists the newest first
            if event["id"] in seen:
                continue
            seen.add(event["id"])
            data = event.get("data") or {}
            if event.get("type") == "metrics" and data.get("loss") is not None:
                draw(progress_line(data))
            elif event.get("type") != "metrics":
                say(f"[{event.get('level', 'info')}] {event.get('message', '')}")
        if job["status"] != status:
            status = job["status"]
            if status not in FINAL:
                say(f"status: {status}")
        if status in FINAL:
            say(final_line(job))
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not end within {timeout} s")
        time.sleep(interval)


def _get(client: httpx.Client, path: str, **kwargs) -> dict:
    unreachable_since = None
    while True:
        try:
            r = client.get(path, **kwargs)
        except httpx.TransportError as exc:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > TRANSIENT_S:
                raise FollowError(f"the API at {client.base_url} does not answer: {exc}") from None
            time.sleep(1)
            continue
        if r.status_code == 200:
            return r.json()
        if r.status_code >= 500 or r.status_code == 429:  # busy or restarting: try again shortly
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since <= TRANSIENT_S:
                time.sleep(1)
                continue
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise FollowError(f"{r.status_code}: {message}")


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
