from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class AdapterRead(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    created_at: int
    name: str
    base_model: str
    job_id: str | None
    format: Literal["peft-lora"] = "peft-lora"
    bytes: int
    sha256: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterRead]
    has_more: bool


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
