"""The cost of constrained decoding (llguidance, worker/inference/grammar.py) per generated token, in one
process on the tiny test model: the same batch of requests decoded unconstrained and with a JSON schema.

The schema (an object holding at least 100 short strings) never completes before max_tokens, so
both arms generate the same number of tokens and tokens/s compares like with like. Arms, interleaved, each
run `repeats` times after a warm-up, median reported:

    unconstrained   `requests` greedy requests submitted together (one batch)
    json_schema     the same, every row masked by its own matcher
    mixed           half of them constrained: masking costs only the rows that ask for it

    .venv/bin/python bench/structured_output.py [--requests 16] [--max-tokens 64] [--repeats 3]

On the shared 2-core CPU (tiny model, 16 x 64 tokens, median of 5): unconstrained 3,832 tokens/s,
json_schema 2,745 (0.72), mixed 3,052 (0.80). The tiny model's forward pass is ~0.3 ms per row, so the
mask (computed per row on the CPU, applied on the logits' device) weighs far more here than on a real model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False, "properties": {
    "items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 100}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "items", "schema": SCHEMA, "strict": True}}
PROMPTS = ("def fibonacci(n):", "import os\nclass Config:", "for i in range(10):", "# parse the arguments")


def _run(engine, requests: int, max_tokens: int, constrained: int) -> tuple[float, int]:
    """(tokens/s over the wall time of the batch, tokens generated)."""
    engine.pause()  # submit all, so they are admitted as one batch
    start = time.perf_counter()
    handles = [engine.submit(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0,
                             response_format=FORMAT if i < constrained else None) for i in range(requests)]
    engine.resume()
    tokens = sum(len(h.result().choices[0].token_ids) for h in handles)
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from worker.inference import InferenceEngine
    from worker.training.tiny import make_tiny_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_model(Path(tmp) / "tiny", corpus_bytes=1_000_000)
        with InferenceEngine(base, base_name="tiny", max_batch_size=max(32, args.requests)) as engine:
            arms = {"unconstrained": 0, "json_schema": args.requests, "mixed": args.requests // 2}
            for constrained in arms.values():  # warm-up: the first grammar builds llguidance's tokenizer
                _run(engine, args.requests, 8, constrained)
            runs: dict[str, list[float]] = {name: [] for name in arms}
            counts: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, constrained in arms.items():
                    rate, counts[name] = _run(engine, args.requests, args.max_tokens, constrained)
                    runs[name].append(rate)
    print(f"tiny model, {args.requests} requests in one batch, {args.max_tokens} tokens each, greedy, "
          f"{engine.device}, median of {args.repeats}")
    base_rate = statistics.median(runs["unconstrained"])
    for name, rates in runs.items():
        rate = statistics.median(rates)
        print(f"  {name:14s} {rate:9.0f} tokens/s  ({counts[name]} tokens)  ratio {rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
