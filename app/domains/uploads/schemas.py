from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app.core.strict_json import NUL_FREE_PATTERN
from app.domains.files.schemas import FileRead
from app.domains.files.service import EXPIRES_MAX_SECONDS, EXPIRES_MIN_SECONDS

MAX_PARTS = 10_000
# Written into the schema so that it says what is refused before the upload is even looked up: every
# /v1 route refuses a NUL in JSON text at the door (app/api/request_checks.py), and a malformed md5
# is malformed whoever asks. What fits the schema is looked up first, so another team's upload
# answers 404 to it, as a missing one does.
MD5_HEX = r"^[0-9a-fA-F]{32}$"
PartId = Annotated[str, Field(max_length=64, pattern=NUL_FREE_PATTERN)]


class ExpiresAfter(BaseModel):
    """When the File the upload becomes expires: `seconds` after its creation."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: StrictInt = Field(ge=EXPIRES_MIN_SECONDS, le=EXPIRES_MAX_SECONDS)


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=255, description="Shown back; never used as a path.")
    purpose: str = Field(max_length=32, description="As for POST /v1/files (fine-tune, evals, ...).")
    bytes: StrictInt = Field(gt=0, description="What the completed file holds exactly, in bytes "
                                               "(at most TUNEFORGE_UPLOADS__MAX_BYTES).")
    mime_type: str = Field(max_length=255, description="The file's type: a JSONL one, such as application/jsonl.")
    expires_after: ExpiresAfter | None = None


class UploadComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    part_ids: list[PartId] = Field(min_length=1, max_length=MAX_PARTS,
                                   description="Every part to assemble, in order, each once.")
    md5: str | None = Field(None, pattern=MD5_HEX,
                            description="The assembled file's md5, 32 hex digits; checked when given.")


class UploadPartRead(BaseModel):
    """OpenAI's upload part object."""

    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


class UploadRead(BaseModel):
    """OpenAI's upload object; `file` is set once completed."""

    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileRead | None = None
