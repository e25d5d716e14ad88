"""A 4-bit base for training on CPU, dequantized once: QLoRA's NF4 weights at bf16 matmul speed.

bitsandbytes 0.50 has no fused 4-bit training kernel on CPU. Every Linear4bit matmul with
gradients, forward and backward alike, first dequantizes the whole weight into the compute dtype
and then runs F.linear (backward: matmul) on it. The layer's numbers are therefore those of a
plain bf16 linear layer whose weight is the dequantized NF4 weight, and nothing in training
changes that weight. DequantizedLinear4bit keeps it dequantized from the start: the same
NF4-rounded base, computed the same way (input cast to the compute dtype, output cast back to
the input's dtype), without the per-matmul dequantization.

The 4-bit layers are loaded by bitsandbytes as before and converted afterwards, so the weights
are exactly the values bitsandbytes would dequantize, and an adapter trained here is served on
an ordinary 4-bit base (worker.training.model.load_base) with the logits of training, to the few
bf16 ulps of the residual stream described next.

prepare_model_for_kbit_training keeps the layers bitsandbytes leaves unquantized (embeddings,
norms) in fp32, so the residual stream between the layers is fp32 and every linear layer casts its
input to bf16 and its output back: on SmolLM2-135M (2-core Xeon, rows of 1,400 tokens) those casts
were 15% of a step. With a bf16 compute dtype, frozen_to_compute_dtype puts those frozen weights in
bf16 too, as a model loaded in bf16 has them: the residual stream is bf16 (RMSNorm still computes
in fp32 inside), and the step ran at 1.2x the tokens/s with the same loss to 4 digits. The LoRA
weights are created after it and stay fp32.

Cost: 2 bytes per quantized weight instead of about 0.5 (bf16 compute; 4 bytes for fp32). On
SmolLM2-135M (106M weights in its linear layers) that is about 160 MB more resident memory.
GPU training keeps bitsandbytes' own layers: there the point of 4 bits is the memory.

A CPU without native bf16 (no AVX512-BF16 or AMX) trains in fp32, and there a bf16 matmul is far
slower than an fp32 one: 293 against 55 ms for (880 x 576) @ (576 x 1,536) on a 2-core AVX2 EPYC.
With `hold=torch.float32` the weight keeps the values of its bf16 dequantization, exactly (every
bf16 value is an fp32 value), in an fp32 tensor: the same NF4 base, its matmuls in fp32 with fp32
inputs, which rounds less than bitsandbytes' bf16 matmul does, never more. Twice the memory of bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DequantizedLinear4bit(nn.Linear):
    """A frozen linear layer holding a bitsandbytes Linear4bit's weight, dequantized to its compute dtype.

    Computes as Linear4bit does: input (..., in_features) cast to the weight's dtype, output
    (..., out_features) cast back to the input's dtype. An nn.Linear subclass, so peft wraps it
    with its ordinary LoRA layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)  # not nn.Linear's __init__, which would allocate and initialize a weight
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.weight.dtype) if self.bias is not None else None
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear4bit's weight (out_features, in_features) in its compute dtype, as its matmul sees it."""
    import bitsandbytes.functional as bnb_functional

    state = layer.weight.quant_state
    dtype = layer.compute_dtype if layer.compute_dtype is not None else state.dtype
    return bnb_functional.dequantize_4bit(layer.weight.data, state).to(dtype)


def dequantize_4bit_layers(model: nn.Module, hold: torch.dtype | None = None) -> int:
    """Replace every bitsandbytes Linear4bit in model with a DequantizedLinear4bit; returns how many.

    The weights are dequantized to each layer's compute dtype, then held in `hold` when given (a
    wider dtype, e.g. fp32 on a CPU without bf16 matmuls: see the module's docstring). Run it after
    prepare_model_for_kbit_training (which casts every bf16 parameter to fp32) and before attaching
    LoRA. 0 when bitsandbytes is not installed or the model has no 4-bit layer.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    for name, module in found:
        if getattr(module.weight, "quant_state", None) is None:
            raise ValueError(f"The base model's layer {name} was not quantized: its checkpoint holds no weight for "
                             "it, so bitsandbytes left it uninitialized. The base model's files are incomplete.")
        parent, _, child = name.rpartition(".")
        with torch.no_grad():
            weight = dequantized_weight(module)
            replacement = DequantizedLinear4bit(weight.to(hold) if hold is not None else weight, module.bias)
        setattr(model.get_submodule(parent), child, replacement)
    return len(found)


def frozen_to_compute_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen fp32 parameter of model to dtype; returns how many.

    Run it after dequantize_4bit_layers and before attaching LoRA (whose weights then stay fp32).
    """
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(dtype)
            cast += 1
    return cast
