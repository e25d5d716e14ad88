"""CpuDropout: nn.Dropout's distribution and gradient, reproducible under torch's seed, swapped into peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from worker.training.dropout import CpuDropout, use_cpu_dropout


def test_drops_at_the_asked_rate_scales_the_kept_and_passes_gradients_through_the_mask():
    drop = CpuDropout(0.05)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.05, abs=0.002)
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.95))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.95)


def test_the_mask_follows_torchs_seed_and_changes_between_calls():
    drop = CpuDropout(0.3)
    x = torch.ones(64, 96, dtype=torch.bfloat16)
    torch.manual_seed(7)
    first, second = drop(x), drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), first) and not torch.equal(first, second)
    assert first.dtype == torch.bfloat16 and first.shape == x.shape


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(8, 8)
    assert torch.equal(CpuDropout(0.5).eval()(x), x)
    assert torch.equal(CpuDropout(0.0)(x), x)


def test_use_cpu_dropout_swaps_every_lora_dropout_and_leaves_the_adapter_state_alone():
    base = nn.Sequential()
    base.add_module("q_proj", nn.Linear(16, 16))
    base.add_module("v_proj", nn.Linear(16, 16))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    keys = set(model.state_dict())
    assert use_cpu_dropout(model) == 2
    drops = [m for m in model.modules() if isinstance(m, CpuDropout)]
    assert len(drops) == 2 and all(d.p == 0.1 for d in drops)
    assert set(model.state_dict()) == keys
    assert use_cpu_dropout(model) == 0  # already swapped


def test_all_linear_adapts_every_linear_layer_but_the_head_and_trains_with_cpu_dropout(base_path):
    from app.domains.jobs.spec import LoraSpec, TrainingSpec
    from worker.training.model import load_base_model

    model, _, info = load_base_model(base_path, TrainingSpec(lora=LoraSpec(target_modules=("all-linear",))), "cpu")
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    layers = model.config.num_hidden_layers
    assert info["cpu_dropout_layers"] == 7 * layers
