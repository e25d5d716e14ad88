from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from app.domains.evaluations.spec import SamplingSpec


class EvaluationCreate(SamplingSpec):
    """Evaluate a model (a base model or the team's fine-tuned model) on code tasks, or score
    completions the team brings (completions_file: JSONL of task_id + completion)."""

    model: str | None = Field(None, max_length=255, description="Base model or fine-tuned model name.")
    tasks: str = Field("humaneval", min_length=1, max_length=64,
                       description='"humaneval" (built in) or the id of an uploaded mbpp/humaneval file.')
    completions_file: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _what_to_score(self) -> EvaluationCreate:
        if not self.model and not self.completions_file:
            raise ValueError("give a model to generate completions, or a completions_file to score")
        return self


class EvaluationRead(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    created_at: int
    status: str
    model: str | None
    base_model: str | None
    adapter_id: str | None
    tasks: str
    completions_file: str | None
    job_id: str | None
    role: str | None
    settings: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    finished_at: int | None


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvaluationRead]
    has_more: bool
