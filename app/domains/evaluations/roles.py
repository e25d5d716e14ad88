"""The roles of a job's evaluations and how each role's model is loaded: the one place that says
which model each evaluation of a job scores.

base: the base model as served (16-bit: fp32 on CPU, bf16 or fp16 on GPU); tuned: the same base
with the job's adapter; tuned_4bit (asked for with eval.compare_quantization): the adapter on the
base loaded 4-bit, NF4 with double quantization and bf16 compute, as QLoRA training loads it, so
that the report can state what 4-bit costs. All of a job's evaluations share tasks and settings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EvaluationRole(StrEnum):
    BASE = "base"
    TUNED = "tuned"
    TUNED_4BIT = "tuned_4bit"


@dataclass(frozen=True)
class Loading:
    adapter: bool  # the job's adapter is attached
    quantized: bool  # the base is loaded 4-bit (NF4, double quant, bf16 compute) instead of 16-bit


LOADING: dict[EvaluationRole, Loading] = {
    EvaluationRole.BASE: Loading(adapter=False, quantized=False),
    EvaluationRole.TUNED: Loading(adapter=True, quantized=False),
    EvaluationRole.TUNED_4BIT: Loading(adapter=True, quantized=True),
}

# The order a job's evaluations run in.
ORDER: tuple[EvaluationRole, ...] = tuple(EvaluationRole)


def job_roles(*, compare_quantization: bool) -> tuple[EvaluationRole, ...]:
    """The evaluations a job's eval spec asks for, in ORDER."""
    roles = (EvaluationRole.BASE, EvaluationRole.TUNED)
    return (*roles, EvaluationRole.TUNED_4BIT) if compare_quantization else roles


def loading(role: str | None) -> Loading:
    """How an evaluation of this role loads its model; a standalone evaluation (no role) loads the
    model it names as the base role does. Raises ValueError for an unknown role."""
    return LOADING[EvaluationRole(role)] if role is not None else LOADING[EvaluationRole.BASE]


def run_order(role: str | None) -> int:
    """A sort key: a job's evaluations in ORDER."""
    return ORDER.index(EvaluationRole(role)) if role is not None else 0
