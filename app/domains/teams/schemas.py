from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["admin", "member"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", min_length=1, max_length=64, description="A label, e.g. the service using it.")
    role: Role = Field("member", description="admin: manages keys and reads the audit log; member: everything else.")


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_seconds: int = Field(0, ge=0, le=86_400, description=(
        "How long the old key keeps working after the rotation, so clients can switch over (0: revoked at once)."))


class KeyRead(BaseModel):
    """An API key as listed: never its secret or hash."""

    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    role: Role
    redacted_value: str = Field(description="The key's public prefix, to recognise it: tf_<prefix>_…")
    created_at: int
    revoked_at: int | None = Field(None, description="When the key stopped (or, after a rotation with a grace "
                                                     "period, will stop) working.")


class KeyCreated(KeyRead):
    key: str = Field(description="The whole key. Shown only in this response; Tuneforge keeps only a hash.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyRead]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
