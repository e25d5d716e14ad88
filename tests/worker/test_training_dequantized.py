"""Training on CPU computes a 4-bit base through layers dequantized once (worker.training.dequantized).

What must hold: the dequantized layers compute what bitsandbytes' 4-bit layers compute (the same
NF4-rounded weights, the same dtypes in and out), so logits, loss and LoRA gradients of the model
the recipe trains match those of the model on bitsandbytes' 4-bit layers; and a CPU job with the
default quantization trains that way and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training

from app.domains.jobs.spec import LoraSpec, QuantizationSpec, TrainingSettings, TrainingSpec
from tests.worker.test_training_recipe import RecordingHooks, code_task_records, same_random_lora, write_jsonl
from worker.training.dequantized import DequantizedLinear4bit, dequantize_4bit_layers
from worker.training.model import load_base, load_base_model, lora_config
from worker.training.ops import apply_chunked_loss, apply_lean_ops
from worker.training.recipe import LoraRecipe
from worker.training.tiny import make_tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU training path")


@pytest.fixture(scope="module")
def odd_path(tmp_path_factory) -> Path:
    # Output sizes 120 and 200 are not multiples of 32, head_dim is 30: bitsandbytes' awkward shapes.
    return make_tiny_model(tmp_path_factory.mktemp("odd"), hidden_size=120, intermediate_size=200, num_heads=4)


@pytest.mark.parametrize("compute_dtype", ["bf16", "fp32"])
def test_a_dequantized_layer_computes_exactly_what_its_4bit_layer_computes(odd_path, compute_dtype):
    quantized = load_base(odd_path, QuantizationSpec(compute_dtype=compute_dtype), "cpu")
    layers = [(name, m) for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    fast = load_base(odd_path, QuantizationSpec(compute_dtype=compute_dtype), "cpu")
    assert dequantize_4bit_layers(fast) == len(layers) == 2 * 7
    for name, layer in layers:
        replacement = fast.get_submodule(name)
        assert type(replacement) is DequantizedLinear4bit and not replacement.weight.requires_grad
        x = torch.randn(3, 17, layer.in_features, generator=torch.Generator().manual_seed(len(name)))
        outputs, grads = [], []
        for module in (layer, replacement):
            inp = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(inp)
            out.backward(torch.ones_like(out))
            outputs.append(out)
            grads.append(inp.grad)
        assert outputs[0].dtype == outputs[1].dtype == torch.float32
        assert torch.equal(outputs[0], outputs[1]), name
        assert torch.equal(grads[0], grads[1]), name


def _bitsandbytes_reference(path: Path, spec: TrainingSpec) -> torch.nn.Module:
    """load_base_model's model as it was before the CPU fast path: LoRA on bitsandbytes' 4-bit layers."""
    model = load_base(path, spec.quantization, "cpu")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    apply_lean_ops(model)
    apply_chunked_loss(model)
    return get_peft_model(model, lora_config(spec.lora))


def test_lora_on_the_dequantized_base_matches_lora_on_the_4bit_base(odd_path):
    spec = TrainingSpec(lora=LoraSpec(dropout=0.0))
    fast, _, info = load_base_model(odd_path, spec, "cpu")
    reference = _bitsandbytes_reference(odd_path, spec)
    assert info["dequantized_layers"] == 2 * 7
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in fast.modules())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reference.modules()) == 2 * 7
    same_random_lora(fast, reference)
    fast.train(), reference.train()
    for seed in range(3):
        ids = torch.randint(5, 4000, (2, 40), generator=torch.Generator().manual_seed(seed))
        results = []
        for model in (fast, reference):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits.float()
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((logits, loss.item(), grads))
        (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results
        # The fast path holds its residual stream in bf16 (frozen_to_compute_dtype): a few bf16 ulps apart.
        assert (logits - ref_logits).abs().max() <= 2e-2 * ref_logits.abs().max(), seed
        assert math.isclose(loss, ref_loss, rel_tol=1e-3), (loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * 2
        for name, grad in grads.items():
            error = ((grad - ref_grads[name]).norm() / ref_grads[name].norm()).item()
            assert error < 3e-2, f"{name}: relative gradient error {error:.2e}"  # bf16 residual: ~1.6e-2


def test_a_cpu_job_with_the_default_quantization_trains_on_the_dequantized_base_and_says_so(odd_path, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", code_task_records(8, seed=3))
    spec = TrainingSpec(seed=7, training=TrainingSettings(max_steps=3, gradient_accumulation_steps=1,
                                                          learning_rate=3e-3, max_seq_length=128))
    hooks = RecordingHooks()
    recipe = LoraRecipe(spec=spec, base_model_path=odd_path, train_file=train_file, validation_file=None,
                        work_dir=tmp_path / "work", hooks=hooks)
    recipe.setup()
    layers = [m for m in recipe.model.modules() if isinstance(m, DequantizedLinear4bit)]
    result = recipe.train()
    recipe.cleanup()
    # Training in bf16 where the CPU has it, else in fp32 with the bf16 weights held in fp32.
    held = torch.bfloat16 if result.precision == "bf16" else torch.float32
    assert len(layers) == 2 * 7 and all(layer.weight.dtype == held for layer in layers)
    assert result.quantization == "nf4-double-quant-dequantized-bf16"
    assert result.steps == 3 and math.isfinite(result.final_loss)
    messages = hooks.messages()
    assert any("quantization nf4-double-quant-dequantized-bf16" in m for m in messages)
    assert any("14 4-bit layers were then dequantized once to bf16" in m for m in messages)


def test_in_fp32_the_dequantized_weights_hold_their_bf16_values_in_fp32_and_train_close_to_bf16(odd_path, tmp_path):
    spec = TrainingSpec(lora=LoraSpec(dropout=0.0), training=TrainingSettings(precision="fp32"))
    held, _, info = load_base_model(odd_path, spec, "cpu")
    assert "are held in fp32 (the same values)" in " ".join(info["notes"])
    reference = load_base(odd_path, QuantizationSpec(), "cpu")
    dequantize_4bit_layers(reference)  # bf16, as bitsandbytes computes them
    layers = {name.removeprefix("base_model.model.").removesuffix(".base_layer"): m
              for name, m in held.named_modules() if isinstance(m, DequantizedLinear4bit)}
    assert len(layers) == 2 * 7
    for name, module in layers.items():
        bf16 = reference.get_submodule(name).weight
        assert bf16.dtype == torch.bfloat16 and module.weight.dtype == torch.float32, name
        assert torch.equal(module.weight, bf16.float()), name  # exactly the bf16 values
    # The model then differs from bitsandbytes' 4-bit one only by rounding its matmul inputs less.
    bnb_model = _bitsandbytes_reference(odd_path, spec)
    same_random_lora(held, bnb_model)
    ids = torch.randint(5, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    losses = [model(input_ids=ids, labels=ids).loss.item() for model in (held, bnb_model)]
    assert math.isclose(losses[0], losses[1], rel_tol=1e-2), losses
