"""The evaluation's overlap check on staged files: the built-in HumanEval against a training file
that holds HumanEval prompts, as the pipeline runs it (runner.check_overlap)."""

from __future__ import annotations

import json

from app.core.storage import get_storage
from app.domains.files import formats
from worker.evaluation.runner import check_overlap
from worker.evaluation.tasks_io import builtin_humaneval_tasks


def _stored(tmp_path, key: str, records: list[dict]) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    get_storage().put_file(path, key)
    return key


def test_a_training_file_holding_humaneval_prompts_contaminates_builtin_humaneval(services_env, tmp_path):
    tasks = builtin_humaneval_tasks()
    assert len(tasks) == 164
    # Ten prompts as training prompts, re-cased and re-spaced, with answers of the team's own.
    records = [{"prompt": t.record["prompt"].upper().replace("    ", "  "), "completion": "    return None\n"}
               for t in tasks[:10]]
    records += [{"text": "Unrelated prose about gardening."}, {"prompt": "Say hi.", "completion": "hi"}]
    key = _stored(tmp_path, "teams/t/files/file-he/train.jsonl", records)
    found = check_overlap(tasks, (("file-he", key), ("file-gone", None)))
    assert found["contaminated"] is True and found["count"] == 10 and found["tasks"] == 164
    assert found["task_ids"] == [t.task_id for t in tasks[:10]] and found["by_text"] == 10
    assert found["files"] == ["file-he"] and found["missing"] == ["file-gone"]
    assert found["training_records"] == len(records)


def test_reformatted_humaneval_solutions_are_caught_by_code(services_env, tmp_path):
    tasks = builtin_humaneval_tasks()[20:23]
    # The whole solution, docstring dropped and re-laid out by the parser: no text of the prompt is left.
    records = [{"text": formats.normalize_code(t.record["prompt"] + t.record["canonical_solution"]) + "  # mine"}
               for t in tasks]
    key = _stored(tmp_path, "teams/t/files/file-code/train.jsonl", records)
    found = check_overlap(builtin_humaneval_tasks(), (("file-code", key),))
    assert found["task_ids"] == [t.task_id for t in tasks] and found["by_code"] == 3 and found["by_text"] == 0


def test_no_overlap_when_the_training_data_holds_no_humaneval_task(services_env, tmp_path):
    key = _stored(tmp_path, "teams/t/files/file-own/train.jsonl",
                  [{"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}])
    found = check_overlap(builtin_humaneval_tasks(), (("file-own", key),))
    assert found["contaminated"] is False and found["count"] == 0 and found["task_ids"] == []
