"""Memory-lean RMSNorm/SwiGLU: the same numbers as the stock modules, with fewer saved activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

from app.domains.jobs.spec import LoraSpec, QuantizationSpec
from worker.training.model import load_base, lora_config
from worker.training.ops import IGNORE_INDEX, apply_chunked_loss, apply_lean_ops, linear_cross_entropy


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
# so last-bit differences upstream flip a few roundings. How many depends on the CPU's bf16 kernels
# (1.2e-3 on an AMD EPYC without AVX512-BF16, under 1e-3 with AMX): 3e-3 there, against the 1e-1 and
# more that a wrong op gives; fp32 exactness otherwise.
@pytest.mark.parametrize("bits, tolerance", [(None, 1e-5), (4, 3e-3)])
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


# -- the chunked loss -------------------------------------------------------------------------


@pytest.mark.parametrize("num_items", [None, 300])
def test_linear_cross_entropy_matches_cross_entropy_over_full_logits(num_items):
    """Several chunks, a partial last chunk, a fully ignored chunk, and both reductions."""
    gen = torch.Generator().manual_seed(3)
    tokens, hidden_size, vocab = 200, 16, 50
    hidden = torch.randn(tokens, hidden_size, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::7] = IGNORE_INDEX
    labels[64:128] = IGNORE_INDEX  # the second chunk of 64 holds no labels at all
    reduction = "mean" if num_items is None else "sum"
    stock = nn.functional.cross_entropy(hidden @ weight.T, labels, reduction=reduction)
    stock = stock if num_items is None else stock / num_items
    stock_grad, = torch.autograd.grad(stock * 3.0, hidden)
    chunked = linear_cross_entropy(hidden, weight, labels, num_items, chunk=64)
    chunked_grad, = torch.autograd.grad(chunked * 3.0, hidden)
    assert chunked.item() == pytest.approx(stock.item(), rel=1e-6)
    assert torch.allclose(chunked_grad, stock_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bits, autocast, tolerance", [(None, False, 1e-5), (None, True, 1e-2), (4, True, 1e-2)])
def test_chunked_loss_gives_the_stock_loss_and_gradients_without_keeping_logits(base_path, bits, autocast,
                                                                                 tolerance):
    quantization = QuantizationSpec(bits=bits)
    stock, _ = _peft(base_path, quantization, lean=False)
    chunked, _ = _peft(base_path, quantization, lean=False)
    assert apply_chunked_loss(chunked.base_model.model)
    for model in (stock, chunked):  # as in training: no KV cache (which would also skip the packed-sequence mask)
        model.base_model.model.config.use_cache = False
    # Two packed examples in one row: positions restart, the second example's first label is masked.
    ids = torch.randint(5, 4000, (1, 256), generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(100), torch.arange(156)])[None]
    labels = ids.clone()
    labels[0, :20] = IGNORE_INDEX
    labels[0, 100] = IGNORE_INDEX
    results = []
    for model in (stock, chunked):
        model.zero_grad(set_to_none=True)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, position_ids=positions, labels=labels, num_items_in_batch=torch.tensor(230))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.item(), grads, sum(saved.values()), out.logits))
    (stock_loss, stock_grads, stock_saved, stock_logits), (loss, grads, saved_bytes, logits) = results
    assert stock_logits is not None and logits is None
    assert loss == pytest.approx(stock_loss, rel=1e-3 if autocast else 1e-6)
    for name, grad in stock_grads.items():
        error = ((grads[name] - grad).norm() / grad.norm()).item()
        assert error < tolerance, f"{name}: {error:.2e}"
    vocab = stock.base_model.model.config.vocab_size
    assert stock_saved - saved_bytes >= 256 * vocab * 2  # at least the compute-dtype logits


def test_chunked_loss_leaves_generation_alone(base_path):
    model = load_base(base_path, QuantizationSpec(bits=None), "cpu")
    ids = torch.randint(5, 4000, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert apply_chunked_loss(model)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
