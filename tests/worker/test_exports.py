"""Exports on the tiny model: the merged model computes base + adapter, and the GGUF file reads back
through transformers' GGUF loader with the same logits, within what its precision allows."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.export.gguf_writer import write_gguf
from worker.export.merge import merged_model, tokenizer_for, write_merged
from worker.training.tiny import make_tiny_model

# Tolerances, as |logit difference| over the logits' range (max |logit|, about 1 here), largest and
# mean over 2 x 32 positions x 4096 logits: f16 keeps 11 significant bits, so each weight moves by at
# most 2^-11 of itself (~5e-4), ~1e-3 through two layers; q8_0 keeps 8 bits per value against a
# per-32-block scale, an error of up to 1/254 of the block's largest value (~4e-3) per weight, which
# reaches ~5e-2 at the worst of 262,144 logits and ~5e-3 on average (measured: 5.3e-2 and 3e-3). A
# GGUF with q/k rows in the wrong order, or without the adapter, is off by as much as the logits.
TOLERANCES = {"f16": (3e-3, 5e-4), "q8_0": (1e-1, 1e-2)}


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """The tiny base, an adapter on it with random (non-zero) B weights, and the base + adapter model."""
    root = tmp_path_factory.mktemp("exports")
    base = make_tiny_model(root / "tiny")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.eval()
    model.save_pretrained(root / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "adapter")
    return base, root / "adapter", model


def _ids() -> torch.Tensor:
    return torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(1))


def test_merged_model_logits_equal_base_plus_adapter(lora, tmp_path):
    base, adapter, peft_model = lora
    out = write_merged(base, adapter, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        expected, got, base_only = peft_model(_ids()).logits, merged(_ids()).logits, plain(_ids()).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert (base_only - expected).abs().max() > 1e-2  # the adapter changes the logits: the merge is not a no-op
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer("def f(x):").input_ids == AutoTokenizer.from_pretrained(base)(
        "def f(x):").input_ids


def test_merged_bfloat16_is_saved_in_bfloat16(lora, tmp_path):
    base, adapter, peft_model = lora
    out = write_merged(base, adapter, tmp_path / "merged", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        expected, got = peft_model(_ids()).logits, merged(_ids()).logits.float()
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_gguf_loads_back_through_transformers_with_the_same_logits(lora, tmp_path, quantization):
    base, adapter, peft_model = lora
    model = merged_model(base, adapter)
    tokenizer = tokenizer_for(base, adapter)
    path = write_gguf(model, tokenizer, tmp_path / f"model-{quantization}.gguf", quantization=quantization,
                      name="tiny")
    assert path.read_bytes()[:4] == b"GGUF"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        expected, got = peft_model(_ids()).logits, loaded(_ids()).logits
    scale, (largest, mean) = expected.abs().max(), TOLERANCES[quantization]
    error = (got - expected).abs()
    assert error.max() <= largest * scale and error.mean() <= mean * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "def add(a, b):\n    return a + b\n"
    assert back(text).input_ids == tokenizer(text).input_ids
    assert back.chat_template == tokenizer.chat_template


def test_gguf_refuses_a_model_that_is_not_llama(lora, tmp_path):
    from worker.export.gguf_writer import GGUFExportError

    base, adapter, _ = lora
    model = merged_model(base, adapter)
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(GGUFExportError, match="rope scaling"):
        write_gguf(model, tokenizer_for(base, adapter), tmp_path / "x.gguf", quantization="f16", name="x")


def test_merged_archive_extracts_to_a_loadable_directory(lora, tmp_path):
    base, adapter, _ = lora
    out = write_merged(base, adapter, tmp_path / "merged", dtype="float16")
    with tarfile.open(tmp_path / "m.tar.gz", "w:gz") as tar:
        tar.add(out, arcname=".")
    with tarfile.open(tmp_path / "m.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "x").iterdir()}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "x").dtype == torch.float16
