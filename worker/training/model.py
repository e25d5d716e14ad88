"""Loading the base model and tokenizer and attaching LoRA (paper steps 1-3).

All loading goes through load_base_model, so the rule for when the base is
quantized lives in one place (_quantization_plan): on CUDA, bitsandbytes 4- or
8-bit as the spec says; without CUDA the full-precision base, recorded as such.
Only local paths are read (local_files_only=True); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from app.domains.jobs.spec import LoraSpec, QuantizationSpec, TrainingSpec
from worker.training.data import ensure_pad_token

Device = Literal["cuda", "cpu"]
Precision = Literal["bf16", "fp16", "fp32"]

_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def select_device() -> Device:
    """"cuda" when a CUDA device is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_label(device: Device) -> str:
    """What events and results call the device: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def resolve_precision(setting: str, device: Device) -> Precision:
    """The training precision for a spec's precision setting on `device`.

    "auto" means bf16 on a GPU that has it, fp16 on an older GPU and fp32 on
    CPU (fp16 autocast is a GPU feature). Explicit settings are returned as
    given; TrainingArguments rejects one the device cannot run.
    """
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if device == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def quantization_config(spec: QuantizationSpec) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for spec.bits (None: no quantization)."""
    if spec.bits is None:
        return None
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[spec.compute_dtype],
    )


def quantization_label(spec: QuantizationSpec) -> str:
    """A short name for the quantization a spec asks for, e.g. "nf4-double-quant"."""
    if spec.bits is None:
        return "none"
    if spec.bits == 8:
        return "int8"
    return f"{spec.type}-double-quant" if spec.double_quant else spec.type


def lora_config(spec: LoraSpec) -> LoraConfig:
    """peft's LoraConfig for a causal LM from the spec's LoRA section."""
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias=spec.bias,
        task_type="CAUSAL_LM",
    )


def load_tokenizer(path: Path) -> tuple[PreTrainedTokenizerBase, bool]:
    """The base model's tokenizer, ready for training; also whether pad = eos was set.

    Padding goes on the right: Llama-style models take positions from the
    token index, so left padding would shift every position in training.
    """
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    pad_added = ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer, pad_added


def _quantization_plan(
    spec: QuantizationSpec, device: Device
) -> tuple[BitsAndBytesConfig | None, str, str | None]:
    """(bitsandbytes config or None, quantization label, why quantization was skipped or None)."""
    if spec.bits is None:
        return None, "none", None
    if device != "cuda":
        # bitsandbytes does load 4-bit on CPU, but LoRA gradients through its
        # repacked CPU kernels are silently wrong (see STACK-NOTES); until that
        # path is verified, CPU jobs train LoRA on the full-precision base.
        reason = f"{quantization_label(spec)} requested but no CUDA device; trained LoRA on the fp32 base"
        return None, "none (no CUDA)", reason
    return quantization_config(spec), quantization_label(spec), None


def _base_dtype(spec: TrainingSpec, device: Device, precision: Precision, quantized: bool) -> torch.dtype:
    if device == "cpu":
        return torch.float32  # CPU autocast (bf16) works on fp32 weights; LoRA wants fp32 anyway
    if quantized:
        # dtype of the layers left unquantized (norms, embeddings, head) until
        # prepare_model_for_kbit_training casts them for stable training.
        return _DTYPES[spec.quantization.compute_dtype]
    return _DTYPES[precision]


def load_base_model(
    path: Path, spec: TrainingSpec, device: Device
) -> tuple[PeftModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load base model and tokenizer from a local folder and attach a fresh LoRA adapter.

    Returns (peft model with only the LoRA weights trainable, tokenizer, info)
    where info has: device (label), precision, dtype (of the base weights),
    quantization (label, e.g. "nf4-double-quant" or "none (no CUDA)"),
    quantization_skipped (reason or None), pad_token_added, trainable_parameters,
    total_parameters. Seeds nothing: call transformers.set_seed first for a
    reproducible LoRA init. Raises OSError when the folder is not a model,
    ValueError (peft) when a target module does not exist in the model.
    """
    tokenizer, pad_added = load_tokenizer(path)
    bnb_config, quant_label, skipped = _quantization_plan(spec.quantization, device)
    precision = resolve_precision(spec.training.precision, device)
    dtype = _base_dtype(spec, device, precision, quantized=bnb_config is not None)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype,
        attn_implementation="sdpa",
        quantization_config=bnb_config,
        device_map={"": torch.cuda.current_device()} if device == "cuda" else None,
    )
    # The KV cache only serves generation; in training it costs memory per step.
    model.config.use_cache = False
    if bnb_config is not None:
        # Gradient checkpointing (on by default here) makes small models ~8x slower.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(spec.lora))
    trainable, total = model.get_nb_trainable_parameters()
    info = {
        "device": device_label(device),
        "precision": precision,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": quant_label,
        "quantization_skipped": skipped,
        "pad_token_added": pad_added,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    return model, tokenizer, info
