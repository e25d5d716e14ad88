"""Fixtures for the inference engine tests: the tiny base model, LoRA adapters made on it with
peft (weights perturbed with a seeded generator so each adapter changes the output), and the
reference each engine output is checked against: peft alone, PeftModel.from_pretrained +
generate(do_sample=False), one adapter per model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from worker.inference import AdapterRef, InferenceEngine  # noqa: E402
from worker.training.tiny import make_tiny_model  # noqa: E402

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPTS = ("def fibonacci(n):", "import os\nclass Config:\n    def", "for i in range(10):")
MAX_TOKENS = 24


def make_adapter(base: Path | str, out: Path, *, seed: int, r: int = 8, targets=ATTENTION, alpha: int = 32,
                 config=None) -> Path:
    """Attach LoRA with peft to the base (or to a model built from `config`), set every LoRA weight from
    a seeded generator and save_pretrained it with the tokenizer, as a training job would."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM(config) if config is not None else AutoModelForCausalLM.from_pretrained(
        base, local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  lora_dropout=0.05, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(out)
    return out


@dataclass(frozen=True)
class Tiny:
    base: Path
    adapters: dict[str, Path]  # "a", "b" (r=8 attention), "c" (r=4 on q/v and the MLP's up_proj)

    def ref(self, name: str | None) -> AdapterRef | None:
        return None if name is None else AdapterRef(id=f"ad-{name}", path=self.adapters[name], base="tiny")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = tmp_path_factory.mktemp("inference")
    base = make_tiny_model(root / "tiny", corpus_bytes=1_000_000)
    adapters = {
        "a": make_adapter(base, root / "adapter-a", seed=1),
        "b": make_adapter(base, root / "adapter-b", seed=2),
        "c": make_adapter(base, root / "adapter-c", seed=3, r=4, alpha=16, targets=("q_proj", "v_proj", "up_proj")),
    }
    return Tiny(base=base, adapters=adapters)


class PeftReference:
    """Greedy tokens from peft alone: the base (or base + one adapter) loaded fresh, generate()."""

    def __init__(self, tiny: Tiny) -> None:
        from transformers import AutoTokenizer

        self.tiny = tiny
        self.tokenizer = AutoTokenizer.from_pretrained(tiny.base, local_files_only=True)
        self._cache: dict[tuple, list[int]] = {}

    def tokens(self, adapter: str | None, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        key = (adapter, prompt, max_tokens)
        if key not in self._cache:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.tiny.base, local_files_only=True)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, self.tiny.adapters[adapter])
            model.eval()
            enc = self.tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id)
            self._cache[key] = out[0, enc["input_ids"].shape[1]:].tolist()
        return self._cache[key]

    def text(self, adapter: str | None, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
        return self.tokenizer.decode(self.tokens(adapter, prompt, max_tokens), skip_special_tokens=True)


@pytest.fixture(scope="session")
def reference(tiny) -> PeftReference:
    return PeftReference(tiny)


@pytest.fixture
def make_engine(tiny) -> Iterator[Callable[..., InferenceEngine]]:
    """Engines on the tiny base (closed at teardown); keyword arguments as InferenceEngine's."""
    engines: list[InferenceEngine] = []

    def make(**kwargs) -> InferenceEngine:
        kwargs.setdefault("base_name", "tiny")
        engine = InferenceEngine(tiny.base, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
