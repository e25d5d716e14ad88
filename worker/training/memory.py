"""Peak memory of a training job: CUDA's allocator counter on GPU, the resident set's high-water mark on CPU."""

from __future__ import annotations

import re
import resource
import sys

import torch

from worker.training.model import Device


class PeakMemory:
    """Peak memory of this process from reset() on, in bytes.

    CUDA: torch's max allocated bytes. CPU: the resident set's high-water mark
    (VmHWM), which writing "5" to /proc/self/clear_refs resets (Linux >= 4.0);
    where that is not allowed, the process's lifetime peak (ru_maxrss), which
    may include earlier jobs of the same worker process.
    """

    def __init__(self, device: Device):
        self.device = device
        self.per_job = False

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.per_job = True
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.per_job = True
        except OSError:
            self.per_job = False

    def peak_bytes(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
            if match:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        return peak if sys.platform == "darwin" else peak * 1024
