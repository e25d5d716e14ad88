"""How code tasks are sampled and scored. pydantic only: shared by app and worker."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.domains.files.formats import PromptStyle


class SamplingSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(1, ge=1, le=200, description="Completions sampled per task.")
    k: tuple[int, ...] = Field((1,), min_length=1, max_length=8, description="pass@k for each k (k <= n).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=4096)
    stop: tuple[str, ...] | None = Field(None, max_length=8, description="Stop sequences; None: per task format.")
    limit: int | None = Field(None, ge=1, le=100_000, description="Evaluate only the first N tasks.")
    timeout_seconds: float = Field(10.0, ge=0.5, le=120.0, description="Wall-clock limit per program.")
    prompt_style: PromptStyle = Field(
        PromptStyle.AUTO, description="How tasks are put to the model. chat: the task as a user message rendered "
                                      "with the tokenizer's chat template, the answer ending at the model's end of "
                                      "turn, and the first fenced code block of the answer run; completion: a plain "
                                      "prompt the model continues, cut at the task format's stop sequences (for base "
                                      "models). auto: chat when the tokenizer has a chat template, else completion. "
                                      "The result records what auto became.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SamplingSpec:
        for k in self.k:
            if not 1 <= k <= self.n:
                raise ValueError(f"every k must be between 1 and n ({self.n}); got {k}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 needs temperature > 0: greedy decoding gives the same completion n times")
        if self.stop and any(not s or len(s) > 64 for s in self.stop):
            raise ValueError("stop sequences are 1-64 characters")
        return self


class JobEvalSpec(SamplingSpec):
    """A job's evaluation: after training, base and tuned model on the same tasks and settings
    (and the tuned adapter on the 4-bit base, with compare_quantization)."""

    tasks: str = Field("humaneval", min_length=1, max_length=64,
                       description='"humaneval" (built in) or the id of an uploaded mbpp/humaneval file.')
    compare_quantization: bool = Field(
        False, description="Also evaluate the tuned adapter on the base loaded 4-bit (NF4, double quantization, "
                           "bf16 compute, as QLoRA training loads it); the report's quantization section gives "
                           "both pass@k, the loss and whether it is within the paper's 4% bound.",
    )

    def sampling(self) -> SamplingSpec:
        """The sampling settings alone, as each of the job's evaluations records them."""
        return SamplingSpec.model_validate(self.model_dump(include=set(SamplingSpec.model_fields)))
