"""LoRA adapters applied per row inside one batched forward of the shared base model.

Why not peft's own mixed batches. peft 0.21 serves them with forward(adapter_names=[...])
("__base__" for none), but its _mixed_batch_forward loops over the distinct adapters in every
LoRA layer (gather the rows, two small matmuls, scatter back), so its cost grows with the number
of adapters: a decode step of 64 rows with 64 distinct adapters on the 30M model took 228-645 ms
with peft against 104-119 ms here (bench/serve_throughput.py, shared 2-core CPU). And peft's
load_adapter re-walks the whole model for every adapter (inject, mark trainable), so loading
slows as adapters accumulate: 37-70 ms for the first, 279-344 ms for the 64th there (peft issue
981 saw ~27 ms and ~70 ms by the 35th); here a load takes ~3 ms whatever is loaded.

What this does instead. No module or weight of the base model is replaced: a forward hook on
each base linear layer that some loaded adapter targets adds the rows' LoRA output,

    out[b] = base(x[b]) + (x[b] @ A_u^T @ B_u^T) * s_u        u = row b's adapter

with A_u, B_u stacked per distinct adapter once per batch composition and gathered per row
(index_select), then two bmm's: the same few ops per layer whatever the number of adapters
(Punica/S-LoRA's gathered matmul). Rows without an adapter gather zero matrices and so add
exactly 0. When one adapter serves every row the hook runs peft's own arithmetic on the same
tensors, F.linear(F.linear(x, A), B) * scaling, added to the base output in the LoRA dtype and
cast back, as peft's lora.Linear.forward does. Loading is reading the safetensors file and
resolving each layer's scaling with peft's own config rules (r / lora_alpha, rank_pattern and
alpha_pattern via peft's get_pattern_key, rsLoRA): a few milliseconds, independent of how many
adapters are loaded. Evicting drops the tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from worker.inference.adapters import KEY_PREFIX, AdapterSpec
from worker.inference.errors import AdapterCorrupt, AdapterUnsupported


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's matrices per base module: a (r, in), b (out, r), and its scaling (lora_alpha / r)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.modules.values())


def load_lora(spec: AdapterSpec, device: torch.device) -> LoraWeights:
    """Read a checked adapter's weights onto `device`, with peft's scaling per module. Raises
    AdapterCorrupt (unreadable or non-finite tensors, ranks that contradict the config) and
    AdapterUnsupported (a LoRA variant, e.g. DoRA, that changes the forward)."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    where = f"adapter {spec.ref.id!r} ({spec.ref.path})"
    try:
        config = LoraConfig.from_pretrained(str(Path(spec.ref.path)))
    except Exception as exc:  # peft raises TypeError/ValueError for fields it cannot take
        raise AdapterCorrupt(f"{where}: adapter_config.json is not a valid LoRA config ({exc}).",
                             param="model") from None
    variant = _variant(config)
    if variant:
        raise AdapterUnsupported(f"{where} uses the LoRA variant {variant}, which changes the layer's forward; "
                                 "the engine serves plain LoRA. Retrain without it.", param="model")
    try:
        tensors = load_file(str(spec.weights_file), device=str(device))
    except Exception as exc:
        raise AdapterCorrupt(f"{where}: adapter_model.safetensors cannot be read ({exc}).", param="model") from None

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module in spec.modules:
        a = tensors.get(f"{KEY_PREFIX}{module}.lora_A.weight")
        b = tensors.get(f"{KEY_PREFIX}{module}.lora_B.weight")
        for name, t in (("lora_A", a), ("lora_B", b)):
            if t is None or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise AdapterCorrupt(f"{where}: {module}.{name} is missing, not floating point or not finite.",
                                     param="model")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        if r != a.shape[0]:
            raise AdapterCorrupt(f"{where}: {module} has rank {a.shape[0]} but the config says r={r}.", param="model")
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        # As peft's autocast_adapter_dtype: half-precision LoRA weights run in float32.
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        modules[module] = (a.contiguous(), b.contiguous(), scaling)
    return LoraWeights(modules)


def _variant(config) -> str | None:
    """The LoRA variant a config asks for (DoRA, aLoRA, ...), read from peft's own field metadata."""
    for f in dataclasses.fields(config):
        if f.name == "init_lora_weights":
            if config.init_lora_weights in f.metadata.get("lora_variants", ()):
                return f"init_lora_weights={config.init_lora_weights!r}"
        elif f.metadata.get("is_lora_variant") and getattr(config, f.name):
            return f.name
    return None


@dataclass
class _LayerPlan:
    single: tuple[torch.Tensor, torch.Tensor, float] | None  # one adapter serves every row
    a: torch.Tensor | None = None  # (U, in, r_max): A^T per distinct adapter, zeros for base rows
    b: torch.Tensor | None = None  # (U, r_max, out): B^T per distinct adapter
    scale: torch.Tensor | None = None  # (U, 1, 1)
    index: torch.Tensor | None = None  # (rows,) row -> entry; None when row b uses entry b (all distinct)


class BatchedLora:
    """The loaded adapters (by slot) and the hooks that apply them to the rows of the next forward."""

    def __init__(self, model: torch.nn.Module, max_plans: int = 4) -> None:
        self._model = model
        self._adapters: dict[str, LoraWeights] = {}
        self._hooked: set[str] = set()
        self._plans: OrderedDict[tuple, dict[str, _LayerPlan] | None] = OrderedDict()
        self._max_plans = max_plans
        self._active: dict[str, _LayerPlan] | None = None

    def add(self, slot: str, weights: LoraWeights) -> None:
        for module in weights.modules:
            if module not in self._hooked:
                self._model.get_submodule(module).register_forward_hook(self._hook_for(module))
                self._hooked.add(module)
        self._adapters[slot] = weights
        self._plans.clear()

    def remove(self, slot: str) -> None:
        del self._adapters[slot]
        self._plans.clear()

    def use(self, slots: Sequence[str | None]) -> None:
        """Set the rows of the next forward: slots[b] is row b's adapter, None for the base model."""
        key = tuple(slots)
        if key in self._plans:
            self._plans.move_to_end(key)
        else:
            self._plans[key] = self._build(slots)
            while len(self._plans) > self._max_plans:
                self._plans.popitem(last=False)
        self._active = self._plans[key]

    def clear(self) -> None:
        self._active = None

    def _build(self, slots: Sequence[str | None]) -> dict[str, _LayerPlan] | None:
        distinct = list(dict.fromkeys(s for s in slots if s is not None))
        if not distinct:
            return None
        entries = distinct + ([None] if None in slots else [])
        position = {slot: i for i, slot in enumerate(entries)}
        index = torch.tensor([position[s] for s in slots], dtype=torch.long)
        identity = index.tolist() == list(range(len(slots)))  # row b uses entry b: no gather needed
        plans: dict[str, _LayerPlan] = {}
        for module in self._hooked:
            present = {s: self._adapters[s].modules[module] for s in distinct if module in self._adapters[s].modules}
            if not present:
                continue
            if len(entries) == 1:
                plans[module] = _LayerPlan(single=present[entries[0]])
                continue
            first_a, first_b, _ = next(iter(present.values()))
            r_max = max(a.shape[0] for a, _, _ in present.values())
            device, dtype = first_a.device, first_a.dtype
            a_all = torch.zeros(len(entries), first_a.shape[1], r_max, device=device, dtype=dtype)
            b_all = torch.zeros(len(entries), r_max, first_b.shape[0], device=device, dtype=dtype)
            scale = torch.zeros(len(entries), 1, 1, device=device, dtype=dtype)
            for slot, (a, b, scaling) in present.items():  # adapters that skip this module keep zeros: they add 0
                i, r = position[slot], a.shape[0]
                a_all[i, :, :r] = a.T
                b_all[i, :r, :] = b.T
                scale[i] = scaling
            plans[module] = _LayerPlan(single=None, a=a_all, b=b_all, scale=scale,
                                       index=None if identity else index.to(device))
        return plans

    def _hook_for(self, module_name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            plans = self._active
            plan = plans.get(module_name) if plans is not None else None
            if plan is None:
                return output
            if plan.single is not None:
                a, b, scaling = plan.single
                delta = F.linear(F.linear(args[0].to(a.dtype), a), b) * scaling
            else:
                x = args[0].to(plan.a.dtype)  # (rows, seq, in)
                a, b, scale = plan.a, plan.b, plan.scale
                if plan.index is not None:
                    a = a.index_select(0, plan.index)  # (rows, in, r)
                    b = b.index_select(0, plan.index)  # (rows, r, out)
                    scale = scale.index_select(0, plan.index)  # (rows, 1, 1)
                delta = torch.bmm(torch.bmm(x, a), b) * scale  # (rows, seq, out)
            return (output + delta).to(output.dtype)

        return hook
