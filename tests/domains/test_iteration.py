"""The auto_iterate policy: which change each round makes, and when the loop stops."""

from __future__ import annotations

import pytest

from app.domains.jobs.iteration import RoundResult, adjust, best, decide, metric_of
from app.domains.jobs.spec import AutoIterateSpec, TrainingSpec

POLICY = AutoIterateSpec(target={"metric": "pass@1", "min": 0.5}, max_rounds=4)


def _rounds(*scores):
    return [RoundResult(round=i + 1, job_id=f"ftjob-{i + 1}", score=s) for i, s in enumerate(scores)]


@pytest.mark.parametrize(("scores", "reason"), [
    ((0.6,), "target_reached"),
    ((0.1,), None),
    ((0.1, 0.3), None),
    ((0.1, 0.3, 0.3), "no_improvement"),
    ((0.3, 0.1), "no_improvement"),
    ((0.1, 0.2, 0.3, 0.4), "max_rounds"),
    ((0.1, 0.2, 0.5), "target_reached"),
    ((0.1, None), "round 2 failed"),
])
def test_the_loop_stops_by_rule(scores, reason):
    assert decide(_rounds(*scores), POLICY) == reason


def test_each_round_changes_one_arm_in_the_documented_order():
    spec = TrainingSpec()
    r2, what2 = adjust(spec, 2)
    assert r2.lora.target_modules == ("all-linear",) and r2.lora.r == spec.lora.r
    assert r2.training.learning_rate == pytest.approx(1e-3) and r2.training.epochs == spec.training.epochs
    assert "all-linear" in what2 and "learning rate" in what2
    r3, what3 = adjust(r2, 3)
    assert r3.training.epochs == 2 * r2.training.epochs and r3.lora == r2.lora and "epochs" in what3
    r4, what4 = adjust(r3, 4)
    assert r4.training.learning_rate == r3.training.learning_rate / 2 and r4.lora == r3.lora
    assert "learning rate" in what4


def test_a_job_that_already_adapts_every_layer_skips_to_the_epochs_arm_and_a_high_rate_is_never_raised():
    spec = TrainingSpec(lora={"target_modules": ["all-linear"]})
    r2, what2 = adjust(spec, 2)
    assert r2.training.epochs == 2 * spec.training.epochs and "epochs" in what2
    fast = TrainingSpec(training={"learning_rate": 3e-3})
    assert adjust(fast, 2)[0].training.learning_rate == 3e-3


def test_best_prefers_the_highest_score_then_the_earliest_round():
    assert best(_rounds(0.2, 0.4, 0.4)).round == 2
    assert best(_rounds(None, None)) is None


def test_metric_is_read_from_the_tuned_side():
    report = {"base": {"pass_at_k": {"1": 0.9}}, "tuned": {"pass_at_k": {"1": 0.25, "5": 0.5}}}
    assert metric_of(report, "pass@1") == 0.25 and metric_of(report, "pass@5") == 0.5
    assert metric_of(report, "pass@10") is None
