"""The 4-bit (QLoRA) path on CPU: correct gradients, odd layer sizes, training, adapter round trip.

bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights on the first no-grad eval
forward; after that LoRA gradients are silently wrong and layers whose output size is not a
multiple of 32 fail (STACK-NOTES). worker.training.model.load_base turns the repacking off;
these tests fail without that (on such a CPU) and pass with it. Models are built once per module.
"""

from __future__ import annotations

import math
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.domains.jobs.spec import LoraSpec, QuantizationSpec, TrainingSettings, TrainingSpec
from tests.worker.test_training_recipe import RecordingHooks, code_task_records, same_random_lora, write_jsonl
from worker.training.model import load_base, lora_config
from worker.training.recipe import LoraRecipe
from worker.training.tiny import make_tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU kernels of bitsandbytes")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def odd_path(tmp_path_factory, tiny_path) -> Path:
    # Every projection's output size (120, 200) is not a multiple of 32; head_dim is 30.
    return make_tiny_model(tmp_path_factory.mktemp("odd"), hidden_size=120, intermediate_size=200, num_heads=4,
                           tokenizer_from=tiny_path)


def _dequantized_reference(path: Path, quantized: torch.nn.Module) -> torch.nn.Module:
    """The fp32 model with each 4-bit layer's weight replaced by that layer's dequantized weight."""
    reference = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(weight.float())
    return reference


def _lora_gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("compute_dtype, tolerance", [("fp32", 1e-4), ("bf16", 0.06)])
@pytest.mark.parametrize("model_name", ["tiny", "odd"])
def test_lora_gradients_on_4bit_base_match_dequantized_reference_after_generate(
    request, model_name, compute_dtype, tolerance
):
    path = request.getfixturevalue(f"{model_name}_path")
    quant = QuantizationSpec(compute_dtype=compute_dtype)
    quantized = load_base(path, quant, "cpu")
    reference = _dequantized_reference(path, quantized)
    lora = lora_config(LoraSpec(dropout=0.0))
    q_model, r_model = get_peft_model(quantized, lora), get_peft_model(reference, lora)
    same_random_lora(q_model, r_model)

    ids = torch.randint(5, 4000, (1, 48), generator=torch.Generator().manual_seed(1))
    q_model.eval()
    with torch.no_grad():
        q_model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # the call that used to repack
    q_model.train(), r_model.train()

    got, expected = _lora_gradients(q_model, ids), _lora_gradients(r_model, ids)
    assert got.keys() == expected.keys() and len(got) == 2 * 4 * 2  # A and B of q/k/v/o in 2 layers
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        error = ((grad - expected[name]).norm() / expected[name].norm()).item()
        assert error < tolerance, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("bits", [4, 8])
def test_short_training_on_a_quantized_base_lowers_the_loss(tiny_path, tmp_path, bits):
    train_file = write_jsonl(tmp_path / "train.jsonl", code_task_records(8, seed=5))
    spec = TrainingSpec(quantization=QuantizationSpec(bits=bits), seed=7, training=TrainingSettings(
        max_steps=10, gradient_accumulation_steps=1, learning_rate=3e-3, max_seq_length=128))
    hooks = RecordingHooks()
    recipe = LoraRecipe(spec=spec, base_model_path=tiny_path, train_file=train_file, validation_file=None,
                        work_dir=tmp_path / "work", hooks=hooks)
    recipe.setup()
    result = recipe.train()
    recipe.cleanup()
    losses = [m["loss"] for m in hooks.train_metrics()]
    assert result.quantization == ("nf4-double-quant-dequantized-bf16" if bits == 4 else "int8")
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_adapter_from_a_4bit_run_reloads_on_a_4bit_base_with_the_logits_of_training_end(odd_path, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", code_task_records(8, seed=6))
    spec = TrainingSpec(seed=7, training=TrainingSettings(max_steps=4, gradient_accumulation_steps=1,
                                                          learning_rate=3e-3, max_seq_length=128))
    recipe = LoraRecipe(spec=spec, base_model_path=odd_path, train_file=train_file, validation_file=None,
                        work_dir=tmp_path / "work", hooks=RecordingHooks())
    recipe.setup()
    recipe.train()
    tokenizer = AutoTokenizer.from_pretrained(odd_path, local_files_only=True)
    ids = torch.tensor([tokenizer("def add_3(x):\n    return x +")["input_ids"]])
    trained = recipe.model
    trained.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        end_of_training = trained(input_ids=ids).logits.float()
    recipe.save(tmp_path / "adapter")
    recipe.cleanup()

    base = load_base(odd_path, spec.quantization, "cpu")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        served = reloaded(input_ids=ids).logits.float()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    # Training held the residual stream in bf16 (dequantized.frozen_to_compute_dtype), serving holds it in
    # fp32: a few bf16 ulps apart. Without the adapter the logits are far further apart than that.
    gap = (served - end_of_training).abs().max().item()
    assert gap < 1e-2, gap
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), reloaded.disable_adapter():
        base_only = reloaded(input_ids=ids).logits.float()
    assert (base_only - served).abs().max().item() > 5 * gap  # the adapter is what makes them equal
