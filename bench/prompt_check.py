"""Greedy pass@1 of a model on code tasks through Tuneforge's own evaluation path: the tasks read as
an evaluation reads them (tasks_io), prompts in a prompt style (generate), answers run in the
sandbox (harness, Sandbox(mode="auto")). Prints the pass count, the times, and a few raw answers
with the programs that ran; writes bench/results/prompt_check-<model>-<tasks>-<style>.json with every row.

    .venv/bin/python bench/prompt_check.py --model /path/to/model [--adapter DIR] [--tasks FILE.jsonl | humaneval]
        [--style auto|chat|completion] [--max-tokens 256] [--batch-size 16] [--limit N] [--examples 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.domains.evaluations.spec import SamplingSpec  # noqa: E402
from bench.machine import describe, write_report  # noqa: E402
from worker.evaluation import generate, harness, tasks_io  # noqa: E402
from worker.evaluation.sandbox import Sandbox  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tasks", default=str(ROOT / "tuneforge" / "data" / "code_tasks_heldout.jsonl"),
                        help='a JSONL file of mbpp/humaneval tasks, or "humaneval" for the built-in 164')
    parser.add_argument("--adapter", type=Path, default=None, help="a peft adapter directory to load on the model")
    parser.add_argument("--style", default="chat", choices=["auto", "chat", "completion"])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--examples", type=int, default=3)
    args = parser.parse_args()

    settings = SamplingSpec(max_tokens=args.max_tokens, prompt_style=args.style, limit=args.limit)
    problems, prompts = tasks_io.named(args.tasks, settings.limit)
    sandbox = Sandbox(mode="auto")

    start = time.monotonic()
    model, tokenizer = generate.load(args.model, args.adapter)
    load_s = time.monotonic() - start
    style = generate.prompt_style(tokenizer, settings)
    samples, generation_s = generate.generate(model, tokenizer, prompts, settings, batch_size=args.batch_size)
    exec_start = time.monotonic()
    score = harness.score(sandbox, samples, problems=problems, ks=(1,), timeout_s=settings.timeout_seconds)
    execution_s = time.monotonic() - exec_start
    passed = sum(r.passed for r in score.results)

    tasks_name = Path(args.tasks).stem
    model_name = args.model.name + (f"+{args.adapter.name}" if args.adapter else "")
    print(f"{model_name} on {tasks_name}: prompt_style {args.style} -> {style}, "
          f"max_tokens {args.max_tokens}, batch {args.batch_size}, sandbox {score.mode}")
    print(f"passed {passed} of {score.tasks} (pass@1 {score.pass_at_k[1]:.3f})")
    print(f"load {load_s:.1f} s, generation {generation_s:.1f} s, execution {execution_s:.1f} s, "
          f"total {time.monotonic() - start:.1f} s")
    shown = [r for r in score.results if r.passed][:1] + [r for r in score.results if not r.passed][:1]
    shown += [r for r in score.results if r not in shown][:max(0, args.examples - len(shown))]
    for r in shown[:args.examples]:
        print(f"\n--- task {r.task_id}: {r.outcome}\n[completion]\n{r.completion}\n[program]\n{r.program}")
        if not r.passed:
            print(f"[detail]\n{r.detail[-400:]}")

    report = describe(model=str(args.model), adapter=str(args.adapter) if args.adapter else None,
                      tasks=str(args.tasks), prompt_style=args.style, resolved_style=style,
                      max_tokens=args.max_tokens, batch_size=args.batch_size, sandbox_mode=score.mode,
                      tasks_count=score.tasks, passed=passed, pass_at_1=score.pass_at_k[1], load_seconds=load_s,
                      generation_seconds=generation_s, execution_seconds=execution_s,
                      results=[asdict(r) for r in score.results])
    path = write_report(f"prompt_check-{model_name}-{tasks_name}-{args.style}", report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
