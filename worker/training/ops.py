"""Memory-lean RMSNorm and SwiGLU for Llama-family decoders: same outputs, fewer saved activations.

Autograd keeps every intermediate an op needs for its backward. Stock LlamaRMSNorm upcasts to
fp32 and keeps the fp32 copy and the normalized tensor (2 x hidden fp32 values per token);
LlamaMLP keeps gate, silu(gate) and up (3 x intermediate values per token). These versions keep
only their inputs (plus one fp32 scalar per token for the norm) and recompute the cheap
elementwise parts in the backward pass, which is what Liger-Kernel and Unsloth do with fused
kernels; here it is plain PyTorch, so it runs on CPU and GPU alike.

On a 4-bit base the MLP's gate and up outputs, computed in bf16 and cast up to fp32 by the
4-bit layer, are kept in bf16, which holds them exactly. Measured on the 30M Llama shape (4-bit,
bf16 autocast, 1,000 tokens, LoRA on q/k/v/o without dropout): autograd keeps 158 MB instead of
244 MB.

apply_lean_ops patches module instances of the classes listed below (identical code in
transformers 5.24: RMSNorm weight * (x * rsqrt(mean(x^2) + eps)), MLP down(silu(gate(x)) * up(x)))
and nothing else; other architectures train with their stock modules.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from worker.training.dequantized import DequantizedLinear4bit

_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
_SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})


class _RMSNorm(torch.autograd.Function):
    """weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), keeping x and rstd only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normalized = x.float() * rstd  # (..., hidden) fp32, recomputed
        # d/dn of weight * n.to(dtype), then through the dtype cast as autograd does (a plain cast back).
        grad_n = (grad_out * weight).float()
        grad_x = rstd * (grad_n - normalized * (grad_n * normalized).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * normalized.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only, in store_dtype when that loses nothing (see swiglu_mlp)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, store_dtype: torch.dtype | None) -> torch.Tensor:
        ctx.dtypes = gate.dtype, up.dtype
        store = (lambda t: t.to(store_dtype)) if store_dtype is not None else (lambda t: t)
        ctx.save_for_backward(store(gate), store(up))
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # What autograd computes for the stock silu(gate) * up, from the kept inputs: the product's
        # gradients in the dtype the product was computed in, then aten's fused silu_backward on the
        # gate's side, one vectorized pass that computes in fp32 per element whatever the dtype.
        # For SmolLM2's MLP at 1,536 tokens in bf16 on 2 cores: 4.1 ms, where recomputing sigmoid
        # and its derivative in fp32 ops of their own took 14.1 ms, 8% of the training step.
        gate, up = ctx.saved_tensors
        gate_dtype, up_dtype = ctx.dtypes
        gate, up = gate.to(gate_dtype), up.to(up_dtype)
        dtype = torch.promote_types(gate_dtype, up_dtype)
        grad = grad_out.to(dtype)
        grad_up = (grad * nn.functional.silu(gate)).to(up_dtype) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward((grad * up).to(gate_dtype), gate)
        return grad_gate, grad_up, None


def _exact_output_dtype(layer: nn.Module) -> torch.dtype | None:
    """The narrower dtype that holds this layer's outputs exactly, if any.

    A bitsandbytes Linear4bit (and its dequantized stand-in on CPU) computes in
    its compute dtype and casts the result up to its input's dtype: an fp32
    output of a bf16 compute dtype holds only bf16 values, so storing it in
    bf16 is lossless. A layer with a LoRA adapter adds an fp32 update and has
    no such dtype.
    """
    half = (torch.bfloat16, torch.float16)
    if type(layer) is DequantizedLinear4bit and layer.weight.dtype in half:
        return layer.weight.dtype
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if type(layer) is bnb.nn.Linear4bit and layer.compute_dtype in half:
        return layer.compute_dtype
    return None


def rms_norm(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)


def swiglu_mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate_dtype, up_dtype = _exact_output_dtype(module.gate_proj), _exact_output_dtype(module.up_proj)
    store = gate_dtype if gate_dtype is not None and gate_dtype == up_dtype else None
    return module.down_proj(_SiluMul.apply(module.gate_proj(x), module.up_proj(x), store))


def apply_lean_ops(model: nn.Module) -> int:
    """Swap the forward of every known RMSNorm and SiLU-gated MLP in model for the lean one.

    Returns how many modules were patched (0 for an architecture not listed). Idempotent.
    """
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name in _RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(rms_norm, module)
            patched += 1
        elif name in _SWIGLU_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
            module.forward = types.MethodType(swiglu_mlp, module)
            patched += 1
    return patched


# -- the loss without the logits tensor --------------------------------------------------------

IGNORE_INDEX = -100
LOSS_CHUNK_TOKENS = 1024
HEAD_ROWS_MULTIPLE = 64


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labelled tokens the logits' argmax predicts: logits (tokens, vocabulary), labels (tokens,),
    already shifted. An int64 scalar on the logits' device, not synced.

    A label counts when its logit is the row's maximum (a label tied for the maximum counts too, where
    argmax would pick one of the tied tokens). Compared by value because amax is vectorized where
    argmax is not: on CPU, for 1,536 x 4,096 fp32 logits, 0.5 ms against 13 ms (logsumexp: 15 ms).
    """
    with torch.no_grad():
        target = labels.clamp(min=0)[..., None]
        hit = logits.gather(-1, target).squeeze(-1) >= logits.amax(-1)
        return (hit & (labels != IGNORE_INDEX)).sum()


@dataclass
class CausalLMOutputWithTokenCounts(CausalLMOutputWithPast):
    """The chunked loss's output: no logits, and instead the counts behind the mean token accuracy.

    correct_tokens: labelled tokens whose argmax prediction equals the label; labelled_tokens: all
    labelled tokens (int64 scalars, detached, on the model's device).
    """

    correct_tokens: torch.Tensor | None = None
    labelled_tokens: torch.Tensor | None = None


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, labels)) / divisor, a chunk of labelled tokens at a time,
    and how many labelled tokens the head's argmax predicts (a second, non-differentiable output).

    The stock head materializes logits for every token (tokens x vocabulary, in the compute dtype,
    again in fp32 for the loss, and once more as their gradient): with a 32k vocabulary and a
    2,000-token packed micro-batch that is 0.75 GB, more than the rest of a small model's step.
    Here each chunk's logits live only while the chunk is processed. The frozen head's gradient
    with respect to the hidden states is computed in the forward pass (softmax minus one-hot,
    times the weight) and kept: tokens x hidden values instead of tokens x vocabulary.
    Only labelled tokens go through the head: an ignored token (a prompt token under
    completion-only loss, row padding, each example's first token) adds nothing to the loss or to
    any gradient. On code tasks laid out through a chat template that is three tokens in four,
    and the head (vocabulary x hidden) is the largest matmul of a small model.
    Matmuls run under the caller's autocast exactly as the stock head's do; under autocast the
    weight is cast to the autocast dtype once per call, not once per matmul. Argmax hits are counted
    from each chunk's logits while they exist (count_correct: one max over the vocabulary, a gather).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, divisor: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            weight = weight.to(torch.get_autocast_dtype(device))
        # Labelled positions first; their count rounded up to a multiple of HEAD_ROWS_MULTIPLE with
        # ignored ones (masked below), so the head's matmuls see few shapes (see packing's row padding).
        labelled = labels != IGNORE_INDEX
        count = int(labelled.sum())
        taken = min(labels.shape[0], -(-count // HEAD_ROWS_MULTIPLE) * HEAD_ROWS_MULTIPLE)
        positions = torch.argsort(~labelled, stable=True)[:taken]
        for start in range(0, taken, chunk):
            rows = positions[start:start + chunk]
            y = labels.index_select(0, rows)
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)
            logits = nn.functional.linear(hidden.index_select(0, rows), weight).float()
            correct += count_correct(logits, y)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(y.shape[0], device=y.device), target] -= 1.0
                probs.mul_((valid.to(probs.dtype) / divisor)[:, None])
                grad.index_copy_(0, rows, nn.functional.linear(probs, weight.t()).to(hidden.dtype))
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return total / divisor, correct

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_correct: torch.Tensor | None):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None = None,
                         chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """transformers' causal-LM loss on already shifted labels, without the logits tensor.

    hidden (tokens, hidden), labels (tokens,). Like transformers' ForCausalLMLoss: the mean over
    labelled tokens, or their sum over num_items_in_batch when the Trainer passes it (gradient
    accumulation then weighs every token alike). Not for a head whose weight trains.
    """
    return linear_cross_entropy_and_correct(hidden, weight, labels, num_items_in_batch, chunk)[0]


def linear_cross_entropy_and_correct(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                     num_items_in_batch: torch.Tensor | int | None = None,
                                     chunk: int = LOSS_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_cross_entropy's loss, and how many labelled tokens the head's argmax predicts (count_correct
    over the full logits, an int64 scalar) at no extra matmul."""
    if num_items_in_batch is None:
        divisor = (labels != IGNORE_INDEX).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    loss, correct = _LinearCrossEntropy.apply(hidden, weight, labels, divisor, chunk)
    return loss, correct


def _chunked_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                          labels=None, **kwargs):
    """A causal LM's forward that, given labels, returns the loss and the token-accuracy counts and no
    logits (see _LinearCrossEntropy, CausalLMOutputWithTokenCounts). Without labels (generation,
    scoring) or with a head that trains it is the stock forward."""
    stock = type(self).forward.__get__(self)
    if labels is None or self.lm_head.weight.requires_grad or kwargs.get("use_cache"):
        return stock(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     inputs_embeds=inputs_embeds, labels=labels, **kwargs)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat_labels = shift_labels.reshape(-1).to(hidden.device)
    loss, correct = linear_cross_entropy_and_correct(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                                     flat_labels, kwargs.get("num_items_in_batch"),
                                                     chunk=LOSS_CHUNK_TOKENS)
    return CausalLMOutputWithTokenCounts(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions, correct_tokens=correct,
                                         labelled_tokens=(flat_labels != IGNORE_INDEX).sum())


def apply_chunked_loss(model: nn.Module) -> bool:
    """Give a causal LM with an lm_head and a decoder at .model the chunked loss. Returns whether it
    applied. Idempotent; only this instance changes."""
    if not (isinstance(getattr(model, "lm_head", None), nn.Linear) and hasattr(model, "model")):
        return False
    model.forward = types.MethodType(_chunked_loss_forward, model)
    return True
