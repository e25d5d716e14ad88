"""The paper's loop: evaluate, and if the target is missed, adjust and train again.

Policy, one arm per round, on top of the previous round's settings (step 7 of the method:
adjust modules, learning rate and epochs):
  round 2: LoRA on every linear layer (peft's "all-linear") with 5x the learning rate, capped at
           1e-3. "LoRA Without Regret" (Schulman et al., 2025; reproduced in TRL's docs) finds
           attention-only LoRA clearly weaker than LoRA on all layers, the MLPs above all, and the
           best LoRA learning rate about 10x that of full fine-tuning; the paper's 2e-4 is a
           full-fine-tuning-sized rate for a small model. Skipped (to the next arm) when the job
           already adapts every linear layer.
  round 3: twice the epochs (more passes over a small dataset, with the stronger adapter).
  round 4 and later: half the learning rate.
The loop stops when a round reaches the target, when max_rounds have run, or when a round
does not beat the best round so far. The job the user submitted is round 1; later rounds are
child jobs linked to it, and it ends once the loop does, reporting every round and the best.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.domains.jobs.spec import ALL_LINEAR, AutoIterateSpec, TrainingSpec


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


_LORA_LR_CAP = 1e-3


def adjust(spec: TrainingSpec, next_round: int) -> tuple[TrainingSpec, str]:
    """The next round's spec and a sentence saying what changed."""
    t, lora = spec.training, spec.lora
    if next_round == 2 and lora.target_modules != ALL_LINEAR:
        lr = max(t.learning_rate, min(t.learning_rate * 5, _LORA_LR_CAP))
        return spec.model_copy(update={"lora": lora.model_copy(update={"target_modules": ALL_LINEAR}),
                                       "training": t.model_copy(update={"learning_rate": lr})}), \
            f"LoRA on every linear layer ({', '.join(lora.target_modules)} -> all-linear), " \
            f"learning rate {t.learning_rate:g} -> {lr:g}"
    if next_round <= 3:
        epochs = min(t.epochs * 2, 100)
        return spec.model_copy(update={"training": t.model_copy(update={"epochs": epochs})}), \
            f"epochs {t.epochs} -> {epochs}"
    lr = t.learning_rate / 2
    return spec.model_copy(update={"training": t.model_copy(update={"learning_rate": lr})}), \
        f"learning rate {t.learning_rate:g} -> {lr:g}"


def best(history: list[RoundResult]) -> RoundResult | None:
    scored = [r for r in history if r.score is not None]
    return max(scored, key=lambda r: (r.score, -r.round)) if scored else None
