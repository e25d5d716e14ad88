"""Generating completions for code tasks with a base model, optionally with a LoRA adapter, and
measuring its loss on a general held-out text (the forgetting check)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from app.domains.evaluations.spec import SamplingSpec
from worker.evaluation.harness import Sample

# Where a completion ends when the task format gives no stop sequences (HumanEval's usual ones).
STOPS = {
    "humaneval": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"),
    "mbpp": ("\nassert", "\nif __name__", "\nprint(", "\n\n\n"),
}


@dataclass(frozen=True)
class Prompt:
    task_id: str
    text: str
    format: str  # "humaneval" | "mbpp"


def _device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def load(base_path: Path, adapter_dir: Path | None):
    """(model, tokenizer) in eval mode: the base, with the adapter attached when given. The adapter's
    own tokenizer files are used when present (the chat template training used travels with it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = _device_and_dtype()
    tok_dir = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues the prompt's last token
    model = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=dtype).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval(), tokenizer


def truncate(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for s in stops if (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


def generate(model, tokenizer, prompts: list[Prompt], settings: SamplingSpec, *, batch_size: int = 16,
             seed: int = 0) -> tuple[list[Sample], float]:
    """settings.n completions per prompt, cut at the stop sequences. Returns (samples, seconds)."""
    import torch

    torch.manual_seed(seed)
    start = time.monotonic()
    samples: list[Sample] = []
    sampling = settings.temperature > 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        enc = tokenizer([p.text for p in batch], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=settings.max_tokens, do_sample=sampling,
                temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
                num_return_sequences=settings.n, pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[:, enc["input_ids"].shape[1]:]  # (batch * n, <= max_tokens)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for j, text in enumerate(texts):
            prompt = batch[j // settings.n]
            stops = settings.stop or STOPS[prompt.format]
            samples.append(Sample(task_id=prompt.task_id, completion=truncate(text, stops),
                                  completion_id=j % settings.n))
    return samples, time.monotonic() - start


def heldout_texts(count: int = 24, chars: int = 1200) -> list[str]:
    """General English text no code-task adapter trains on: Python's own help topics, which ship
    with every Python (pydoc_data), taken in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name][:chars] for name in sorted(topics)[:count]]


def heldout_loss(model, tokenizer, texts: list[str], max_length: int = 256) -> float:
    """Mean next-token loss (nats/token) over the texts."""
    import torch

    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        ids = ids.to(model.device)  # (1, seq)
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    return total / max(tokens, 1)
