"""Preference tuning against the model's own mistakes: does DPO lift the real model where training on
the reference solutions alone does not?

The base model answers every training task of the tier greedily, as an evaluation asks it (the
chat prompt with the task's tests); each answer runs against the task's tests in the evaluation
sandbox. A task the model fails becomes a preference pair: the task's prompt, preferred the
reference solution (in a fence, as a training record's answer), not preferred the model's own
failing answer, as it wrote it. A round then trains Tuneforge's recipe with method DPO on those
pairs (optionally on top of a supervised round on the references, --after-sft, whose adapter is
then also DPO's reference model) and is scored greedy on the tier's held-out tasks and the
general-text loss, as a round of bench/quality.py is. The held-out tasks are never answered or
trained on.

    .venv/bin/python bench/preference_training.py --model-dir DIR [--tier easy] [--n 1]
        [--temperature 0] [--spec '{"dpo": {"beta": 0.1}, "training": {"epochs": 3}}'] [--after-sft]
        [--name NAME]

Prints the pair count and the round's scores, writes the pairs to
bench/results/preference-pairs-<tier>.jsonl and appends the round to
bench/results/quality-preference-smollm2.json (a round already there under --name is skipped; the
pairs are reused when their file exists and --resample is not given).
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
from app.domains.files.formats import RecordFormat, task_answer, task_messages  # noqa: E402
from app.domains.jobs.spec import TrainingSpec  # noqa: E402
from bench import quality  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def failure_pairs(model_dir: Path, train_file: Path, settings: SamplingSpec) -> tuple[list[dict[str, Any]],
                                                                                     dict[str, Any]]:
    """settings.n answers per task of train_file; one preference record per distinct failing answer
    (the reference preferred), and the yield (answers, passed, tasks failed)."""
    tasks, score, generation_s = quality.scored_answers(model_dir, None, train_file, settings)
    pairs: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for r in score.results:
        answer = r.completion.strip()
        if r.passed or not answer or (r.task_id, answer) in seen:
            continue
        seen.add((r.task_id, answer))
        task = tasks[r.task_id]
        pairs.append({"input": {"messages": task_messages(task, RecordFormat.MBPP)},
                      "preferred_output": [{"role": "assistant", "content": task_answer(task, RecordFormat.MBPP)}],
                      "non_preferred_output": [{"role": "assistant", "content": answer}]})
    passed = sum(r.passed for r in score.results)
    stats = {"tasks": len(tasks), "answers": score.samples, "passed_answers": passed,
             "tasks_failed": len({task for task, _ in seen}), "pairs": len(pairs),
             "generation_seconds": generation_s}
    return pairs, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tier", choices=sorted(quality.TIERS), default="easy")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--spec", default='{"dpo": {}}', help="the DPO round's TrainingSpec as JSON")
    parser.add_argument("--after-sft", default=None, metavar="SPEC",
                        help="first a supervised round on the references with this TrainingSpec (JSON)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--resample", action="store_true")
    args = parser.parse_args()

    train_file, heldout = quality.TIERS[args.tier]
    pairs_file = RESULTS / f"preference-pairs-{args.tier}.jsonl"
    report_file = RESULTS / "quality-preference-smollm2.json"
    name = args.name or f"dpo{'-after-sft' if args.after_sft else ''}"
    report = quality.rounds_report(report_file, name)
    if report is None:
        return
    if args.resample or not pairs_file.is_file():
        settings = SamplingSpec(n=args.n, temperature=args.temperature, max_tokens=256, prompt_style="chat")
        t0 = time.monotonic()
        pairs, stats = failure_pairs(args.model_dir, train_file, settings)
        stats.update(n=args.n, temperature=args.temperature, wall_seconds=time.monotonic() - t0)
        pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        report["sampling"] = stats
        report_file.write_text(json.dumps(report, indent=1))
    pairs_count = sum(1 for line in pairs_file.read_text().splitlines() if line.strip())
    print(f"pairs: {pairs_count}; {report.get('sampling')}", flush=True)

    round_: dict[str, Any] = {"name": name, "pairs": pairs_count}
    scoring = SamplingSpec(max_tokens=256, prompt_style="chat")  # greedy, as bench/quality.py scores a round
    with tempfile.TemporaryDirectory(prefix="preference-") as tmp:
        sft_adapter = None
        if args.after_sft:
            sft_spec = TrainingSpec(**json.loads(args.after_sft))
            sft_adapter = Path(tmp) / "sft"
            print(f"{name}: supervised round first, {quality.describe_spec(sft_spec)}", flush=True)
            round_["sft_spec"] = quality.describe_spec(sft_spec)
            round_["sft_training"] = quality.train(args.model_dir, sft_spec, train_file, sft_adapter, f"{name}-sft")
            round_["sft_heldout"] = quality.evaluate(args.model_dir, sft_adapter, str(heldout), scoring,
                                                     general_loss=True)
            print(f"  after the supervised round: held-out {round_['sft_heldout']['passed']}/"
                  f"{round_['sft_heldout']['tasks']}", flush=True)
        spec = TrainingSpec(**json.loads(args.spec))
        adapter = Path(tmp) / "adapter"
        print(f"{name}: {pairs_count} pairs, {quality.describe_spec(spec)}, beta {spec.dpo and spec.dpo.beta}",
              flush=True)
        trained = quality.train(args.model_dir, spec, pairs_file, adapter, name, init_adapter=sft_adapter)
        held = quality.evaluate(args.model_dir, adapter, str(heldout), scoring, general_loss=True)
    print(f"  {trained['steps']} steps, final loss {trained['final_loss']:.3f}; held-out {held['passed']}/"
          f"{held['tasks']}, general loss {held['general_loss']:.4f}", flush=True)
    round_.update(spec=quality.describe_spec(spec), beta=spec.dpo.beta if spec.dpo else None, training=trained,
                  heldout=held)
    report["rounds"].append(round_)
    report_file.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
