"""QLoRA training throughput: the paper's snippet as a user would write it vs Tuneforge's LoraRecipe.

Both arms train the same base model on the same JSONL data, in the same example order, for the
same number of optimizer steps, each in a fresh subprocess (so peak memory is per arm):

  (a) baseline: Trainer + peft + BitsAndBytesConfig (4-bit NF4, double quant, bf16 compute) +
      prepare_model_for_kbit_training with its defaults (which turn gradient checkpointing on) +
      DataCollatorForLanguageModeling(mlm=False), padding to the longest example of the batch, and
      the paper's TrainingArguments (batch 1 x accumulation 8, lr 2e-4, cosine, warmup 0.05,
      paged_adamw_8bit, bf16 where the device has it, else fp16 on GPU / fp32 on CPU);
  (b) tuneforge: LoraRecipe with the default TrainingSpec (the same paper settings) and max_steps;
  optionally (c) tuneforge-gc: the same with training.gradient_checkpointing = true, the setting
      that trades speed for the baseline's activation memory.

Prints for each: real tokens/s (padding not counted), peak memory, training wall time, final
training loss; then the ratios to the baseline, and the largest per-step loss difference (all arms
see the same batches). Writes bench/results/train_throughput-<model>-<device>.json describing the
machine.

    .venv/bin/python bench/train_throughput.py --model 30m [--steps 16] [--repeats 3]
        [--arms baseline,tuneforge,tuneforge-gc]
    .venv/bin/python bench/train_throughput.py --model smollm2 [--model-dir DIR] [--repeats 2]

Models (random weights, a Llama shape, the tiny byte-level BPE tokenizer of worker/training/tiny.py,
vocabulary 4096): tiny (1.5M), 30m (hidden 512, 8 layers), and on a GPU 1b (TinyLlama-1.1B shape)
and 7b (Llama-2-7B shape); 1b/7b are skipped without CUDA. Models are built once under
--cache-dir. Data: --examples records of plain Python source from the standard library, lengths
drawn log-uniformly from 50 to 1,000 tokens (deterministic for --seed). With random weights the
loss starts near ln(4096) = 8.3 and LoRA moves it little in a few steps, so "final loss within 2%"
is a weak check; the per-step loss difference between arms is the strong one.

smollm2 is the real model, SmolLM2-135M-Instruct (vocabulary 49,152), from the directory
`tuneforge models fetch smollm2-135m-instruct` converts it into (--model-dir, default
ensure_smollm2(--data-dir), which only converts when that directory is missing). Its data is the
bundled code tasks (tuneforge/data/code_tasks_train.jsonl) laid out through the model's chat
template as plain text records, 127-298 tokens each (median 175): the rows a default job on the code tasks
trains on. Both arms train on every token of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Llama shapes. tiny is worker/training/tiny.py's default; 1b is TinyLlama-1.1B's shape, 7b Llama-2-7B's.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 2, "num_heads": 4},
    "30m": {"hidden_size": 512, "intermediate_size": 1408, "num_layers": 8, "num_heads": 8},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_layers": 22, "num_heads": 32,
           "num_key_value_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_layers": 32, "num_heads": 32},
}
GPU_ONLY = {"1b", "7b"}
# Pretrained models, converted once into a directory (not built from a shape).
REAL_MODELS = {"smollm2"}
DEFAULT_STEPS = {"tiny": 30, "30m": 16, "1b": 30, "7b": 20, "smollm2": 8}
CODE_TASKS = ROOT / "tuneforge" / "data" / "code_tasks_train.jsonl"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAX_LENGTH = 1024
# Dense bf16 peak FLOP/s by GPU name (vendor datasheets, no sparsity), for MFU.
GPU_BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                 ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12)]


# ---- machine, model, data (parent process) ----------------------------------------------------


def machine() -> dict[str, Any]:
    import peft  # noqa: F401  (imported so that describe() reports its version)
    import torch
    import transformers  # noqa: F401

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    from bench.machine import describe

    gpu_memory = (round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                  if torch.cuda.is_available() else None)
    return describe(gpu_memory_gib=gpu_memory,
                    cpu_bf16=bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()))


def build_model(name: str, cache_dir: Path) -> Path:
    """The model's folder under cache_dir, built on first use (random weights, seed 0)."""
    import torch
    from worker.training.tiny import make_tiny_model, make_tokenizer

    shape = MODELS[name]
    path = cache_dir / f"model-{name}"
    marker = path / "bench-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return path
    tokenizer_dir = cache_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        make_tokenizer(tokenizer_dir)
    big = name in GPU_ONLY
    make_tiny_model(path, tokenizer_from=tokenizer_dir, seed=0, **shape,
                    dtype="bfloat16" if big else "float32", device="cuda" if big else "cpu")
    if big:
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(shape))
    return path


def smollm2_dir(model_dir: Path | None, data_dir: Path | None) -> Path:
    """The converted SmolLM2-135M-Instruct directory: model_dir, or ensure_smollm2's under data_dir
    (default: the settings' data_dir)."""
    if model_dir is not None:
        return model_dir
    from worker.base_models.packaged import ensure_smollm2

    if data_dir is None:
        from app.core.config import get_settings

        data_dir = get_settings().data_dir
    return ensure_smollm2(data_dir)


def model_shape(model_dir: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size}


def parameter_count(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def make_data(model_dir: Path, out: Path, n: int, seed: int) -> dict[str, Any]:
    """n {"text": ...} records of consecutive stdlib source lines, about 50-1,000 tokens each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    lines: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            lines += path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        if len(lines) > 400_000:
            break
    rng = random.Random(seed)
    records, lengths = [], []
    for _ in range(n):
        # log-uniform: many short examples, most tokens in long ones, as in code-task datasets.
        target = int(math.exp(rng.uniform(math.log(50), math.log(1000))))
        start = rng.randrange(len(lines) - 2000)
        text, count, i = "", 0, start
        while count < target:
            count += len(tokenizer(lines[i], add_special_tokens=False)["input_ids"])
            text += lines[i]
            i += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: 1000 - 1]  # + eos = at most 1,000
        text = tokenizer.decode(ids)
        records.append({"text": text})
        lengths.append(len(ids) + 1)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"examples": n, "tokens": sum(lengths), "min_tokens": min(lengths), "max_tokens": max(lengths),
            "median_tokens": int(statistics.median(lengths))}


def make_task_data(model_dir: Path, out: Path, n: int) -> dict[str, Any]:
    """The first n bundled code tasks as {"text": ...} records: each laid out as the recipe lays a code
    task out for this model (its chat template), without the final eos, which both arms append."""
    from transformers import AutoTokenizer

    from worker.training.data import format_record, prompt_style_for

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    style = prompt_style_for(tokenizer, "auto")
    tasks = [json.loads(line) for line in CODE_TASKS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n > len(tasks):
        raise SystemExit(f"--examples {n}: there are {len(tasks)} code tasks; use fewer steps or examples")
    records, lengths = [], []
    for task in tasks[:n]:
        # The template ends the turn with eos and a newline; both arms append the eos themselves.
        text = format_record(task, tokenizer, style).rstrip("\n").removesuffix(tokenizer.eos_token)
        records.append({"text": text})
        lengths.append(len(tokenizer(text + tokenizer.eos_token)["input_ids"]))
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"examples": n, "tokens": sum(lengths), "min_tokens": min(lengths), "max_tokens": max(lengths),
            "median_tokens": int(statistics.median(lengths)), "source": f"{CODE_TASKS.name} ({style} layout)"}


# ---- the two arms (child processes) ------------------------------------------------------------


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_baseline(model_dir: Path, data: Path, steps: int, work: Path) -> dict[str, Any]:
    """The paper's snippet, as a user would write it with Trainer and peft."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForLanguageModeling, Trainer, TrainingArguments)

    cuda = torch.cuda.is_available()
    bf16 = torch.cuda.is_bf16_supported() if cuda else bool(torch.cpu._is_avx512_bf16_supported())
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config,
                                                 device_map="auto" if cuda else None)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=TARGET_MODULES, lora_dropout=0.05,
                                             bias="none", task_type="CAUSAL_LM"))
    dataset = load_dataset("json", data_files=str(data), split="train")
    dataset = dataset.map(lambda batch: tokenizer([t + tokenizer.eos_token for t in batch["text"]],
                                                  truncation=True, max_length=MAX_LENGTH),
                          batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=1, gradient_accumulation_steps=8, num_train_epochs=4,
        max_steps=steps, learning_rate=2e-4, bf16=bf16, fp16=cuda and not bf16, save_total_limit=3,
        logging_steps=1, optim="paged_adamw_8bit", lr_scheduler_type="cosine", warmup_steps=0.05,
        use_cpu=not cuda, report_to="none", disable_tqdm=True,
        # Measurement only: count real tokens, and draw the same example order as the recipe (seed 42).
        include_num_input_tokens_seen="non_padding", data_seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "tokens": trainer.state.num_input_tokens_seen, "wall_s": wall, "losses": losses,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "setup": {"quantization": "nf4-double-quant", "precision": "bf16" if bf16 else ("fp16" if cuda else "fp32"),
                  "gradient_checkpointing": bool(model.base_model.model.is_gradient_checkpointing),
                  "optimizer": "paged_adamw_8bit", "micro_batch": 1, "accumulation": 8, "packing": False},
    }


def run_tuneforge(model_dir: Path, data: Path, steps: int, work: Path, *,
                  gradient_checkpointing: bool = False) -> dict[str, Any]:
    """LoraRecipe with the default spec, stopped after `steps` optimizer steps."""
    import torch
    from app.domains.jobs.spec import TrainingSettings, TrainingSpec
    from worker.training.recipe import LoraRecipe

    class Hooks:
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.messages: list[str] = []

        def on_event(self, type: str, message: str, data: dict[str, Any] | None) -> None:
            if type == "metrics" and data and "loss" in data:
                self.losses.append(data["loss"])
            elif type == "message":
                self.messages.append(message)

        def should_stop(self) -> bool:
            return False

        def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
            """The benchmark keeps no checkpoints (its runs are shorter than the default interval)."""

    hooks = Hooks()
    spec = TrainingSpec(training=TrainingSettings(max_steps=steps, gradient_checkpointing=gradient_checkpointing))
    recipe = LoraRecipe(spec=spec, base_model_path=model_dir, train_file=data, validation_file=None,
                        work_dir=work, hooks=hooks)
    recipe.setup()
    result = recipe.train()
    recipe.cleanup()
    return {
        "tokens": result.trained_tokens, "wall_s": result.wall_seconds, "losses": hooks.losses,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "recipe_peak_bytes": result.peak_memory_bytes,
        "setup": {"quantization": result.quantization, "precision": result.precision,
                  "gradient_checkpointing": result.gradient_checkpointing, "optimizer": result.optimizer,
                  "micro_batch": result.micro_batch_size, "accumulation": result.gradient_accumulation_steps,
                  "packing": result.packing, "attention": result.attention},
        "messages": hooks.messages,
    }


ARMS = {
    "baseline": run_baseline,
    "tuneforge": run_tuneforge,
    "tuneforge-gc": lambda *args: run_tuneforge(*args, gradient_checkpointing=True),
}


def child(arm: str, model_dir: Path, data: Path, steps: int, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-{arm}-") as work:
        result = ARMS[arm](model_dir, data, steps, Path(work))
    result["peak_rss_bytes"] = _peak_rss_bytes()
    out.write_text(json.dumps(result))


# ---- parent: run both, compare, report --------------------------------------------------------


def run_arm(arm: str, model_dir: Path, data: Path, steps: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{arm}.json"
    cmd = [sys.executable, __file__, "--child", arm, "--model-dir", str(model_dir), "--data", str(data),
           "--steps", str(steps), "--child-out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{arm} arm failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    result["tokens_per_s"] = result["tokens"] / result["wall_s"]
    # On GPU the memory that matters is the device's; on CPU the process's resident set.
    result["peak_bytes"] = (result["gpu_peak_bytes"] if result["gpu_peak_bytes"] is not None
                            else result["peak_rss_bytes"])
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each measure (one run: that run)."""
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)
    return {"tokens": runs[0]["tokens"], "tokens_per_s": med("tokens_per_s"), "peak_bytes": med("peak_bytes"),
            "wall_s": med("wall_s"), "final_loss": runs[0]["losses"][-1], "losses": runs[0]["losses"],
            "setup": runs[0]["setup"], "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted([*MODELS, *REAL_MODELS]), default="30m")
    ap.add_argument("--steps", type=int, help="optimizer steps per arm (default: per model, see DEFAULT_STEPS)")
    ap.add_argument("--examples", type=int, help="training records (default: 2 x steps x 8, so no epoch ends)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per arm, interleaved a b a b; medians reported")
    ap.add_argument("--arms", default="baseline,tuneforge",
                    help=f"comma-separated, baseline first; among {', '.join(ARMS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "tuneforge-bench")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/train_throughput-<model>-<dev>.json)")
    ap.add_argument("--model-dir", type=Path,
                    help="--model smollm2: the converted model directory (default: ensure_smollm2(--data-dir))")
    ap.add_argument("--data-dir", type=Path, help="--model smollm2: Tuneforge's data dir (default: the settings')")
    ap.add_argument("--child", choices=sorted(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model_dir, a.data, a.steps, a.child_out)
        return

    import importlib.util

    import torch

    arms = a.arms.split(",")
    if arms[0] != "baseline" or len(arms) < 2 or any(arm not in ARMS for arm in arms):
        ap.error(f"--arms: baseline first, then one or more of {', '.join(a for a in ARMS if a != 'baseline')}")
    cuda = torch.cuda.is_available()
    if a.model in GPU_ONLY and not cuda:
        print(f"--model {a.model} needs a CUDA GPU (a {a.model} model does not train in useful time on CPU); "
              "skipped. On CPU use --model tiny or --model 30m.")
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("bitsandbytes is not installed; both arms load a 4-bit base: pip install bitsandbytes==0.50.2")
    steps = a.steps or DEFAULT_STEPS[a.model]
    n_examples = a.examples or 2 * steps * 8
    desc = machine()
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    real = a.model in REAL_MODELS
    model_dir = smollm2_dir(a.model_dir, a.data_dir) if real else build_model(a.model, a.cache_dir)
    shape = model_shape(model_dir) if real else MODELS[a.model]
    n_params = parameter_count(model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "train.jsonl"
        data_info = (make_task_data(model_dir, data, n_examples) if real
                     else make_data(model_dir, data, n_examples, a.seed))
        device = desc["gpu"] or f"cpu ({desc['cpu']}, {desc['cpus']} cores)"
        print(f"model {a.model}: {n_params / 1e6:.1f}M parameters, {'pretrained' if real else 'random weights'}; "
              f"device {device}; torch {desc['torch']}, transformers {desc['transformers']}, peft {desc['peft']}, "
              f"bitsandbytes {desc['bitsandbytes']}; load average {desc['load_average_1m']}")
        kind = data_info.get("source", "stdlib-source")
        print(f"data: {data_info['examples']} {kind} records, {data_info['min_tokens']}-"
              f"{data_info['max_tokens']} tokens (median {data_info['median_tokens']}); {steps} optimizer steps "
              f"x 8 examples per arm; {a.repeats} run(s) per arm, interleaved")
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        for _ in range(a.repeats):
            for arm in arms:
                runs[arm].append(run_arm(arm, model_dir, data, steps, tmp))
                r = runs[arm][-1]
                print(f"  {arm:12s} run: {r['tokens_per_s']:8.0f} tok/s  {r['peak_bytes'] / 2**20:7.0f} MiB  "
                      f"{r['wall_s']:7.1f} s  loss {r['losses'][-1]:.4f}", flush=True)
    summary = {arm: summarize(rs) for arm, rs in runs.items()}
    base = summary["baseline"]
    ratios: dict[str, dict[str, float]] = {}
    step_diffs: dict[str, float] = {}
    for arm in arms[1:]:
        s = summary[arm]
        if s["tokens"] != base["tokens"]:
            print(f"WARNING: {arm} trained on {s['tokens']} tokens, the baseline on {base['tokens']}")
        ratios[arm] = {
            "tokens_per_s": s["tokens_per_s"] / base["tokens_per_s"],
            "peak_memory": s["peak_bytes"] / base["peak_bytes"],
            "wall_s": s["wall_s"] / base["wall_s"],
            "final_loss": s["final_loss"] / base["final_loss"],
        }
        step_diffs[arm] = max(abs(x - y) for x, y in zip(base["losses"], s["losses"], strict=True))
    mfu = None
    if cuda:
        peak = next((f for key, f in GPU_BF16_PEAK if key in (desc["gpu"] or "")), None)
        if peak:
            mfu = {arm: 4 * n_params * s["tokens_per_s"] / peak for arm, s in summary.items()}

    memory_kind = "GPU max allocated in training" if cuda else "process peak RSS (model loading included)"
    print()
    print(f"{'':20s}{'real tok/s':>11s}{'peak MiB':>10s}{'train s':>9s}{'final loss':>12s}"
          + (f"{'MFU':>8s}" if mfu else "") + "   (median of runs)")
    for arm, s in summary.items():
        print(f"{arm:20s}{s['tokens_per_s']:11.0f}{s['peak_bytes'] / 2**20:10.0f}{s['wall_s']:9.1f}"
              f"{s['final_loss']:12.4f}" + (f"{mfu[arm]:8.1%}" if mfu else ""))
    for arm, r in ratios.items():
        print(f"{arm + ' / baseline':20s}{r['tokens_per_s']:10.2f}x{r['peak_memory']:9.2f}x{r['wall_s']:8.2f}x"
              f"{r['final_loss']:12.4f}")
    if a.repeats > 1:
        for arm, rs in runs.items():
            print(f"{arm:12s} tok/s per run: " + ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs))
    print(f"peak memory: {memory_kind}; {base['tokens']:,} real tokens per arm")
    print("per-step training loss, same batches in every arm: first step " +
          ", ".join(f"{arm} {s['losses'][0]:.4f}" for arm, s in summary.items()) + "; max |arm - baseline| " +
          ", ".join(f"{arm} {d:.4f}" for arm, d in step_diffs.items()))
    if a.repeats > 1:
        own = max(abs(x - y) for r in runs["baseline"][1:]
                  for x, y in zip(runs["baseline"][0]["losses"], r["losses"], strict=True))
        print(f"for scale: the baseline's own runs differ per step by up to {own:.4f} (it is not deterministic)")
    for arm, s in summary.items():
        print(f"{arm:12s} ran: " + ", ".join(f"{k} {v}" for k, v in s["setup"].items()))
    r = ratios["tuneforge"] if "tuneforge" in ratios else next(iter(ratios.values()))
    checks = {
        "tokens_per_s >= 1.5x": r["tokens_per_s"] >= 1.5,
        "final loss within 2%": abs(r["final_loss"] - 1) <= 0.02,
        "peak memory <= baseline": r["peak_memory"] <= 1.0,
    }
    print("targets (tuneforge vs baseline): " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}"
                                                         for k, ok in checks.items()))

    from bench.machine import write_report

    for s in summary.values():
        for run in s["runs"]:
            run.pop("messages", None)
    out = write_report(f"train_throughput-{a.model}-{'cuda' if cuda else 'cpu'}", {
        "benchmark": "train_throughput", "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": desc,
        "model": {"name": a.model, "parameters": n_params, **shape, **({"path": str(model_dir)} if real else {})},
        "data": data_info, "load_average_1m_after": round(os.getloadavg()[0], 2),
        "steps": steps, "repeats": a.repeats, "memory_measure": memory_kind, "arms": summary,
        "ratios_to_baseline": ratios, "mfu": mfu, "max_step_loss_diff": step_diffs, "targets": checks,
    }, out=a.out)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
