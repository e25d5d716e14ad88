"""Single training arms on the real model, each scored on the held-out tasks: the settings that
bench/quality.py's loop does not try (other training files, ranks, rates, epochs, 16-bit).

Each arm is a TrainingSpec (as JSON, the spec's own field names) plus the bundled training file it
trains on; it is trained with Tuneforge's recipe (quality.train) and scored greedy on the 60 held-out
tasks with the general-text loss (quality.evaluate), as a round of bench/quality.py is. Arms already
in the results file are skipped, so a list can be run over several invocations.

    .venv/bin/python bench/quality_arms.py --model-dir DIR '[{"name": "qkvo-1-epoch-16bit",
        "quantization": {"bits": null}, "training": {"epochs": 1}}, ...]'

"train" in an arm names a file under tuneforge/data, or a list of them trained on together (default:
the --tier's training file), and the arm is scored on the --tier's held-out file (easy, the default,
or pool: see bench/quality.py). Prints one line per arm and writes bench/results/quality-arms-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.domains.evaluations.spec import SamplingSpec  # noqa: E402
from app.domains.jobs.spec import TrainingSpec  # noqa: E402
from bench import quality  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quality-arms-smollm2.json"


def training_file(names: str | list[str], joined: Path) -> Path:
    """The bundled training file `names` names, or several of them written one after another to `joined`."""
    if isinstance(names, str):
        return quality.DATA / names
    joined.parent.mkdir(parents=True, exist_ok=True)
    joined.write_text("".join((quality.DATA / n).read_text() for n in names))
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", help="a JSON list of arms: {name, train?, ...TrainingSpec fields}")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tier", choices=sorted(quality.TIERS), default="easy")
    parser.add_argument("--adapters", type=Path, default=None, help="keep the adapters here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    adapters = args.adapters or Path(tempfile.mkdtemp(prefix="quality-arms-"))
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    settings = SamplingSpec(max_tokens=256, prompt_style="chat")
    for arm in json.loads(args.arms):
        name = arm.pop("name")
        if any(r["name"] == name for r in results):
            continue
        default_train, heldout = quality.TIERS[args.tier]
        train = arm.pop("train", None)
        train_file = training_file(train, adapters / f"{name}.jsonl") if train is not None else default_train
        spec = TrainingSpec(**arm)
        adapter = adapters / name
        train_names = train if isinstance(train, list) else train_file.name
        print(f"{name}: {quality.describe_spec(spec)} on {train_names}", flush=True)
        trained = quality.train(args.model_dir, spec, train_file, adapter, name)
        held = quality.evaluate(args.model_dir, adapter, str(heldout), settings, general_loss=True)
        print(f"  {trained['steps']} steps, final loss {trained['final_loss']:.3f}, "
              f"{trained['tokens_per_second']:.0f} tokens/s; held-out {held['passed']}/{held['tasks']} "
              f"{held['passed_ids']}, general loss {held['general_loss']:.4f}", flush=True)
        results.append({"name": name, "cfg": arm, "train": train_names, "heldout_file": heldout.name,
                        "training": trained, "heldout": held})
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
