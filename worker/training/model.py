"""Loading the base model and its tokenizer, and attaching a fresh LoRA adapter to train.

All loading goes through load_base, so the quantization rule lives in one
place: bitsandbytes 4- or 8-bit as the spec says, on GPU and on CPU alike.
Only local paths are read (local_files_only=True); nothing is downloaded.

bitsandbytes 0.50 on CPUs with AVX512-BF16: the first no-grad forward of a
Linear4bit in eval mode (generate, evaluation) repacks its weight into a
layout only an inference kernel reads. After that, LoRA gradients through the
layer are silently wrong (that kernel has no autograd) and layers whose output
size is not a multiple of 32 fail. load_base turns the repacking off on every
Linear4bit (support_avx512bf16_for_cpu = False), which fixes both; see
tests/worker/test_quantized_training.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from app.domains.jobs.spec import ALL_LINEAR, LoraSpec, QuantizationSpec, TrainingSpec
from worker.training.data import ensure_pad_token
from worker.training.dequantized import dequantize_4bit_layers, frozen_to_compute_dtype
from worker.training.dropout import use_cpu_dropout
from worker.training.ops import apply_chunked_loss, apply_lean_ops
from worker.training.packing import register_packed_sdpa

Device = Literal["cuda", "cpu"]
Precision = Literal["bf16", "fp16", "fp32"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]

_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DeviceUnavailable(RuntimeError):
    """The job's spec asks for a device this worker does not have."""


def select_device(wanted: str = "any") -> Device:
    """The device a job trains on: for "any", "cuda" when a CUDA device is visible, else "cpu"; "cpu"
    and "cuda" as asked (the job's spec.device). Raises DeviceUnavailable for "cuda" without one."""
    if wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise DeviceUnavailable("The job asks for device 'cuda', and this worker has no CUDA device: only workers "
                                "with one should consume its queue (<training queue>.cuda).")
    return "cpu"


def device_label(device: Device) -> str:
    """What events and results call the device: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is emulated and slow."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(setting: str, device: Device) -> Precision:
    """The training precision (autocast dtype) for a spec's precision setting on `device`.

    "auto": bf16 on a GPU or CPU that has it, fp16 on an older GPU, else fp32.
    On a 2-core AVX512-BF16 CPU, bf16 autocast measured about 1.05x fp32 on a
    4-bit 30M model (its 4-bit matmuls run in bf16 either way) and ~2x on an
    unquantized base (STACK-NOTES). Raises ValueError for a setting the device
    cannot run (fp16 on CPU, bf16 on a GPU or CPU without it).
    """
    if setting == "auto":
        if device == "cpu":
            return "bf16" if cpu_has_bf16() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and device == "cpu":
        raise ValueError("training.precision fp16 needs a GPU; on CPU use 'auto', 'bf16' or 'fp32'")
    if setting == "bf16" and device == "cpu" and not cpu_has_bf16():
        raise ValueError("training.precision bf16 needs a CPU with AVX512-BF16 or AMX; use 'auto' or 'fp32' here")
    if setting == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"training.precision bf16 is not supported on {device_label(device)}; use 'auto' or 'fp16'")
    return setting  # type: ignore[return-value]


def resolve_attention(setting: str, device: Device, precision: Precision) -> Attention:
    """The attention implementation for a spec's attention setting.

    "auto": flash_attention_2 on CUDA when flash-attn is installed and training
    runs in bf16/fp16 (it has no fp32 kernels), else PyTorch SDPA (on CPU its
    flash kernel; with packed rows the block-diagonal mask keeps examples apart).
    Raises ValueError when flash_attention_2 is asked for where it cannot run.
    """
    flash_ok = device == "cuda" and precision != "fp32" and importlib.util.find_spec("flash_attn") is not None
    if setting == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if setting == "flash_attention_2" and not flash_ok:
        raise ValueError("training.attention flash_attention_2 needs CUDA, the flash-attn package and bf16/fp16 "
                         "precision; use 'auto' or 'sdpa'")
    return setting  # type: ignore[return-value]


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
        target_modules=ALL_LINEAR[0] if spec.target_modules == ALL_LINEAR else list(spec.target_modules),
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


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 inference repacking on every Linear4bit; returns how many.

    Must run before the model's first forward (see the module docstring). A
    no-op for GPU tensors and for CPUs without AVX512-BF16, where the flag is
    only read on CPU tensors.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base(
    path: Path, quantization: QuantizationSpec, device: Device, *, dtype: torch.dtype = torch.float32,
    attention: Attention = "sdpa",
) -> PreTrainedModel:
    """The base model from a local folder, quantized as `quantization` says, on `device`.

    dtype is that of the weights left unquantized (all of them for bits null).
    The same call serves training and inference, so an adapter trained on a
    4-bit base is served on an identically loaded one (training on CPU then
    dequantizes the 4-bit layers once, which changes no value, and with bf16
    compute holds the embeddings and norms in bf16: see load_base_model).
    Raises OSError when the folder is not a model.
    """
    # "sdpa" loads as transformers' SDPA plus per-example attention for packed rows (worker.training.packing).
    implementation = register_packed_sdpa() if attention == "sdpa" else attention
    model = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype,
        attn_implementation=implementation,
        quantization_config=quantization_config(quantization),
        device_map={"": torch.cuda.current_device()} if device == "cuda" else None,
    )
    disable_cpu_weight_repacking(model)
    return model


def _base_dtype(spec: TrainingSpec, device: Device, precision: Precision, quantized: bool) -> torch.dtype:
    if device == "cpu":
        # CPU autocast (bf16) works on fp32 weights; LoRA wants fp32 anyway
        return torch.float32
    if quantized:
        # dtype of the layers left unquantized (norms, embeddings, head) until
        # prepare_model_for_kbit_training casts them to fp32 for stable training.
        return _DTYPES[spec.quantization.compute_dtype]
    return _DTYPES[precision]


def load_base_model(
    path: Path, spec: TrainingSpec, device: Device, init_adapter: Path | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load base model and tokenizer from a local folder and attach a fresh LoRA adapter, or with
    init_adapter (a peft directory trained on this base) that adapter, trainable, with its own config.

    Returns (peft model with only the LoRA weights trainable, tokenizer, info)
    where info has: device (label), precision, attention, dtype (of the
    unquantized base weights), quantization (label of what was loaded, e.g.
    "nf4-double-quant", "int8" or "none"; on CPU a 4-bit base is trained
    dequantized, e.g. "nf4-double-quant-dequantized-bf16"), dequantized_layers
    (how many 4-bit layers that replaced), notes (messages that explain the
    loading to the job's events), gradient_checkpointing,
    lean_modules (how many norms and MLPs run the memory-lean ops), chunked_loss (whether the
    loss runs without a logits tensor),
    pad_token_added, trainable_parameters, total_parameters. Seeds nothing:
    call transformers.set_seed first for a reproducible LoRA init. Raises
    OSError when the folder is not a model, ValueError (peft) when a target
    module does not exist in the model, ValueError for a precision or
    attention setting the device cannot run.
    """
    tokenizer, pad_added = load_tokenizer(path)
    t = spec.training
    precision = resolve_precision(t.precision, device)
    attention = resolve_attention(t.attention, device, precision)
    quantized = spec.quantization.bits is not None
    dtype = _base_dtype(spec, device, precision, quantized=quantized)
    model = load_base(path, spec.quantization, device, dtype=dtype, attention=attention)
    # The KV cache only serves generation; in training it costs memory per step.
    model.config.use_cache = False
    # Non-reentrant checkpointing needs no enable_input_require_grads hook and
    # works with inputs that do not require grad (peft's own default is reentrant).
    checkpointing = {"use_reentrant": False}
    if quantized:
        # Freezes the base and casts its unquantized layers to fp32; its default
        # would also turn gradient checkpointing on, which the spec decides.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=t.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    # On CPU bitsandbytes dequantizes a 4-bit weight at every matmul (forward and backward); the
    # dequantized weight, kept, computes the same NF4 base at bf16 speed (worker.training.dequantized).
    # Training in fp32 on CPU (one without bf16 matmuls, or fp32 asked for), the dequantized weights are held
    # in fp32 with their compute dtype's values: a bf16 matmul there is several times slower than fp32's.
    compute = spec.quantization.compute_dtype
    hold = torch.float32 if precision == "fp32" and compute != "fp32" else None
    dequantized = (dequantize_4bit_layers(model, hold=hold)
                   if quantized and device == "cpu" and spec.quantization.bits == 4 else 0)
    label = quantization_label(spec.quantization)
    notes = []
    frozen_bf16 = dequantized and precision == "bf16" and compute == "bf16"
    if frozen_bf16:
        frozen_to_compute_dtype(model, torch.bfloat16)
    if dequantized:
        label = f"{label}-dequantized-{compute}"
        notes.append(
            f"The base was quantized to 4-bit {spec.quantization.type} and its {dequantized} 4-bit layers were then "
            f"dequantized once to {compute}: on CPU bitsandbytes dequantizes every 4-bit weight at each matmul, so "
            f"training computes with the same {spec.quantization.type}-rounded weights either way, and this way "
            "at plain matmul speed, for more memory. GPU workers train on bitsandbytes' 4-bit layers; the adapter "
            "serves on a 4-bit base as usual"
            + ("; the unquantized embeddings and norms are held in bf16 too, so no layer casts its input and output"
               if frozen_bf16 else "")
            + (f"; training runs in fp32, so those {compute} weights are held in fp32 (the same values) and multiply "
               f"in fp32, several times faster than {compute} on a CPU without {compute} support"
               if hold is not None else ""))
    lean_modules = apply_lean_ops(model) if t.lean_activations else 0
    chunked_loss = apply_chunked_loss(model) if t.chunked_loss else False
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(spec.lora))
    cpu_dropout = use_cpu_dropout(model) if device == "cpu" else 0
    trainable, total = model.get_nb_trainable_parameters()
    info = {
        "device": device_label(device),
        "precision": precision,
        "attention": attention,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": label,
        "dequantized_layers": dequantized,
        "notes": notes,
        "gradient_checkpointing": t.gradient_checkpointing,
        "lean_modules": lean_modules,
        "chunked_loss": chunked_loss,
        "cpu_dropout_layers": cpu_dropout,
        "pad_token_added": pad_added,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    return model, tokenizer, info
