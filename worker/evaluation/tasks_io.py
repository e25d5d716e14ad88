"""Code tasks from a JSONL file (MBPP- or HumanEval-style) or the built-in HumanEval set, as the
harness's problems plus the prompt a model continues."""

from __future__ import annotations

import json
from pathlib import Path

from worker.evaluation.generate import Prompt
from worker.evaluation.harness import HumanEvalProblem, MbppProblem, Problem, load_humaneval


def builtin_humaneval() -> tuple[dict[str, Problem], list[Prompt]]:
    problems = load_humaneval()
    return dict(problems), [Prompt(task_id=p.task_id, text=p.prompt, format="humaneval") for p in problems.values()]


def from_jsonl(path: Path) -> tuple[dict[str, Problem], list[Prompt]]:
    """Problems and prompts of an uploaded task file (validated at upload). MBPP tasks without a
    task_id are numbered by line; the prompt is the task text, as training formats it."""
    problems: dict[str, Problem] = {}
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "entry_point" in rec:
                task_id = str(rec.get("task_id", f"task/{line_no}"))
                problems[task_id] = HumanEvalProblem(task_id=task_id, prompt=rec["prompt"], test=rec["test"],
                                                     entry_point=rec["entry_point"],
                                                     canonical_solution=rec.get("canonical_solution", ""))
                prompts.append(Prompt(task_id=task_id, text=rec["prompt"], format="humaneval"))
            else:
                task_id = str(rec.get("task_id", line_no))
                problems[task_id] = MbppProblem(task_id=task_id, test_list=tuple(rec["test_list"]),
                                                test_setup_code=rec.get("test_setup_code", ""),
                                                reference_code=rec.get("code", ""))
                prompts.append(Prompt(task_id=task_id, text=rec["text"] + "\n", format="mbpp"))
    return problems, prompts
