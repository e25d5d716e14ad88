"""LoRA adapters as the engine sees them: a reference from the caller, the checks that run
before any weight touches the model, and the LRU bookkeeping of the adapters in memory.

Checks read only adapter_config.json and the safetensors header (shapes, dtypes), so a wrong,
pickled or corrupt adapter is refused before peft injects anything into the shared base model.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.inference.errors import (
    AdapterBaseMismatch,
    AdapterCorrupt,
    AdapterFormatRefused,
    AdapterNotFound,
    AdapterUnsupported,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Files that hold pickles: loading any of them can run code, so an adapter that only has these is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# peft prefixes every saved key with this (PeftModel -> LoraModel -> the transformers model).
KEY_PREFIX = "base_model.model."
# Bytes per element once loaded: peft keeps LoRA weights in float32 (autocast_adapter_dtype).
LOADED_ELEMENT_BYTES = 4


@dataclass(frozen=True)
class AdapterRef:
    """What a request names: a stable id (the cache key, e.g. "ftadapter-..."), the peft directory,
    and optionally the registered name of the base model it was trained on, compared with the
    engine's base_name."""

    id: str
    path: Path | str
    base: str | None = None

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ValueError("AdapterRef.id must be a non-empty string")
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class AdapterSpec:
    """A checked adapter, ready to load: its config, weights file, rank and module shapes."""

    ref: AdapterRef
    config: dict
    weights_file: Path
    modules: dict[str, tuple[int, int, int]]  # module name -> (r, in_features, out_features)
    estimated_bytes: int  # in memory once loaded (float32)


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


def inspect_adapter(ref: AdapterRef, *, base_name: str, base_linears: Mapping[str, LinearShape]) -> AdapterSpec:
    """Check an adapter directory against the served base without loading its weights.

    Raises AdapterNotFound (no directory / config / weights), AdapterFormatRefused (pickle weights
    only), AdapterCorrupt (unreadable JSON or safetensors header), AdapterUnsupported (not plain
    LoRA on linear layers), AdapterBaseMismatch (other base: by name when ref.base is given, and
    always by the LoRA matrices' shapes against the base's linear layers)."""
    from safetensors import safe_open

    where = f"adapter {ref.id!r} ({ref.path})"
    if ref.base is not None and ref.base != base_name:
        raise AdapterBaseMismatch(
            f"{where} was trained on base model {ref.base!r}, but this engine serves {base_name!r}; "
            f"send the request to the inference process serving {ref.base!r}.", param="model")
    if not ref.path.is_dir():
        raise AdapterNotFound(f"{where}: the directory does not exist; the adapter's files are missing "
                              "from storage.", param="model")
    config_file = ref.path / CONFIG_FILE
    weights_file = ref.path / WEIGHTS_FILE
    if not config_file.is_file():
        raise AdapterNotFound(f"{where}: {CONFIG_FILE} is missing; a peft adapter directory has "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}.", param="model")
    if not weights_file.is_file():
        pickles = sorted(p.name for p in ref.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFormatRefused(
                f"{where} has weights only as {', '.join(pickles)} (a pickle, which can run code when "
                f"loaded); only {WEIGHTS_FILE} is served. Re-save it with "
                "model.save_pretrained(dir, safe_serialization=True).", param="model")
        raise AdapterNotFound(f"{where}: {WEIGHTS_FILE} is missing.", param="model")

    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterCorrupt(f"{where}: {CONFIG_FILE} is not readable JSON ({exc}).", param="model") from None
    _check_supported(config, where)

    try:
        with safe_open(str(weights_file), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise AdapterCorrupt(f"{where}: {WEIGHTS_FILE} is not a valid safetensors file ({exc}).",
                             param="model") from None
    if not shapes:
        raise AdapterCorrupt(f"{where}: {WEIGHTS_FILE} holds no tensors.", param="model")
    modules = _match_base(shapes, config, base_name=base_name, base_linears=base_linears, where=where)
    estimated = sum(r * (i + o) for r, i, o in modules.values()) * LOADED_ELEMENT_BYTES
    return AdapterSpec(ref=ref, config=config, weights_file=weights_file, modules=modules,
                       estimated_bytes=estimated)


def _check_supported(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterUnsupported(f"{where} is a {peft_type or 'unknown'} adapter; the engine serves LoRA adapters.",
                                 param="model")
    refusals = {
        "use_dora": "DoRA (use_dora=true) cannot share a mixed-adapter batch",
        "modules_to_save": "modules_to_save (fully trained layers) are not served",
        "trainable_token_indices": "trainable token embeddings are not served",
        "lora_bias": "LoRA bias (lora_bias=true) is not served",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) is not served",
        "target_parameters": "LoRA on raw parameters (target_parameters) is not served",
        "use_bdlora": "block-diagonal LoRA is not served",
        "use_qalora": "QA-LoRA is not served",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise AdapterUnsupported(f"{where}: {why}; retrain with plain LoRA on linear layers.", param="model")
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterUnsupported(f"{where} has task_type {task_type!r}; the engine serves CAUSAL_LM adapters.",
                                 param="model")


def _match_base(shapes: dict[str, tuple[int, ...]], config: dict, *, base_name: str,
                base_linears: Mapping[str, LinearShape], where: str) -> dict[str, tuple[int, int, int]]:
    """module name -> (r, in, out) for every LoRA pair, each matched against the base's linear layer."""
    trained_on = config.get("base_model_name_or_path")
    other_base = (f" The adapter's config names base {trained_on!r}; this engine serves {base_name!r}."
                  if trained_on else f" This engine serves {base_name!r}.")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name = key.removeprefix(KEY_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)], {})[part] = shape
                break
        else:
            raise AdapterUnsupported(f"{where}: tensor {key!r} is not a LoRA A/B matrix (embeddings, "
                                     "modules_to_save and bias are not served).", param="model")
    modules: dict[str, tuple[int, int, int]] = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterCorrupt(f"{where}: module {module!r} has {sorted(pair)} but LoRA needs both lora_A "
                                 "and lora_B.", param="model")
        base = base_linears.get(module)
        if base is None:
            raise AdapterBaseMismatch(f"{where} adapts module {module!r}, which the base model does not have "
                                      f"as a linear layer.{other_base}", param="model")
        a, b = pair["lora_A"], pair["lora_B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterCorrupt(f"{where}: module {module!r} has lora_A {a} and lora_B {b}, which do not "
                                 "form a LoRA pair (r x in, out x r).", param="model")
        if a[1] != base.in_features or b[0] != base.out_features:
            raise AdapterBaseMismatch(
                f"{where} was trained for a different base model: {module!r} maps {a[1]} -> {b[0]} features, "
                f"the base's layer maps {base.in_features} -> {base.out_features}.{other_base}", param="model")
        modules[module] = (a[0], a[1], b[0])
    return modules


@dataclass
class ResidentAdapter:
    """An adapter loaded into the model under a peft adapter name (`slot`)."""

    ref: AdapterRef
    slot: str
    bytes: int
    loaded_at: float
    load_ms: float
    last_used_at: float = field(default_factory=time.time)
    requests: int = 0


class AdapterCache:
    """LRU bookkeeping of resident adapters, bounded by count and by bytes. Pure bookkeeping: the
    engine does the loading and peft's delete_adapter; adapters in use by running rows are pinned
    and never chosen for eviction. Not thread-safe: only the engine thread touches it."""

    def __init__(self, *, max_adapters: int, max_bytes: int) -> None:
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        if max_bytes < 1:
            raise ValueError("max_adapter_bytes must be positive")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ResidentAdapter] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    @property
    def bytes_used(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    def get(self, adapter_id: str) -> ResidentAdapter | None:
        return self._entries.get(adapter_id)

    def touch(self, adapter_id: str, *, request: bool = True) -> ResidentAdapter:
        """Mark as most recently used; request: a request was admitted with it (counted)."""
        entry = self._entries[adapter_id]
        self._entries.move_to_end(adapter_id)
        entry.last_used_at = time.time()
        entry.requests += int(request)
        return entry

    def add(self, entry: ResidentAdapter) -> None:
        self._entries[entry.ref.id] = entry
        self._entries.move_to_end(entry.ref.id)

    def remove(self, adapter_id: str) -> ResidentAdapter:
        return self._entries.pop(adapter_id)

    def victims_for(self, new_bytes: int, pinned: Iterable[str]) -> list[str] | None:
        """Ids to evict, least recently used first, so that one more adapter of new_bytes fits both
        bounds; None when that is impossible without evicting a pinned adapter."""
        pinned = set(pinned)
        count, used = len(self._entries), self.bytes_used
        victims = []
        for adapter_id, entry in self._entries.items():
            if count + 1 <= self.max_adapters and used + new_bytes <= self.max_bytes:
                break
            if adapter_id in pinned:
                continue
            victims.append(adapter_id)
            count -= 1
            used -= entry.bytes
        if count + 1 > self.max_adapters or used + new_bytes > self.max_bytes:
            return None
        return victims

    def over_bounds(self, pinned: Iterable[str]) -> list[str]:
        """Unpinned ids to evict (LRU first) until both bounds hold again."""
        pinned = set(pinned)
        count, used = len(self._entries), self.bytes_used
        victims = []
        for adapter_id, entry in self._entries.items():
            if count <= self.max_adapters and used <= self.max_bytes:
                break
            if adapter_id not in pinned:
                victims.append(adapter_id)
                count -= 1
                used -= entry.bytes
        return victims

    def entries(self) -> list[ResidentAdapter]:
        """Least recently used first."""
        return list(self._entries.values())
