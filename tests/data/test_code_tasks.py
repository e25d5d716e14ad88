"""The bundled code tasks (tuneforge/data/code_tasks_*.jsonl) hold what scripts/check_code_tasks.py
checks, and the checks themselves catch what they are for."""

from __future__ import annotations

import pytest

from tuneforge import tasks_check
from tuneforge.tasks_check import Task
from worker.evaluation.errors import SandboxUnavailable
from worker.evaluation.harness import load_humaneval
from worker.evaluation.sandbox import Sandbox, SandboxLimits


@pytest.fixture(scope="module")
def bundle() -> tuple[list[Task], list[Task], list[Task]]:
    train, heldout, demo, problems = tasks_check.load_bundle()
    assert problems == []
    return train, heldout, demo


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    try:
        return Sandbox(SandboxLimits(timeout_s=tasks_check.CROSS_TIMEOUT_S), mode="strong")
    except SandboxUnavailable as exc:
        pytest.skip(f"no bubblewrap sandbox on this machine (needs bwrap and user namespaces): {exc.message}")


def test_bundle_has_at_least_200_training_and_50_heldout_tasks_of_the_mbpp_shape(bundle):
    train, heldout, _ = bundle
    assert len(train) >= 200
    assert len(heldout) >= 50
    assert tasks_check.count_problems(train, heldout) == []
    assert tasks_check.shape_problems([*train, *heldout]) == []


def test_no_task_repeats_another_a_demo_task_or_a_humaneval_problem(bundle):
    train, heldout, demo = bundle
    assert tasks_check.overlap_problems([*train, *heldout], demo, load_humaneval()) == []
    train_names = {t.entry_point for t in train}
    assert train_names.isdisjoint(t.entry_point for t in heldout)


def test_every_reference_passes_its_tests_in_the_sandbox(bundle, sandbox):
    train, heldout, _ = bundle
    assert tasks_check.reference_problems(sandbox, [*train, *heldout]) == []


def test_no_reference_solves_another_tasks_tests(bundle, sandbox):
    train, heldout, demo = bundle
    assert tasks_check.behaviour_problems(sandbox, [*train, *heldout], demo, load_humaneval()) == []


def _task(task_id: int, text: str, code: str, tests: list[str], split: str = "train") -> Task:
    return Task(task_id, text, code, tuple(tests), split)


DOUBLE = _task(2001, "Write a function to double a number.", "def double(n):\n    return n * 2",
               ["assert double(2) == 4", "assert double(0) == 0", "assert double(-3) == -6"])


def test_the_static_checks_report_bad_shapes_and_duplicates():
    twice = _task(2002, "Write a function to double a number.", "def twice(x):\n    return x + x",
                  ["assert twice(1) == 2", "assert twice(5) == 10", "assert twice(-1) == -2"], "heldout")
    copied = _task(2003, "Write a function to return two times n.", "def dbl(n):\n    return n * 2",
                   ["assert dbl(1) == 2", "assert dbl(2) == 4", "assert dbl(3) == 6"], "heldout")
    he_name = _task(2004, "Write a function to say whether any two values are close.",
                    "def has_close_elements(xs, t):\n    return False",
                    ["assert has_close_elements([], 1) == False"] * 3)
    bad = _task(7, "Doubles a number", "x = 1\ndef f(n):\n    return n", ["f(1) == 1"])
    overlap = tasks_check.overlap_problems([DOUBLE, twice, copied, he_name], [], load_humaneval())
    assert any("2002" in p and "same text" in p for p in overlap)
    assert any("2003" in p and "same solution" in p for p in overlap)
    assert any("2004" in p and "HumanEval/0" in p for p in overlap)
    shape = " | ".join(tasks_check.shape_problems([bad]))
    for expected in ("task_id must be >= 1001", 'must start with "Write a function to "', "one sentence",
                     "only imports and one function", "must hold 3 assert lines", "single assert"):
        assert expected in shape


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
