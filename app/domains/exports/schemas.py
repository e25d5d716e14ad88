from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ExportCreate(BaseModel):
    """What to write an adapter out as. merged: the LoRA folded into the base's weights, saved as
    safetensors with the config and tokenizer (a .tar.gz), in `dtype`. gguf: one GGUF file for
    llama.cpp and Ollama (Llama-family bases), its matrices in `quantization`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["merged", "gguf"]
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description='merged only: the saved weights\' dtype (default "bfloat16").')
    quantization: Literal["f16", "q8_0"] | None = Field(
        None, description='gguf only: the matrices\' ggml type (default "f16"); norms stay f32.')

    @property
    def precision(self) -> str:
        if self.format == "merged":
            return self.dtype or "bfloat16"
        return self.quantization or "f16"


class ExportRead(BaseModel):
    id: str
    object: Literal["adapter.export"] = "adapter.export"
    created_at: int
    adapter_id: str
    format: str
    dtype: str | None
    quantization: str | None
    status: str
    filename: str
    bytes: int | None
    sha256: str | None
    error: dict[str, Any] | None
    finished_at: int | None


class ExportList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExportRead]
    has_more: bool


class ExportDeleted(BaseModel):
    id: str
    object: Literal["adapter.export"] = "adapter.export"
    deleted: bool = True
