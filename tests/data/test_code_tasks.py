"""The bundled code tasks (tuneforge/data/code_tasks_*.jsonl: the pool and its easy tier) hold what
scripts/check_code_tasks.py checks, and the checks themselves catch what they are for."""

from __future__ import annotations

import pytest

from tuneforge import tasks_check
from tuneforge.tasks_check import Task
from worker.evaluation.errors import SandboxUnavailable
from worker.evaluation.harness import load_humaneval
from worker.evaluation.sandbox import Sandbox, SandboxLimits


@pytest.fixture(scope="module")
def bundle() -> tasks_check.Bundle:
    bundle = tasks_check.load_bundle()
    assert bundle.problems == []
    return bundle


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    try:
        return Sandbox(SandboxLimits(timeout_s=tasks_check.CROSS_TIMEOUT_S), mode="strong")
    except SandboxUnavailable as exc:
        pytest.skip(f"no bubblewrap sandbox on this machine (needs bwrap and user namespaces): {exc.message}")


def test_bundle_has_at_least_200_training_and_50_heldout_tasks_of_the_mbpp_shape(bundle):
    assert len(bundle.train) >= 200
    assert len(bundle.heldout) >= 50
    assert tasks_check.count_problems(bundle.train, bundle.heldout, bundle.easy_train, bundle.easy_heldout) == []
    assert tasks_check.shape_problems([*bundle.train, *bundle.heldout]) == []


def test_the_easy_tier_has_110_training_and_60_heldout_tasks_of_the_mbpp_shape_from_id_2001(bundle):
    assert (len(bundle.easy_train), len(bundle.easy_heldout)) == (110, 60)
    assert tasks_check.shape_problems([*bundle.easy_train, *bundle.easy_heldout]) == []
    ids = sorted(t.task_id for t in [*bundle.easy_train, *bundle.easy_heldout])
    assert ids == list(range(2001, 2171))
    assert max(t.task_id for t in [*bundle.train, *bundle.heldout]) < tasks_check.FIRST_EASY_TASK_ID


def test_no_task_repeats_another_a_demo_task_or_a_humaneval_problem(bundle):
    assert tasks_check.overlap_problems(bundle.ours, bundle.demo, load_humaneval()) == []
    for train, heldout in ((bundle.train, bundle.heldout), (bundle.easy_train, bundle.easy_heldout)):
        assert {t.entry_point for t in train}.isdisjoint(t.entry_point for t in heldout)


def test_every_reference_passes_its_tests_in_the_sandbox(bundle, sandbox):
    assert tasks_check.reference_problems(sandbox, bundle.ours) == []


def test_no_reference_solves_another_tasks_tests(bundle, sandbox):
    assert tasks_check.behaviour_problems(sandbox, bundle.ours, bundle.demo, load_humaneval()) == []


def _task(task_id: int, text: str, code: str, tests: list[str], split: str = "train") -> Task:
    return Task(task_id, text, code, tuple(tests), split)


DOUBLE = _task(2001, "Write a function to double a number.", "def double(n):\n    return n * 2",
               ["assert double(2) == 4", "assert double(0) == 0", "assert double(-3) == -6"], "easy_train")


def test_the_static_checks_report_bad_shapes_and_duplicates():
    twice = _task(2002, "Write a function to double a number.", "def twice(x):\n    return x + x",
                  ["assert twice(1) == 2", "assert twice(5) == 10", "assert twice(-1) == -2"], "heldout")
    copied = _task(2003, "Write a function to return two times n.", "def dbl(n):\n    return n * 2",
                   ["assert dbl(1) == 2", "assert dbl(2) == 4", "assert dbl(3) == 6"], "heldout")
    he_name = _task(2004, "Write a function to say whether any two values are close.",
                    "def has_close_elements(xs, t):\n    return False",
                    ["assert has_close_elements([], 1) == False"] * 3)
    bad = _task(7, "Doubles a number", "x = 1\ndef f(n):\n    return n", ["f(1) == 1"])
    pool_in_easy_range = _task(2100, DOUBLE.text, DOUBLE.code, list(DOUBLE.test_list), "heldout")
    easy_in_pool_range = _task(1500, DOUBLE.text, DOUBLE.code, list(DOUBLE.test_list), "easy_heldout")
    overlap = tasks_check.overlap_problems([DOUBLE, twice, copied, he_name], [], load_humaneval())
    assert any("2002" in p and "same text" in p for p in overlap)
    assert any("2003" in p and "same solution" in p for p in overlap)
    assert any("2004" in p and "HumanEval/0" in p for p in overlap)
    shape = " | ".join(tasks_check.shape_problems([bad]))
    for expected in ("task_id must be >= 1001", 'must start with "Write a function to "', "one sentence",
                     "only imports and one function", "must hold 3 assert lines", "single assert"):
        assert expected in shape
    assert tasks_check.shape_problems([DOUBLE]) == []
    assert tasks_check.shape_problems([pool_in_easy_range, easy_in_pool_range]) == [
        "task 2100 (heldout): task_id must be < 2001 in the pool, clear of the easy tier's ids",
        "task 1500 (easy_heldout): task_id must be >= 2001 in the easy tier, clear of the pool's and the demo "
        "tasks' ids",
    ]
    counts = tasks_check.count_problems([DOUBLE] * 200, [DOUBLE] * 50, [DOUBLE] * 99, [])
    assert counts == ["the easy training split has 99 tasks, fewer than 100",
                      "the easy held-out split has 0 tasks, fewer than 50"]


def test_the_sandboxed_checks_report_a_failing_reference_and_a_disguised_duplicate(sandbox):
    wrong = _task(2005, "Write a function to triple a number.", "def triple(n):\n    return n * 2",
                  ["assert triple(1) == 3", "assert triple(0) == 0", "assert triple(2) == 6"])
    twice = _task(2006, "Write a function to add a number to itself.", "def twice(x):\n    return x + x",
                  ["assert twice(1) == 2", "assert twice(5) == 10", "assert twice(-1) == -2"], "heldout")
    failing = tasks_check.reference_problems(sandbox, [DOUBLE, wrong])
    assert len(failing) == 1 and failing[0].startswith("task 2005:")
    same = tasks_check.behaviour_problems(sandbox, [DOUBLE, wrong, twice], [], {})
    assert any("task 2001 passes every test of task 2006" in p for p in same)
    assert any("task 2006 passes every test of task 2001" in p for p in same)
    assert any("task 2005: the reference fails its tests" in p for p in same)
