"""Job request/response models. Field names follow OpenAI's fine-tuning API so the
official client works unchanged; Tuneforge's own settings (lora, quantization,
training) sit beside them and arrive through the client's extra_body."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.domains.evaluations.spec import JobEvalSpec
from app.domains.jobs.spec import (DEVICE_DESCRIPTION, AutoIterateSpec, Device, Integration, LoraSpec, QuantizationSpec,
                                   TrainingSettings)

# OpenAI allows up to 64 characters. ':' separates the parts of a ft:base:org:suffix:job model name and
# '/' would split it in a /v1/models/{model} path, so a suffix holds letters, digits, '.', '-' and '_'.
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Characters a metadata key must not hold: a key with them could be stored but never found again by
# a metadata[key]=value filter (SQLite's JSON paths do not unescape them), and Postgres text holds no NUL.
_UNFILTERABLE = re.compile(r'["\\\x00-\x1f\x7f]')


def metadata_key_problem(key: str) -> str | None:
    """Why `key` cannot be a job's metadata key (also what a metadata[key] filter accepts); None when it can."""
    if not 1 <= len(key) <= 64:
        return "metadata keys are 1-64 characters"
    if _UNFILTERABLE.search(key):
        return "metadata keys must not contain '\"', '\\' or control characters"
    return None


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters. batch_size is the effective batch (micro-batch x accumulation);
    learning_rate_multiplier scales the recipe's learning rate (2e-4 by default)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = Field("auto", description="Epochs; auto = the recipe's 4.")
    batch_size: int | Literal["auto"] = Field("auto", description="Effective batch; auto = the recipe's 1 x 8.")
    learning_rate_multiplier: float | Literal["auto"] = Field("auto")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v):
        if v != "auto" and not 1 <= v <= 100:
            raise ValueError("n_epochs must be between 1 and 100")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        if v != "auto" and not 1 <= v <= 4096:
            raise ValueError("batch_size must be between 1 and 4096")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lrm(cls, v):
        if v != "auto" and not 0 < v <= 100:
            raise ValueError("learning_rate_multiplier must be > 0 and <= 100")
        return v


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and beta (auto = 0.1)."""

    beta: float | Literal["auto"] = Field("auto", description="The DPO loss's beta; auto = 0.1. Higher keeps the "
                                                              "tuned model closer to the reference.")

    @field_validator("beta")
    @classmethod
    def _beta(cls, v):
        if v != "auto" and not 0 < v <= 10:
            raise ValueError("beta must be > 0 and <= 10")
        return v


class _Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class _Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = Field(
        description="supervised: learn the assistant turns of chat (or other trainable) records; dpo: Direct "
                    "Preference Optimization on preference records. reinforcement is not supported.")
    supervised: _Supervised | None = None
    dpo: _Dpo | None = None

    @model_validator(mode="after")
    def _block_matches_type(self) -> Method:
        for name in ("supervised", "dpo"):
            if name != self.type and getattr(self, name) is not None:
                raise ValueError(f"method.{name} is given but method.type is {self.type!r}; give the settings of "
                                 f"the method you train with (method.{self.type})")
        return self


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=255, description="A registered base model (GET /v1/models), or a "
                                                                 "fine-tuned model of the team (ft:...) to continue "
                                                                 "from, as DPO after supervised fine-tuning does.")
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, description="Up to 64 letters, digits, '.', '-' or '_', added to the model "
                                                       "name.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Omitted: a random one, reported on the job.")
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs; keys <= 64, values <= 512 chars.")
    integrations: list[Integration] | None = Field(
        None, max_length=2, description='Experiment trackers: OpenAI\'s {"type": "wandb", "wandb": {"project", "name", '
                                        '"entity", "tags"}}, and {"type": "tensorboard"} (the event files as a '
                                        "result file); each type at most once.")
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None
    training: TrainingSettings | None = None
    eval: JobEvalSpec | None = Field(None, description="After training, evaluate the base and the tuned model "
                                                       "on these code tasks (status 'evaluating' meanwhile).")
    auto_iterate: AutoIterateSpec | None = Field(None, description="Retrain with adjusted settings until the eval "
                                                                   "target is met (needs eval).")
    device: Device = Field("any", description=DEVICE_DESCRIPTION)

    @model_validator(mode="after")
    def _iterate_needs_eval(self) -> JobCreate:
        if self.auto_iterate is not None:
            if self.eval is None:
                raise ValueError("auto_iterate needs eval: the target is measured by the job's evaluation")
            k = int(self.auto_iterate.target.metric.removeprefix("pass@"))
            if k not in self.eval.k:
                raise ValueError(f"auto_iterate.target.metric pass@{k} needs {k} in eval.k ({list(self.eval.k)})")
        return self

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v is not None and not _SUFFIX.match(v):
            raise ValueError("suffix must be 1-64 letters, digits, '.', '-' or '_'")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("metadata holds at most 16 pairs")
        for key, value in v.items():
            problem = metadata_key_problem(key) or ("values are at most 512 characters" if len(value) > 512 else None)
            if problem is not None:
                raise ValueError(f"metadata key {key[:70]!r}: {problem}")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v):
        types = [i.type for i in v or ()]
        if len(set(types)) != len(types):
            raise ValueError("each integration type may be given once")
        return v


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class JobRead(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str] = []
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None
    # Tuneforge's additions.
    parent_job_id: str | None = None
    round: int | None = None
    spec: dict[str, Any]
    usage: dict[str, Any] | None = None
    adapter_id: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobRead]
    has_more: bool


class EventRead(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None = None
    type: str


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventRead]
    has_more: bool
