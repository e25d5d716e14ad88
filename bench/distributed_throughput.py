"""Data-parallel training throughput: the same job at 1 process and at N (training.processes).

Each arm runs LoraRecipe in a fresh subprocess (rank 0; with N > 1 it starts ranks 1..N-1 itself,
as a job's worker does) on the same base model, data, spec and seed, for the same optimizer steps
of the same effective batch: only training.processes differs. A third arm, 1 process at the
thread count each of the N processes gets (cores / N, via OMP_NUM_THREADS), separates the gain of
running N processes from that of fewer threads per process, which matters on a CPU shared with
other work: one process's OpenMP threads wait for the slowest core at every kernel. Prints per
arm the trained tokens/s (real tokens over train()'s wall time), the median of the steps' own
rates (the metrics events', the first step left out), setup time (with N > 1 it includes starting
the other ranks) and final loss; then the N-process/1-process ratios, and the largest per-step
relative loss difference (both arms train on the same examples every step, so it should be fp32
rounding). Writes
bench/results/distributed_throughput-<model>-<device>.json describing the machine.

    .venv/bin/python bench/distributed_throughput.py [--processes 2] [--steps 24] [--repeats 2]
    .venv/bin/python bench/distributed_throughput.py --model-dir DIR   # a real model (save_pretrained dir)

The default model is worker/training/tiny.py's (1.5M parameters, random weights), built once under
--cache-dir; the data are the bundled code tasks (tuneforge/data/code_tasks_train.jsonl) with the
default prompt layout. The spec is a job's default (4-bit base, LoRA r 8 on q/k/v/o, batch 1 x 8)
with max_steps, no periodic checkpoints and LoRA dropout 0. On CPU the N processes share the
machine's cores (each gets cores / N threads), so a ratio above 1 needs more cores than one process
uses well; on a small model the per-step all-reduce and the DDP bookkeeping are a large share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CODE_TASKS = ROOT / "tuneforge" / "data" / "code_tasks_train.jsonl"


def spec_json(processes: int, steps: int, quantized: bool) -> dict[str, Any]:
    from app.domains.jobs.spec import LoraSpec, QuantizationSpec, TrainingSettings, TrainingSpec

    training = TrainingSettings(max_steps=steps, epochs=100, checkpoint_every_steps=None, processes=processes,
                                batch_size=1, gradient_accumulation_steps=8)
    quantization = QuantizationSpec() if quantized else QuantizationSpec(bits=None)
    return TrainingSpec(training=training, quantization=quantization, lora=LoraSpec(dropout=0.0),
                        seed=0).model_dump(mode="json")


def run_child(args: argparse.Namespace) -> None:
    """One arm: setup, train, cleanup; its numbers as JSON to --child-out."""
    from app.domains.jobs.spec import TrainingSpec
    from worker.training.recipe import LoraRecipe

    class Hooks:
        def __init__(self) -> None:
            self.metrics: list[dict[str, Any]] = []

        def on_event(self, type: str, message: str, data: dict[str, Any] | None) -> None:
            if type == "metrics" and data and "loss" in data:
                self.metrics.append(data)

        def should_stop(self) -> None:
            return None

        def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
            return None

    hooks = Hooks()
    with tempfile.TemporaryDirectory() as work:
        recipe = LoraRecipe(spec=TrainingSpec.model_validate(json.loads(args.spec)), base_model_path=args.model_dir,
                            train_file=CODE_TASKS, validation_file=None, work_dir=Path(work), hooks=hooks)
        started = time.perf_counter()
        try:
            recipe.setup()
            setup_seconds = time.perf_counter() - started
            result = recipe.train()
        finally:
            recipe.cleanup()
    rates = [m["tokens_per_second"] for m in hooks.metrics[1:]]
    args.child_out.write_text(json.dumps({
        "tokens_per_second": result.tokens_per_second, "step_tokens_per_second_median": statistics.median(rates),
        "setup_seconds": setup_seconds, "train_seconds": result.wall_seconds, "steps": result.steps,
        "trained_tokens": result.trained_tokens, "final_loss": result.final_loss,
        "micro_batch_size": result.micro_batch_size, "gradient_accumulation_steps": result.gradient_accumulation_steps,
        "quantization": result.quantization, "precision": result.precision,
        "losses": {m["step"]: m["loss"] for m in hooks.metrics},
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="the multi-process arm's training.processes")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per arm (8 examples each)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, interleaved 1 N 1 N; medians reported")
    ap.add_argument("--model-dir", type=Path, help="a base model directory (default: the tiny model)")
    ap.add_argument("--unquantized", action="store_true", help="plain LoRA on the unquantized base")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "tuneforge-bench")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/distributed_throughput-...)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        run_child(a)
        return

    import torch

    from bench.machine import describe, write_report
    from worker.training.tiny import make_tiny_model

    model_dir = a.model_dir
    if model_dir is None:
        model_dir = a.cache_dir / "model-tiny-distributed"
        if not (model_dir / "config.json").is_file():
            make_tiny_model(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    desc = describe()
    threads = torch.get_num_threads()
    share = max(1, threads // a.processes)
    many_name, thin_name = str(a.processes), f"1x{share}threads"
    # arm -> (training.processes, OMP_NUM_THREADS for the arm's first process; None: torch's default)
    plan: dict[str, tuple[int, int | None]] = {"1": (1, None), many_name: (a.processes, None),
                                               thin_name: (1, share)}
    arms: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    for repeat in range(a.repeats):
        for name, (processes, omp) in plan.items():
            out = a.cache_dir / f"distributed-{name}-{repeat}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            spec = json.dumps(spec_json(processes, a.steps, not a.unquantized))
            env = {**os.environ, **({"OMP_NUM_THREADS": str(omp)} if omp is not None else {})}
            subprocess.run([sys.executable, __file__, "--child", "--spec", spec, "--child-out", str(out),
                            "--model-dir", str(model_dir)], check=True, cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run = json.loads(out.read_text())
            arms[name].append(run)
            print(f"{name} run {repeat + 1}: {run['tokens_per_second']:,.0f} tokens/s "
                  f"(steps {run['step_tokens_per_second_median']:,.0f}), setup {run['setup_seconds']:.1f} s, "
                  f"train {run['train_seconds']:.1f} s, final loss {run['final_loss']:.4f}", flush=True)

    summary = {}
    for name, runs in arms.items():
        summary[name] = {
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
            "step_tokens_per_second_median": statistics.median(r["step_tokens_per_second_median"] for r in runs),
            "setup_seconds": statistics.median(r["setup_seconds"] for r in runs),
            "runs": runs,
        }
    one, many, thin = summary["1"], summary[many_name], summary[thin_name]
    ratio = many["tokens_per_second"] / one["tokens_per_second"]
    step_ratio = many["step_tokens_per_second_median"] / one["step_tokens_per_second_median"]
    thin_ratio = many["tokens_per_second"] / thin["tokens_per_second"]
    losses_one, losses_many = arms["1"][0]["losses"], arms[many_name][0]["losses"]
    loss_gap = max(abs(losses_many[s] / losses_one[s] - 1) for s in losses_one)
    tokens_equal = arms["1"][0]["trained_tokens"] == arms[many_name][0]["trained_tokens"]
    print(f"1 process ({threads} threads): {one['tokens_per_second']:,.0f} tokens/s; {a.processes} processes "
          f"({share} thread(s) each): {many['tokens_per_second']:,.0f} tokens/s; ratio {ratio:.2f} (per-step "
          f"rates: {step_ratio:.2f}); against 1 process at {share} thread(s), {thin['tokens_per_second']:,.0f} "
          f"tokens/s: {thin_ratio:.2f}; largest per-step relative loss difference {loss_gap:.1e}; same trained "
          f"tokens: {tokens_equal}")
    name = "tiny" if a.model_dir is None else a.model_dir.name
    out = write_report(f"distributed_throughput-{name}-{device}", {
        "benchmark": "distributed_throughput", "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": desc,
        "model": str(model_dir), "steps": a.steps, "effective_batch": 8, "repeats": a.repeats,
        "quantized": not a.unquantized, "threads": threads, "arms": summary, "ratio": ratio,
        "step_ratio": step_ratio, "ratio_to_1_process_at_the_same_threads_per_process": thin_ratio,
        "max_step_loss_rel_diff": loss_gap, "same_trained_tokens": tokens_equal,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }, out=a.out)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
