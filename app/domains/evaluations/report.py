"""A job's evaluation report, from the results of its evaluations by role. Pure: no database, no
torch."""

from __future__ import annotations

from typing import Any

from app.domains.evaluations.roles import EvaluationRole

# The paper's claim for 4-bit quantization: at most this fraction of the 16-bit accuracy is lost.
PAPER_4BIT_BOUND = 0.04


def compare(by_role: dict[str, dict]) -> dict:
    """The job's evaluation report: both sides, pass@k differences, the forgetting check (held-out
    loss of the tuned model minus the base's; positive means it forgot some), the overlap of the
    tasks with the training data when it was checked, and the cost of 4-bit when the tuned adapter
    was also evaluated on the 4-bit base."""
    base, tuned = by_role.get(EvaluationRole.BASE, {}), by_role.get(EvaluationRole.TUNED, {})
    report: dict[str, Any] = {"base": base, "tuned": tuned, "pass_at_k_delta": _delta(base, tuned)}
    if "heldout_loss" in base and "heldout_loss" in tuned:
        report["forgetting"] = {"base_heldout_loss": base["heldout_loss"], "tuned_heldout_loss": tuned["heldout_loss"],
                                "increase": tuned["heldout_loss"] - base["heldout_loss"]}
    overlap = next((r["overlap"] for r in (tuned, by_role.get(EvaluationRole.TUNED_4BIT, {})) if "overlap" in r), None)
    if overlap is not None:
        report["overlap"] = overlap
    if EvaluationRole.TUNED_4BIT in by_role:
        report["tuned_4bit"] = by_role[EvaluationRole.TUNED_4BIT]
        report["quantization"] = quantization(tuned, by_role[EvaluationRole.TUNED_4BIT])
    return report


def _delta(before: dict, after: dict) -> dict[str, float]:
    """after's pass@k minus before's, for each k both have."""
    return {k: after["pass_at_k"][k] - before["pass_at_k"][k]
            for k in after.get("pass_at_k", {}) if k in before.get("pass_at_k", {})}


def quantization(tuned_16bit: dict, tuned_4bit: dict) -> dict[str, Any]:
    """What loading the base 4-bit costs the tuned adapter, per k: delta (4-bit pass@k minus
    16-bit; negative is a loss) and relative_loss (the fraction of the 16-bit pass@k lost; None
    where the 16-bit pass@k is 0, so nothing could be lost), and whether every k stays within the
    paper's bound (PAPER_4BIT_BOUND)."""
    delta = _delta(tuned_16bit, tuned_4bit)
    relative = {k: (-d / tuned_16bit["pass_at_k"][k] if tuned_16bit["pass_at_k"][k] > 0 else None)
                for k, d in delta.items()}
    section: dict[str, Any] = {
        "tuned_16bit": {k: tuned_16bit["pass_at_k"][k] for k in delta},
        "tuned_4bit": {k: tuned_4bit["pass_at_k"][k] for k in delta},
        "delta": delta, "relative_loss": relative, "bound": PAPER_4BIT_BOUND,
        "within_paper_bound": all(r is None or r <= PAPER_4BIT_BOUND + 1e-12 for r in relative.values()),
    }
    if "heldout_loss" in tuned_16bit and "heldout_loss" in tuned_4bit:
        section["heldout_loss_increase"] = tuned_4bit["heldout_loss"] - tuned_16bit["heldout_loss"]
    return section
