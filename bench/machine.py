"""What every benchmark writes about the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _first(path: str, prefix: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def describe(**extra) -> dict:
    """Host, OS, CPU, memory and Python; torch, transformers, peft and the GPU where they are
    already imported (a benchmark that does not use them does not pay for importing them)."""
    mem_kb = _first("/proc/meminfo", "MemTotal").split()
    out = {
        "host": socket.gethostname(), "kernel": platform.release(), "os": platform.platform(),
        "cpu": _first("/proc/cpuinfo", "model name"), "cpus": os.cpu_count(),
        "memory_gib": round(int(mem_kb[0]) / 2**20, 1) if mem_kb else None,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        if name in sys.modules:
            out[name] = getattr(sys.modules[name], "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**out, **extra}


def write_report(name: str, report: dict, out: Path | None = None) -> Path:
    """Write a benchmark's report as JSON to `out`, by default bench/results/<name>.json; returns the path."""
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out
