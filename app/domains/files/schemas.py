from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class FileRead(BaseModel):
    """OpenAI's file object, plus what Tuneforge learned while validating it."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str
    format: str
    examples: int


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileRead]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
