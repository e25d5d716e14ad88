"""An export's states: queued -> running -> succeeded | failed (running -> queued when the reaper
takes back an expired lease while attempts remain)."""

from __future__ import annotations

from enum import StrEnum


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ExportFormat(StrEnum):
    MERGED = "merged"  # safetensors directory (.tar.gz): the LoRA folded into the base
    GGUF = "gguf"  # one .gguf file for llama.cpp / Ollama


# What each format may be written as: the merged weights' torch dtype, the GGUF tensors' ggml type.
MERGED_DTYPES = ("bfloat16", "float16", "float32")
GGUF_QUANTIZATIONS = ("f16", "q8_0")
# Base model_types whose tensors and metadata the GGUF writer knows (llama.cpp's "llama" arch).
GGUF_ARCHITECTURES = ("llama",)
