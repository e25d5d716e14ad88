"""Reading an uploaded task file: each record read as the format the upload validator gave it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.domains.files.formats import RecordInvalid
from app.domains.files.validation import validate_bytes_iter
from worker.evaluation.harness import HumanEvalProblem, MbppProblem
from worker.evaluation.tasks_io import builtin_humaneval, from_jsonl, named

MBPP = {"text": "Add two numbers.", "code": "def add(a, b):\n    return a + b", "test_list": ["assert add(1, 2) == 3"]}
HUMANEVAL = {"prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "def check(c): pass",
             "entry_point": "f"}


def write(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_an_mbpp_task_with_an_entry_point_key_is_read_as_mbpp(tmp_path):
    record = {**MBPP, "entry_point": "add"}
    path = write(tmp_path / "tasks.jsonl", record)
    assert validate_bytes_iter([path.read_bytes()]).format == "mbpp"
    problems, prompts = from_jsonl(path)
    assert problems == {"1": MbppProblem(task_id="1", test_list=tuple(MBPP["test_list"]), reference_code=MBPP["code"])}
    assert [(p.text, p.format) for p in prompts] == [(
        "You are an expert Python programmer, and here is your task: Add two numbers. Your code should pass these "
        "tests:\n\nassert add(1, 2) == 3\n", "mbpp")]


def test_humaneval_tasks_are_numbered_by_line_without_a_task_id(tmp_path):
    problems, prompts = from_jsonl(write(tmp_path / "tasks.jsonl", HUMANEVAL))
    assert problems == {"task/1": HumanEvalProblem(task_id="task/1", prompt=HUMANEVAL["prompt"],
                                                   test=HUMANEVAL["test"], entry_point="f",
                                                   canonical_solution=HUMANEVAL["canonical_solution"])}
    assert [(p.task_id, p.text, p.format) for p in prompts] == [("task/1", "def f():\n", "humaneval")]


def test_a_record_that_is_no_code_task_is_refused_with_its_line(tmp_path):
    with pytest.raises(RecordInvalid, match=r"tasks\.jsonl line 2: this record is text"):
        from_jsonl(write(tmp_path / "tasks.jsonl", MBPP, {"text": "not a task"}))


def test_the_builtin_humaneval_prompts_are_the_problems_prompts_in_both_styles():
    problems, prompts = builtin_humaneval()
    assert len(prompts) == 164
    first = prompts[0]
    assert first.text == problems[first.task_id].prompt and first.format == "humaneval"
    [message] = first.messages
    assert message["role"] == "user" and problems[first.task_id].prompt.strip() in message["content"]


def test_named_reads_humaneval_or_a_file_and_keeps_the_first_tasks(tmp_path):
    problems, prompts = named("humaneval", 3)
    assert [p.task_id for p in prompts] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"] and set(problems) == {
        p.task_id for p in prompts}
    path = write(tmp_path / "tasks.jsonl", MBPP, {**MBPP, "text": "Add them again."})
    assert named(str(path)) == from_jsonl(path)
    problems, prompts = named(str(path), 1)
    assert [p.task_id for p in prompts] == ["1"] and list(problems) == ["1"]
