"""The training spec: the paper's QLoRA recipe as defaults, every field overridable.

Validated once at job creation and stored on the job row; the worker rebuilds it
from there and never reads the environment. pydantic only: shared by app and worker.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.domains.evaluations.spec import JobEvalSpec

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSpec(_Frozen):
    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="lora_alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1, max_length=64,
        description="Names of the linear layers to adapt.",
    )
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a module name (e.g. 'q_proj')")
        if len(set(v)) != len(v):
            raise ValueError("target_modules has duplicates")
        return v


class QuantizationSpec(_Frozen):
    bits: Literal[4, 8] | None = Field(4, description="4 (QLoRA), 8, or null for plain LoRA.")
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


class TrainingSettings(_Frozen):
    epochs: int = Field(4, ge=1, le=100)
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Stop after this many optimizer steps.")
    batch_size: int = Field(1, ge=1, le=1024, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = "paged_adamw_8bit"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."
    )
    max_seq_length: int = Field(1024, ge=8, le=131_072, description="Longer examples are truncated.")
    save_total_limit: int = Field(3, ge=1, le=100, description="Checkpoints kept.")
    logging_steps: int = Field(1, ge=1, le=100_000)


class IterateTarget(_Frozen):
    metric: str = Field("pass@1", pattern=r"^pass@[1-9][0-9]*$", description="pass@k, k among the evaluation's k.")
    min: float = Field(ge=0.0, le=1.0, description="Stop once the tuned model reaches this.")


class AutoIterateSpec(_Frozen):
    """Train, evaluate, and while the target is missed adjust and train again (see jobs.iteration)."""

    target: IterateTarget
    max_rounds: int = Field(3, ge=1, le=10)


class TrainingSpec(_Frozen):
    lora: LoraSpec = LoraSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    training: TrainingSettings = TrainingSettings()
    evaluation: JobEvalSpec | None = Field(None, description="Evaluate base and tuned model after training.")
    auto_iterate: AutoIterateSpec | None = None
    seed: int = 42
