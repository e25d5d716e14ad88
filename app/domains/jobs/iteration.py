"""The paper's loop: evaluate, and if the target is missed, adjust and train again.

Policy, one change per round, on top of the previous round's settings:
  round 2: twice the epochs;  round 3: twice the LoRA rank (and alpha, keeping alpha/r);
  round 4 and later: half the learning rate.
The loop stops when a round reaches the target, when max_rounds have run, or when a round
does not beat the best round so far. The job the user submitted is round 1; later rounds are
child jobs linked to it, and it ends once the loop does, reporting every round and the best.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.domains.jobs.spec import AutoIterateSpec, TrainingSpec


@dataclass(frozen=True)
class RoundResult:
    round: int
    job_id: str
    score: float | None  # the target metric; None when the round failed


def metric_of(evaluation_report: dict, metric: str) -> float | None:
    """The target metric ("pass@k") of the tuned side of a job's evaluation report."""
    k = metric.removeprefix("pass@")
    return (evaluation_report.get("tuned") or {}).get("pass_at_k", {}).get(k)


def decide(history: list[RoundResult], policy: AutoIterateSpec) -> str | None:
    """Why the loop stops after the last round in `history`, or None to run another round."""
    last = history[-1]
    if last.score is None:
        return f"round {last.round} failed"
    if last.score >= policy.target.min:
        return "target_reached"
    if len(history) >= policy.max_rounds:
        return "max_rounds"
    earlier = [r.score for r in history[:-1] if r.score is not None]
    if earlier and last.score <= max(earlier):
        return "no_improvement"
    return None


def adjust(spec: TrainingSpec, next_round: int) -> tuple[TrainingSpec, str]:
    """The next round's spec and a sentence saying what changed."""
    t, lora = spec.training, spec.lora
    if next_round == 2:
        return spec.model_copy(update={"training": t.model_copy(update={"epochs": min(t.epochs * 2, 100)})}), \
            f"epochs {t.epochs} -> {min(t.epochs * 2, 100)}"
    if next_round == 3:
        r, alpha = min(lora.r * 2, 512), min(lora.alpha * 2, 4096)
        return spec.model_copy(update={"lora": lora.model_copy(update={"r": r, "alpha": alpha})}), \
            f"LoRA rank {lora.r} -> {r} (alpha {lora.alpha} -> {alpha})"
    lr = t.learning_rate / 2
    return spec.model_copy(update={"training": t.model_copy(update={"learning_rate": lr})}), \
        f"learning rate {t.learning_rate:g} -> {lr:g}"


def best(history: list[RoundResult]) -> RoundResult | None:
    scored = [r for r in history if r.score is not None]
    return max(scored, key=lambda r: (r.score, -r.round)) if scored else None
