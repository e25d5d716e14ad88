"""A job's evaluation report (report.compare): the sides, forgetting, overlap and the cost of 4-bit."""

from __future__ import annotations

import pytest

from app.domains.evaluations import roles
from app.domains.evaluations.report import PAPER_4BIT_BOUND, compare, quantization
from app.domains.evaluations.roles import EvaluationRole


def _result(pass_at_1: float, heldout: float = 2.0, **extra) -> dict:
    return {"pass_at_k": {"1": pass_at_1}, "heldout_loss": heldout, **extra}


def test_a_base_and_tuned_report_has_no_quantization_or_overlap_section():
    report = compare({"base": _result(0.2, 2.0), "tuned": _result(0.5, 2.3)})
    assert report["pass_at_k_delta"]["1"] == pytest.approx(0.3)
    assert report["forgetting"]["increase"] == pytest.approx(0.3)
    assert "quantization" not in report and "overlap" not in report and "tuned_4bit" not in report


def test_the_overlap_of_the_tuned_evaluation_is_the_reports():
    found = {"contaminated": True, "count": 2, "tasks": 6, "task_ids": ["1", "2"]}
    report = compare({"base": _result(0.2), "tuned": _result(0.5, overlap=found)})
    assert report["overlap"] == found
    clean = {"contaminated": False, "count": 0, "tasks": 6, "task_ids": []}
    assert compare({"base": _result(0.2), "tuned": _result(0.5, overlap=clean)})["overlap"]["contaminated"] is False


def test_the_cost_of_4bit_is_the_tuned_adapters_loss_on_the_4bit_base():
    report = compare({"base": _result(0.2), "tuned": _result(0.5, 2.0), "tuned_4bit": _result(0.4, 2.1)})
    q = report["quantization"]
    assert q["tuned_16bit"] == {"1": 0.5} and q["tuned_4bit"] == {"1": 0.4}
    assert q["delta"]["1"] == pytest.approx(0.4 - 0.5)
    assert q["relative_loss"]["1"] == pytest.approx(0.2) and q["within_paper_bound"] is False
    assert q["heldout_loss_increase"] == pytest.approx(0.1) and q["bound"] == PAPER_4BIT_BOUND
    assert report["tuned_4bit"]["pass_at_k"] == {"1": 0.4}
    assert report["pass_at_k_delta"]["1"] == pytest.approx(0.3)  # base vs 16-bit tuned, as before


@pytest.mark.parametrize(("p16", "p4", "within"), [
    (0.50, 0.48, True),   # 4% of 0.5 lost: on the bound
    (0.50, 0.47, False),  # 6% lost
    (0.50, 0.60, True),   # 4-bit did better
    (0.00, 0.00, True),   # nothing to lose
])
def test_within_paper_bound_holds_when_at_most_four_percent_is_lost(p16, p4, within):
    q = quantization(_result(p16), _result(p4))
    assert q["within_paper_bound"] is within
    if p16 > 0:
        assert q["relative_loss"]["1"] == pytest.approx((p16 - p4) / p16)
    else:
        assert q["relative_loss"]["1"] is None


def test_every_k_must_stay_within_the_bound():
    tuned = {"pass_at_k": {"1": 0.5, "5": 0.8}}
    q = quantization(tuned, {"pass_at_k": {"1": 0.5, "5": 0.7}})
    assert q["delta"]["1"] == 0 and q["delta"]["5"] == pytest.approx(-0.1) and q["within_paper_bound"] is False


def test_job_roles_are_base_and_tuned_and_the_4bit_one_on_request():
    assert roles.job_roles(compare_quantization=False) == (EvaluationRole.BASE, EvaluationRole.TUNED)
    assert roles.job_roles(compare_quantization=True)[-1] == EvaluationRole.TUNED_4BIT
    assert roles.loading("tuned_4bit") == roles.Loading(adapter=True, quantized=True)
    assert roles.loading(None) == roles.loading("base") == roles.Loading(adapter=False, quantized=False)
    assert sorted(["tuned_4bit", "tuned", "base"], key=roles.run_order) == ["base", "tuned", "tuned_4bit"]
