"""Self-training on verified answers (rejection sampling): does it lift the real model where training
on the reference solutions does not?

The model samples n answers per training task (temperature T); each is run against the task's tests
in the evaluation sandbox, as an evaluation runs it, and the distinct programs that pass become
training records (the task's text and tests, the model's own passing code). A round then trains
Tuneforge's recipe on those records, with the reference solutions beside them (--with-references),
and is scored greedy on the tier's held-out tasks and the general-text loss, as a round of
bench/quality.py is. The held-out tasks are never sampled or trained on.

    .venv/bin/python bench/self_training.py --model-dir DIR [--tier easy] [--n 8] [--temperature 0.8]
        [--per-task 4] [--with-references] [--spec '{"training": {"epochs": 4}}'] [--name NAME]

Prints the sampling yield and the round's scores, writes the verified records to
bench/results/self-training-<tier>.jsonl and appends the round to
bench/results/quality-self-training-smollm2.json (a round already there under --name is skipped;
the sampled records are reused when their file exists and --resample is not given).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.domains.evaluations.spec import SamplingSpec  # noqa: E402
from app.domains.files.formats import normalize_code  # noqa: E402
from app.domains.jobs.spec import TrainingSpec  # noqa: E402
from bench import quality  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def normalized(code: str) -> str:
    """Code compared for sameness: as the overlap check compares it (formats.normalize_code: layout,
    comments and docstrings do not count), or stripped when it does not parse."""
    return normalize_code(code) or code.strip()


def verified_records(model_dir: Path, adapter: Path | None, train_file: Path, settings: SamplingSpec,
                     per_task: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample settings.n answers per task of train_file; the passing, distinct ones (at most per_task a
    task) as task records with the model's code, and the yield (samples, passed, tasks solved)."""
    from app.domains.evaluations.extract import mbpp_solution

    tasks, score, generation_s = quality.scored_answers(model_dir, adapter, train_file, settings)
    records: list[dict[str, Any]] = []
    seen: dict[str, set[str]] = {}
    for r in score.results:
        if not r.passed:
            continue
        task = tasks[r.task_id]
        code = mbpp_solution(r.completion, task["test_list"]).strip()
        kept = seen.setdefault(r.task_id, set())
        if normalized(code) in kept or len(kept) >= per_task:
            continue
        kept.add(normalized(code))
        records.append({"task_id": task["task_id"], "text": task["text"], "code": code,
                        "test_list": task["test_list"]})
    passed = sum(r.passed for r in score.results)
    stats = {"tasks": len(tasks), "samples": score.samples, "passed_samples": passed,
             "sampled_pass_at_1": passed / max(score.samples, 1), "tasks_solved": len(seen),
             "records": len(records), "generation_seconds": generation_s}
    return records, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, default=None, help="sample from base + this adapter")
    parser.add_argument("--tier", choices=sorted(quality.TIERS), default="easy")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--per-task", type=int, default=4, help="distinct passing answers kept per task")
    parser.add_argument("--with-references", action="store_true", help="train on the reference solutions too")
    parser.add_argument("--spec", default="{}", help="the round's TrainingSpec as JSON (default: the defaults)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--resample", action="store_true")
    args = parser.parse_args()

    train_file, heldout = quality.TIERS[args.tier]
    sampled = RESULTS / f"self-training-{args.tier}.jsonl"
    report_file = RESULTS / "quality-self-training-smollm2.json"
    name = args.name or f"n{args.n}-t{args.temperature}-k{args.per_task}{'-refs' if args.with_references else ''}"
    report = quality.rounds_report(report_file, name)
    if report is None:
        return
    if args.resample or not sampled.is_file():
        settings = SamplingSpec(n=args.n, temperature=args.temperature, max_tokens=256, prompt_style="chat")
        t0 = time.monotonic()
        records, stats = verified_records(args.model_dir, args.adapter, train_file, settings, args.per_task)
        stats.update(n=args.n, temperature=args.temperature, per_task=args.per_task,
                     wall_seconds=time.monotonic() - t0, sampled_from=str(args.adapter or "base"))
        sampled.write_text("".join(json.dumps(r) + "\n" for r in records))
        report["sampling"] = stats
        report_file.write_text(json.dumps(report, indent=1))
    records = [json.loads(line) for line in sampled.read_text().splitlines() if line.strip()]
    print(f"sampling: {report.get('sampling')}", flush=True)

    with tempfile.TemporaryDirectory(prefix="self-training-") as tmp:
        data = Path(tmp) / "train.jsonl"
        refs = [json.loads(line) for line in train_file.read_text().splitlines() if line.strip()]
        rows = (refs if args.with_references else []) + records
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = TrainingSpec(**json.loads(args.spec))
        adapter = Path(tmp) / "adapter"
        print(f"{name}: {len(rows)} records, {quality.describe_spec(spec)}", flush=True)
        trained = quality.train(args.model_dir, spec, data, adapter, name)
        held = quality.evaluate(args.model_dir, adapter, str(heldout), SamplingSpec(max_tokens=256,
                                                                                     prompt_style="chat"),
                                general_loss=True)
    print(f"  {trained['steps']} steps, final loss {trained['final_loss']:.3f}; held-out {held['passed']}/"
          f"{held['tasks']}, general loss {held['general_loss']:.4f}", flush=True)
    report["rounds"].append({"name": name, "records": len(rows), "with_references": args.with_references,
                             "spec": quality.describe_spec(spec), "training": trained, "heldout": held})
    report_file.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
