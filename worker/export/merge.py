"""Folding a LoRA adapter into its base model's weights.

The base is loaded from its registered directory, which holds the 16/32-bit weights (a 4-bit base
is quantized only when a job loads it), so an adapter trained on a 4-bit base is merged into the
unquantized weights it approximated: nothing is dequantized twice. The merge itself runs in fp32
(W + scale * B @ A, per target module) and the result is cast to the asked dtype once, so a 16-bit
export rounds each weight a single time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Files of the base that describe how to generate with it; the tokenizer comes from the adapter.
_BASE_EXTRAS = ("generation_config.json",)


def merged_model(base_dir: Path, adapter_dir: Path) -> PreTrainedModel:
    """The base with the adapter folded in, in fp32, in eval mode: a plain transformers model with
    no peft modules left."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    merged = model.merge_and_unload(safe_merge=True)
    merged.eval()
    return merged


def tokenizer_for(base_dir: Path, adapter_dir: Path) -> PreTrainedTokenizerBase:
    """The adapter's tokenizer (saved with it, chat template included), else the base's."""
    source = adapter_dir if any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) \
        else base_dir
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def write_merged(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str) -> Path:
    """Write a save_pretrained directory of the merged model in `dtype` (bfloat16, float16, float32)
    to out_dir: config.json, model.safetensors, generation_config.json and the tokenizer. Returns
    out_dir. Raises KeyError for an unknown dtype."""
    torch_dtype = DTYPES[dtype]
    model = merged_model(base_dir, adapter_dir).to(torch_dtype)
    model.config.dtype = torch_dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_for(base_dir, adapter_dir).save_pretrained(out_dir)
    for name in _BASE_EXTRAS:
        if (base_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (out_dir / "tuneforge_export.json").write_text(json.dumps({
        "format": "merged", "dtype": dtype, "lora_r": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"), "target_modules": adapter_config.get("target_modules"),
    }, indent=2, default=list))
    return out_dir
