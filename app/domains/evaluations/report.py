"""A job's evaluation report, from its base and its tuned evaluation's results. Pure: no
database, no torch."""

from __future__ import annotations


def compare(by_role: dict[str, dict]) -> dict:
    """The job's evaluation report: both sides, pass@k differences, and the forgetting check
    (held-out loss of the tuned model minus the base's; positive means it forgot some)."""
    base, tuned = by_role.get("base", {}), by_role.get("tuned", {})
    delta = {k: tuned["pass_at_k"][k] - base["pass_at_k"][k]
             for k in tuned.get("pass_at_k", {}) if k in base.get("pass_at_k", {})}
    report = {"base": base, "tuned": tuned, "pass_at_k_delta": delta}
    if "heldout_loss" in base and "heldout_loss" in tuned:
        report["forgetting"] = {"base_heldout_loss": base["heldout_loss"], "tuned_heldout_loss": tuned["heldout_loss"],
                                "increase": tuned["heldout_loss"] - base["heldout_loss"]}
    return report
