"""What one sandboxed run may use (SandboxLimits) and what it did (SandboxResult).

Kept apart from the sandbox itself so that its clients (the self-check, the harness) can name
these without importing the machinery that launches programs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Mode = Literal["strong", "weak"]
Status = Literal["passed", "failed", "timeout", "sandbox_error"]


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. Sizes in bytes, times in seconds. Raises ValueError, saying
    what to give instead, for a limit Python could not even start under."""

    timeout_s: float = 10.0
    # Per process: without a cgroup, a program may hold up to memory_bytes * max_processes.
    memory_bytes: int = 512 << 20
    max_processes: int = 16
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20
    tmpfs_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not (0 < self.timeout_s <= 3600):
            raise ValueError(f"timeout_s must be in (0, 3600] seconds, got {self.timeout_s!r}")
        if self.memory_bytes < 64 << 20:
            raise ValueError(
                f"memory_bytes={self.memory_bytes} is below 64 MiB, too little for Python to start; "
                "give at least 67108864"
            )
        if self.max_processes < 2:
            raise ValueError(f"max_processes must be >= 2 (the program itself counts), got {self.max_processes}")
        if self.max_open_files < 16:
            raise ValueError(f"max_open_files must be >= 16 for Python to start, got {self.max_open_files}")
        for name in ("max_file_bytes", "max_output_bytes", "tmpfs_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number of bytes, got {getattr(self, name)!r}")

    @property
    def cpu_seconds(self) -> int:
        # Above the wall clock, so the wall-clock timeout normally fires first; the CPU limit
        # catches what burns CPU faster than wall time (several threads or processes).
        return math.ceil(self.timeout_s) + 1

    def rlimits(self) -> tuple[tuple[str, int, int], ...]:
        """(resource name, soft, hard), as the bootstrap applies them."""
        return (
            ("RLIMIT_AS", self.memory_bytes, self.memory_bytes),
            ("RLIMIT_CPU", self.cpu_seconds, self.cpu_seconds + 1),
            ("RLIMIT_NPROC", self.max_processes, self.max_processes),
            ("RLIMIT_FSIZE", self.max_file_bytes, self.max_file_bytes),
            ("RLIMIT_NOFILE", self.max_open_files, self.max_open_files),
            ("RLIMIT_CORE", 0, 0),
        )


@dataclass(frozen=True)
class SandboxResult:
    """What one run did.

    status: passed (exit 0), failed (other exit, or output over the cap), timeout (wall clock
    or CPU limit), sandbox_error (the sandbox never started the program: setup failed).
    stdout/stderr: decoded with errors replaced, capped together at max_output_bytes;
    truncated says the cap was hit (the program was then killed). detail: why, in words.
    """

    status: Status
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    mode: Mode
    truncated: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"
