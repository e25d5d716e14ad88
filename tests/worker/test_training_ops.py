"""Memory-lean RMSNorm/SwiGLU: the same numbers as the stock modules, with fewer saved activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from app.domains.jobs.spec import LoraSpec, QuantizationSpec
from worker.training.model import load_base, lora_config
from worker.training.ops import apply_lean_ops
from worker.training.tiny import make_tiny_model


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-ops"))


def _peft(path: Path, quantization: QuantizationSpec, lean: bool):
    model = load_base(path, quantization, "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    patched = apply_lean_ops(model) if lean else 0
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(LoraSpec(dropout=0.0)))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    peft_model.train()
    return peft_model, patched


def _step(model, ids) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, LoRA gradients, bytes autograd saved for the backward pass)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(saved.values())


# 4-bit: the gradient reaching each 4-bit layer is rounded to bf16 (the layer computes in bf16),
# so last-bit differences upstream flip a few roundings: 1e-3 there, fp32 exactness otherwise.
@pytest.mark.parametrize("bits, tolerance", [(None, 1e-5), (4, 1e-3)])
def test_lean_ops_give_the_stock_loss_and_gradients_and_save_less(base_path, bits, tolerance):
    quantization = QuantizationSpec(bits=bits)
    stock, _ = _peft(base_path, quantization, lean=False)
    lean, patched = _peft(base_path, quantization, lean=True)
    assert patched == 2 * 2 + 1 + 2  # two norms per layer, the final norm, one MLP per layer
    tokens, layers, intermediate = 256, 2, 384
    ids = torch.randint(5, 4000, (1, tokens), generator=torch.Generator().manual_seed(2))
    stock_loss, stock_grads, stock_saved = _step(stock, ids)
    lean_loss, lean_grads, lean_saved = _step(lean, ids)
    assert lean_loss == pytest.approx(stock_loss, rel=1e-6)
    for name, grad in stock_grads.items():
        error = ((lean_grads[name] - grad).norm() / grad.norm()).item()
        assert error < tolerance, f"{name}: {error:.2e}"
    # Per token and layer the MLP no longer keeps silu(gate) (intermediate fp32 values); on a 4-bit
    # base it also keeps gate and up in bf16, which holds those bf16-computed outputs exactly.
    fp32_intermediate = tokens * layers * intermediate * 4
    assert stock_saved - lean_saved >= (1 if bits is None else 2) * fp32_intermediate


def test_architectures_without_lean_ops_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert apply_lean_ops(model) == 0
