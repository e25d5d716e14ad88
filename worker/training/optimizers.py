"""Which optimizer a device trains with, and resuming a checkpoint written by the other optimizer family.

A job may be resumed on another kind of worker than the one that checkpointed it: bitsandbytes'
optimizers on a GPU worker, torch's AdamW on a CPU one. Their states keep the moments under
different keys, so one cannot load the other's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME

from worker.training.model import Device

# bitsandbytes' optimizers on CPU: paging does not exist there (they fall back,
# with a warning) and the 8-bit step measured 61 ms against torch's fused
# AdamW's 4 ms for the LoRA parameters of a 30M model; optimizer states of
# LoRA-sized parameters are too small for 8 bits to save memory that matters.
_CPU_OPTIMIZER = "adamw_torch_fused"
_BNB_OPTIMIZERS = frozenset({"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"})


def optimizer_for(name: str, device: Device) -> tuple[str, str | None]:
    """(optimizer to use, message explaining a substitution or None)."""
    if device == "cpu" and name in _BNB_OPTIMIZERS:
        return _CPU_OPTIMIZER, (f"Optimizer {name} is a bitsandbytes GPU optimizer (no paging on CPU, and its 8-bit "
                                f"step is slower there); using {_CPU_OPTIMIZER} on CPU")
    return name, None


def optimizer_family(state: dict[Any, dict[str, Any]]) -> str | None:
    """Which optimizer wrote this optimizer state: "torch" (AdamW's exp_avg/exp_avg_sq),
    "bitsandbytes" (its state1/state2, or its quantization-state entry), or None (no state yet)."""
    first = next((entry for entry in state.values() if entry), None)
    if first is None:
        return None
    return "torch" if "exp_avg" in first else "bitsandbytes"


def fit_optimizer_state(checkpoint: Path, trainer: Trainer, optimizer: str) -> str | None:
    """Make the checkpoint's optimizer state loadable by `optimizer`, the Trainer's optim; returns
    the family of the state it had to drop, or None when the state loads as it is.

    A checkpoint written by the other optimizer family cannot be loaded into this one: the first
    step would fail. Its moments are dropped then, keeping each parameter group's learning rate,
    so the job resumes its adapter, schedule, RNG and data position with fresh moments instead of
    failing. Rewrites optimizer.pt in the checkpoint folder (the worker's local copy). Raises
    ValueError when the checkpoint's parameter groups are not this run's.
    """
    path = checkpoint / OPTIMIZER_NAME
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    wanted = "bitsandbytes" if optimizer in _BNB_OPTIMIZERS else "torch"
    found = optimizer_family(saved["state"])
    if found in (None, wanted):
        return None
    groups = trainer.create_optimizer().state_dict()["param_groups"]
    trainer.optimizer = None  # the Trainer builds its own in train(), and loads the file into it
    if len(groups) != len(saved["param_groups"]):
        raise ValueError(f"{checkpoint} holds {len(saved['param_groups'])} optimizer parameter groups; "
                         f"this run has {len(groups)}: not a checkpoint of this job's adapter")
    for group, old in zip(groups, saved["param_groups"], strict=True):
        for key in ("lr", "initial_lr"):
            if key in old:
                group[key] = old[key]
    torch.save({"state": {}, "param_groups": groups}, path)
    return found
