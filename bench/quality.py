"""Does tuning make the real model better at writing code? The paper's claims, measured on SmolLM2-135M-Instruct.

One run, in this process, with Tuneforge's own training (LoraRecipe) and evaluation path (generate,
harness, the sandbox), greedy pass@1, chat prompts with the first fenced block run:

  1. the base model on a tier's held-out code tasks and on HumanEval (164), and its loss on general
     text (Python's help topics: the forgetting check). --tier easy (the default): the easy tier,
     code_tasks_easy_train.jsonl (110) and code_tasks_easy_heldout.jsonl (60), where a 135M model
     is neither at 0 nor at the ceiling; --tier pool: the beginner-level pool, code_tasks_train.jsonl
     (224) and code_tasks_heldout.jsonl (60), where it passes a few;
  2. round 1: the paper's recipe as Tuneforge's defaults (QLoRA 4-bit NF4, LoRA r=8 alpha 32 on
     q/k/v/o, lr 2e-4, 4 epochs, effective batch 8) on the tier's training tasks (none of them in
     its held-out split);
  3. the auto_iterate loop: while the target (--target, default base + 0.25 pass@1) is missed, the
     next round's settings come from jobs.iteration.adjust and its stop rule from iteration.decide,
     the functions a job's loop runs;
  4. HumanEval for round 1 and for the best round (forgetting: the tuned adapter on tasks it never
     trained on), and the best round's adapter on the 4-bit base (the cost of 4-bit).

Prints a table and writes bench/results/quality-smollm2[-pool][-16bit].json with every number and
setting.

    .venv/bin/python bench/quality.py [--tier easy|pool] [--model-dir DIR] [--rounds 3] [--target T]
        [--no-humaneval] [--heldout-limit N] [--max-tokens 256] [--out DIR] [--resume]

The report is saved after every stage (an evaluation, a round); --resume picks a run up where it
stopped, so the whole run can be spread over several invocations.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.domains.evaluations.spec import SamplingSpec  # noqa: E402
from app.domains.jobs import iteration  # noqa: E402
from app.domains.jobs.spec import AutoIterateSpec, TrainingSpec  # noqa: E402
from bench.machine import describe, write_report  # noqa: E402

DATA = ROOT / "tuneforge" / "data"
# The tiers' (training, held-out) files; see tuneforge/data/README.md.
TIERS = {"easy": (DATA / "code_tasks_easy_train.jsonl", DATA / "code_tasks_easy_heldout.jsonl"),
         "pool": (DATA / "code_tasks_train.jsonl", DATA / "code_tasks_heldout.jsonl")}


class _Hooks:
    """Training hooks that print progress every few steps and stop nothing."""

    def __init__(self, label: str) -> None:
        self.label = label

    def on_event(self, type: str, message: str, data: dict[str, Any] | None) -> None:
        if type == "metrics" and data and "loss" in data:
            step, total = data.get("step"), data.get("total_steps")
            if step and (step % 10 == 0 or step == total):
                print(f"    [{self.label}] step {step}/{total} loss {data['loss']:.3f}", flush=True)

    def should_stop(self) -> bool:
        return False

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """No periodic checkpoints are asked for."""


def evaluate(model_dir: Path, adapter: Path | None, tasks: str, settings: SamplingSpec, *,
             quantized: bool = False, general_loss: bool = False) -> dict[str, Any]:
    """Greedy pass@1 of base (+ adapter) on the tasks ("humaneval" or a JSONL path)."""
    from worker.evaluation import generate, harness, tasks_io
    from worker.evaluation.sandbox import Sandbox

    problems, prompts = tasks_io.named(tasks, settings.limit)
    start = time.monotonic()
    model, tokenizer = generate.load(model_dir, adapter, quantized=quantized)
    samples, generation_s = generate.generate(model, tokenizer, prompts, settings)
    out: dict[str, Any] = {}
    if general_loss:
        out["general_loss"] = generate.heldout_loss(model, tokenizer, generate.heldout_texts())
    del model
    gc.collect()
    score = harness.score(Sandbox(mode="auto"), samples, problems=problems, ks=(1,),
                          timeout_s=settings.timeout_seconds)
    passed = sum(r.passed for r in score.results)
    out.update(tasks=score.tasks, passed=passed, pass_at_1=score.pass_at_k[1], generation_seconds=generation_s,
               wall_seconds=time.monotonic() - start, passed_ids=sorted(r.task_id for r in score.results if r.passed))
    return out


def scored_answers(model_dir: Path, adapter: Path | None, tasks_file: Path, settings: SamplingSpec):
    """The model's settings.n answers to each task of tasks_file, run against the task's tests in the
    evaluation sandbox, as an evaluation runs them: (the tasks' records by id, harness.score's result,
    generation seconds). For the scripts that train on what the model answers (bench/self_training.py,
    bench/preference_training.py)."""
    from worker.evaluation import generate, harness, tasks_io
    from worker.evaluation.sandbox import Sandbox

    records = {t.task_id: t.record for t in tasks_io.read_tasks(tasks_file)}
    problems, prompts = tasks_io.named(str(tasks_file))
    model, tokenizer = generate.load(model_dir, adapter)
    samples, generation_s = generate.generate(model, tokenizer, prompts, settings)
    del model
    gc.collect()
    score = harness.score(Sandbox(mode="auto"), samples, problems=problems, ks=(1,),
                          timeout_s=settings.timeout_seconds)
    return records, score, generation_s


def train(model_dir: Path, spec: TrainingSpec, train_file: Path, adapter_dir: Path, label: str, *,
          init_adapter: Path | None = None) -> dict[str, Any]:
    """One training round with the recipe on train_file; the adapter is written to adapter_dir.
    init_adapter: an adapter on this base to train on from where it is (and, for DPO, the reference)."""
    from worker.training.recipe import LoraRecipe

    hooks = _Hooks(label)
    with tempfile.TemporaryDirectory(prefix="quality-") as work:
        recipe = LoraRecipe(spec=spec, base_model_path=model_dir, train_file=train_file, validation_file=None,
                            work_dir=Path(work), hooks=hooks, init_adapter=init_adapter)
        recipe.setup()
        result = recipe.train()
        recipe.save(adapter_dir)
        recipe.cleanup()
    gc.collect()
    return {"steps": result.steps, "trained_tokens": result.trained_tokens, "wall_seconds": result.wall_seconds,
            "tokens_per_second": result.tokens_per_second, "final_loss": result.final_loss,
            "quantization": result.quantization, "precision": result.precision}


def rounds_report(path: Path, name: str) -> dict[str, Any] | None:
    """The report of named rounds at path (bench/self_training.py, bench/preference_training.py), or a
    new one; None, after saying so, when it already holds a round called name."""
    report = json.loads(path.read_text()) if path.is_file() else {"machine": describe(), "rounds": []}
    if any(r["name"] == name for r in report["rounds"]):
        print(f"{name}: already in {path}")
        return None
    return report


def describe_spec(spec: TrainingSpec) -> dict[str, Any]:
    t, lora = spec.training, spec.lora
    return {"target_modules": list(lora.target_modules), "r": lora.r, "alpha": lora.alpha,
            "learning_rate": t.learning_rate, "epochs": t.epochs, "bits": spec.quantization.bits,
            "effective_batch": t.batch_size * t.gradient_accumulation_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="easy",
                        help="which bundled tasks to train and score on (default: easy)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the converted SmolLM2 directory (default: ensure_smollm2 under --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="auto_iterate's max_rounds")
    parser.add_argument("--target", type=float, default=None, help="pass@1 target (default: base + 0.25)")
    parser.add_argument("--no-humaneval", action="store_true")
    parser.add_argument("--heldout-limit", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="keep the adapters here (default: a temp dir)")
    parser.add_argument("--bits", choices=["4", "none"], default="4",
                        help="quantization of the base in training (4: QLoRA, the default; none: 16-bit LoRA, the "
                             "paper's comparison); the report is quality-smollm2[-16bit].json")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the stages the last run's report holds (same model and settings, adapters "
                             "still on disk); the report is written after every stage")
    args = parser.parse_args()

    from worker.base_models.packaged import ensure_smollm2

    if args.model_dir is None:
        data_dir = args.data_dir
        if data_dir is None:
            from app.core.config import get_settings
            data_dir = get_settings().data_dir
        args.model_dir = ensure_smollm2(data_dir)
    settings = SamplingSpec(max_tokens=args.max_tokens, prompt_style="chat", limit=args.heldout_limit)
    he_settings = SamplingSpec(max_tokens=args.max_tokens, prompt_style="chat")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="quality-adapters-"))
    train_file, heldout = TIERS[args.tier]
    identity = {"model_dir": str(args.model_dir), "max_tokens": args.max_tokens, "heldout_limit": args.heldout_limit,
                "bits": args.bits, "tier": args.tier, "train_file": train_file.name, "heldout_file": heldout.name}
    report: dict[str, Any] = {**identity, "rounds": [], "stage_seconds": {}}
    result = RESULTS / ("quality-smollm2" + ("-pool" if args.tier == "pool" else "")
                        + ("-16bit" if args.bits == "none" else "") + ".json")
    if args.resume and result.is_file():
        previous = json.loads(result.read_text()).get("report") or {}
        if all(previous.get(k) == v for k, v in identity.items()):
            report = previous
            report["rounds"] = [r for r in report["rounds"] if Path(r["adapter"]).is_dir()]
            print(f"resuming: {', '.join(report['stage_seconds'])}", flush=True)

    def stage(name: str, run):
        """run() once per report: its result is kept, with its wall time, and the report saved."""
        if name in report["stage_seconds"]:
            return
        t0 = time.monotonic()
        run()
        report["stage_seconds"][name] = time.monotonic() - t0
        save(report, result)

    def base_heldout() -> None:
        print("base model: held-out tasks", flush=True)
        base = evaluate(args.model_dir, None, str(heldout), settings, general_loss=True)
        print(f"  held-out pass@1 {base['pass_at_1']:.3f} ({base['passed']}/{base['tasks']}), "
              f"general loss {base['general_loss']:.4f}", flush=True)
        report["base"] = {"heldout": base}

    def base_humaneval() -> None:
        print("base model: HumanEval", flush=True)
        report["base"]["humaneval"] = evaluate(args.model_dir, None, "humaneval", he_settings)
        print(f"  HumanEval pass@1 {report['base']['humaneval']['pass_at_1']:.3f}", flush=True)

    stage("base heldout", base_heldout)
    if not args.no_humaneval:
        stage("base humaneval", base_humaneval)

    target = args.target if args.target is not None else round(report["base"]["heldout"]["pass_at_1"] + 0.25, 3)
    policy = AutoIterateSpec(target={"metric": "pass@1", "min": target}, max_rounds=args.rounds)
    spec, change = TrainingSpec(), "the paper's recipe (Tuneforge's defaults)"
    if args.bits == "none":
        spec, change = TrainingSpec(quantization={"bits": None}), "the paper's recipe on the 16-bit base (no 4-bit)"
    history: list[iteration.RoundResult] = []
    while True:
        n = len(history) + 1

        def train_round(n=n, spec=spec, change=change) -> None:
            adapter = out_dir / f"round-{n}"
            print(f"round {n}: {change}: {describe_spec(spec)}", flush=True)
            trained = train(args.model_dir, spec, train_file, adapter, f"round {n}")
            print(f"  trained {trained['steps']} steps, {trained['trained_tokens']:,} tokens in "
                  f"{trained['wall_seconds']:.0f} s ({trained['tokens_per_second']:.0f} tokens/s), "
                  f"final loss {trained['final_loss']:.3f}", flush=True)
            held = evaluate(args.model_dir, adapter, str(heldout), settings, general_loss=True)
            print(f"  held-out pass@1 {held['pass_at_1']:.3f} ({held['passed']}/{held['tasks']}), "
                  f"general loss {held['general_loss']:.4f}", flush=True)
            report["rounds"].append({"round": n, "change": change, "spec": describe_spec(spec),
                                     "training": trained, "heldout": held, "adapter": str(adapter)})

        if len(report["rounds"]) < n:
            report["stage_seconds"].pop(f"round {n}", None)
        stage(f"round {n}", train_round)
        score = report["rounds"][n - 1]["heldout"]["pass_at_1"]
        history.append(iteration.RoundResult(round=n, job_id=str(n), score=score))
        reason = iteration.decide(history, policy)
        if reason:
            break
        spec, change = iteration.adjust(spec, n + 1)
    top = iteration.best(history)
    assert top is not None
    report.update(stop_reason=reason, target=target, best_round=top.round)
    print(f"loop: {reason} after {len(history)} round(s); best round {top.round}", flush=True)

    for n in sorted({1, top.round}):
        entry = report["rounds"][n - 1]

        def humaneval(entry=entry) -> None:
            print(f"round {entry['round']}: HumanEval", flush=True)
            entry["humaneval"] = evaluate(args.model_dir, Path(entry["adapter"]), "humaneval", he_settings)
            print(f"  HumanEval pass@1 {entry['humaneval']['pass_at_1']:.3f}", flush=True)

        def four_bit(entry=entry) -> None:
            print(f"round {entry['round']}: held-out tasks on the 4-bit base", flush=True)
            entry["heldout_4bit"] = evaluate(args.model_dir, Path(entry["adapter"]), str(heldout), settings,
                                             quantized=True)
            print(f"  4-bit held-out pass@1 {entry['heldout_4bit']['pass_at_1']:.3f}", flush=True)

        if not args.no_humaneval:
            stage(f"round {n} humaneval", humaneval)
        stage(f"round {n} 4-bit", four_bit)
    report["wall_seconds"] = sum(report["stage_seconds"].values())
    print_table(report)
    print(f"\nwrote {save(report, result)}")


RESULTS = ROOT / "bench" / "results"


def save(report: dict[str, Any], path: Path) -> Path:
    return write_report(path.stem, describe(report=report), path)


def print_table(report: dict[str, Any]) -> None:
    base = report["base"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:5.1f}%"

    def he(entry: dict[str, Any]) -> float | None:
        return (entry.get("humaneval") or {}).get("pass_at_1")

    print("\n| | held-out pass@1 | HumanEval pass@1 | general loss | 4-bit held-out | tokens/s | train s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| base | {pct(base['heldout']['pass_at_1'])} ({base['heldout']['passed']}/{base['heldout']['tasks']}) "
          f"| {pct(he(base))} | {base['heldout']['general_loss']:.4f} | | | |")
    for r in report["rounds"]:
        h = r["heldout"]
        four = r.get("heldout_4bit")
        print(f"| round {r['round']}: {r['change']} | {pct(h['pass_at_1'])} ({h['passed']}/{h['tasks']}) "
              f"| {pct(he(r))} | {h['general_loss']:.4f} | {pct(four['pass_at_1']) if four else ''} "
              f"| {r['training']['tokens_per_second']:.0f} | {r['training']['wall_seconds']:.0f} |")
    first, best = report["rounds"][0], report["rounds"][report["best_round"] - 1]
    b = base["heldout"]["pass_at_1"]
    print(f"\nround 1 (paper defaults) vs base: {100 * (first['heldout']['pass_at_1'] - b):+.1f} points held-out "
          f"(target +10)")
    print(f"best round {best['round']} vs base: {100 * (best['heldout']['pass_at_1'] - b):+.1f} points held-out "
          f"(target +25; loop stop: {report['stop_reason']})")
    if he(base) is not None:
        for r in {id(x): x for x in (first, best)}.values():
            print(f"round {r['round']} HumanEval vs base: {100 * ((he(r) or 0) - he(base)):+.1f} points "
                  f"(no forgetting: >= 0)")
    for r in {id(x): x for x in (first, best)}.values():
        if r.get("heldout_4bit"):
            sixteen, four = r["heldout"]["pass_at_1"], r["heldout_4bit"]["pass_at_1"]
            rel = (sixteen - four) / sixteen if sixteen else 0.0
            print(f"round {r['round']} 4-bit vs 16-bit base: {100 * four:.1f}% vs {100 * sixteen:.1f}% "
                  f"({100 * rel:.1f}% relative lost; paper: at most 4%)")
    print(f"wall time {report['wall_seconds'] / 60:.1f} min (the stages' sum: "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in report["stage_seconds"].items()) + ")")


if __name__ == "__main__":
    main()
