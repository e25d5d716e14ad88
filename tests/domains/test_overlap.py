"""The overlap check: which evaluation tasks are in the training data, by normalized text or code."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from app.domains.evaluations import overlap
from app.domains.files import formats
from app.domains.files.formats import RecordFormat


def _bundled(name: str) -> list[dict]:
    text = resources.files("tuneforge").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _tasks(records: list[dict]) -> list[tuple[str, dict, RecordFormat]]:
    return [(str(r.get("task_id", i)), r, formats.require(r, formats.TASK_FORMATS)) for i, r in enumerate(records, 1)]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _bundled("code_tasks_train.jsonl")


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return _bundled("code_tasks_heldout.jsonl")


def test_tasks_that_are_a_subset_of_the_training_file_all_overlap(train):
    tasks = _tasks(train[10:25])
    found = overlap.find(tasks, train)
    assert found.task_ids == tuple(t for t, _, _ in tasks) and found.contaminated
    assert found.by_text == found.by_code == 15 and found.records == len(train)
    summary = found.summary(files=["file-train"])
    assert summary["contaminated"] is True and summary["count"] == 15 and summary["tasks"] == 15
    assert summary["task_ids"] == [t for t, _, _ in tasks] and summary["files"] == ["file-train"]


def test_held_out_tasks_do_not_overlap_the_training_file(train, heldout):
    found = overlap.find(_tasks(heldout), train)
    assert found.task_ids == () and not found.contaminated and found.tasks == len(heldout)
    assert overlap.find(_tasks(heldout), heldout[:0]).summary()["count"] == 0


def test_a_report_lists_at_most_twenty_of_the_overlapping_ids(train):
    summary = overlap.find(_tasks(train[:30]), train).summary()
    assert summary["count"] == 30 and summary["task_ids"] == [t for t, _, _ in _tasks(train[:20])]


def test_reformatted_code_is_caught_by_its_normal_form(train):
    task = train[3]
    code = task["code"].replace("    ", "\t")  # re-indented, recommented, docstring and blank lines added
    lines = code.splitlines()
    code = "\n\n".join([lines[0], '\t"""A docstring the task did not have."""', *lines[1:]]) + "   # done\n"
    assert formats.normalize_code(code) == formats.normalize_code(task["code"]) and code != task["code"]
    found = overlap.find(_tasks([task]), [{"text": "something else entirely", "code": code, "test_list": ["pass"]}])
    assert found.task_ids == (str(task["task_id"]),) and found.by_code == 1 and found.by_text == 0


def test_text_with_changed_whitespace_and_case_is_caught(train):
    task = train[5]
    shouted = "  " + "\n".join(task["text"].upper().split()) + "\t"
    found = overlap.find(_tasks([task]), [{"prompt": shouted, "completion": "return None"}])
    assert found.by_text == 1 and found.by_code == 0 and found.contaminated


@pytest.mark.parametrize("layout", ["chat", "completion"])
def test_a_task_laid_out_as_training_lays_it_out_is_caught(train, layout):
    task = train[7]
    if layout == "chat":
        record = {"messages": formats.task_conversation(task, RecordFormat.MBPP)}
    else:
        prompt, completion = formats.prompt_and_completion(task, RecordFormat.MBPP)
        record = {"prompt": prompt, "completion": completion}
    found = overlap.find(_tasks([task]), [record])
    assert found.by_text == 1 and found.by_code == 1


def test_a_different_task_with_the_same_words_in_another_order_does_not_overlap(train):
    task = train[0]
    other = {**task, "text": " ".join(reversed(task["text"].split())), "code": "def unrelated():\n    return 0"}
    assert not overlap.find(_tasks([task]), [other]).contaminated
