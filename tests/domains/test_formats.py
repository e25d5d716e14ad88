"""Record formats and prompt layouts: one detection rule, one plain chat layout."""

from __future__ import annotations

import pytest

from app.domains.files import formats
from app.domains.files.formats import RecordFormat

MBPP = {"text": "Add two numbers.", "code": "def add(a, b):\n    return a + b", "test_list": ["assert add(1, 2) == 3"]}
HUMANEVAL = {"prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "def check(c): pass",
             "entry_point": "f"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]


@pytest.mark.parametrize("record, fmt", [
    ({**MBPP, "prompt": "extra", "completion": "extra"}, RecordFormat.MBPP),
    ({**MBPP, "entry_point": "add"}, RecordFormat.MBPP),
    ({**HUMANEVAL, "completion": "extra", "text": "extra"}, RecordFormat.HUMANEVAL),
], ids=["mbpp_with_prompt_completion_keys", "mbpp_with_entry_point", "humaneval_with_other_keys"])
def test_a_valid_record_with_another_formats_keys_keeps_its_own_format(record: dict, fmt: RecordFormat) -> None:
    assert formats.require(record) == fmt


def test_a_humaneval_record_missing_a_field_is_refused_not_taken_for_another_format() -> None:
    record = {"prompt": "def f():\n", "completion": "    return 1\n", "test": "def check(c): pass"}
    assert formats.detect(record) == RecordFormat.HUMANEVAL
    with pytest.raises(formats.RecordInvalid) as info:
        formats.require(record)
    assert [p.split(" ")[0] for p in info.value.problems] == ['"canonical_solution"', '"entry_point"']


def test_a_format_outside_the_allowed_ones_is_refused() -> None:
    with pytest.raises(formats.RecordInvalid, match="this record is text; here a record must be one of mbpp"):
        formats.require({"text": "hello"}, formats.TASK_FORMATS)


MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: Add two numbers. Your code should pass "
               "these tests:\n\nassert add(1, 2) == 3\n")


def test_a_task_prompt_is_the_prompt_of_its_training_example() -> None:
    assert formats.task_prompt(MBPP, RecordFormat.MBPP) == MBPP_PROMPT
    assert formats.prompt_and_completion(MBPP, RecordFormat.MBPP) == (MBPP_PROMPT, MBPP["code"])
    assert formats.task_prompt(HUMANEVAL, RecordFormat.HUMANEVAL) == HUMANEVAL["prompt"]


def test_plain_chat_marks_each_assistant_turn() -> None:
    text, spans = formats.plain_chat(MESSAGES)
    assert text == "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n4\n<|user|>\n3+3?\n"
    assert [text[s:e] for s, e in spans] == ["4\n"]
    assert formats.plain_chat_prompt(MESSAGES) == text + "<|assistant|>\n"


def test_the_plain_chat_template_renders_the_plain_chat_layout() -> None:
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(formats.plain_chat_template())
    assert template.render(messages=MESSAGES, add_generation_prompt=True) == formats.plain_chat_prompt(MESSAGES)
    with_eos = jinja2.Environment().from_string(formats.plain_chat_template(end_of_turn="</s>"))
    assert with_eos.render(messages=MESSAGES[:1], add_generation_prompt=False) == "<|system|>\nBe brief.</s>\n"


def test_an_mbpp_prompt_shows_the_tests_that_name_the_function() -> None:
    record = {**MBPP, "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
    prompt = formats.task_prompt(record, RecordFormat.MBPP)
    assert prompt.endswith("Your code should pass these tests:\n\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n")
    assert "Add two numbers." in prompt


def test_a_chat_task_is_a_user_message_answered_by_fenced_reference_code() -> None:
    assert formats.task_messages(MBPP, RecordFormat.MBPP) == [{"role": "user", "content": MBPP_PROMPT}]
    assert formats.task_answer(MBPP, RecordFormat.MBPP) == "```python\ndef add(a, b):\n    return a + b\n```"
    [message] = formats.task_messages(HUMANEVAL, RecordFormat.HUMANEVAL)
    assert message["role"] == "user" and "```python\ndef f():\n```" in message["content"]
    # A humaneval answer is the whole function: the prompt's signature and the canonical body.
    assert formats.task_answer(HUMANEVAL, RecordFormat.HUMANEVAL) == "```python\ndef f():\n    return 1\n```"
    assert formats.task_conversation(MBPP, RecordFormat.MBPP) == [
        {"role": "user", "content": MBPP_PROMPT},
        {"role": "assistant", "content": formats.task_answer(MBPP, RecordFormat.MBPP)}]


def test_only_code_tasks_have_chat_layouts() -> None:
    with pytest.raises(ValueError, match="no code task"):
        formats.task_messages({"text": "hello"}, RecordFormat.TEXT)


@pytest.mark.parametrize("requested, has_template, resolved", [
    ("auto", True, "chat"), ("auto", False, "completion"),
    ("chat", False, "chat"), ("completion", True, "completion"),
])
def test_auto_prompt_style_is_chat_exactly_when_there_is_a_chat_template(requested: str, has_template: bool,
                                                                         resolved: str) -> None:
    assert formats.resolve_prompt_style(requested, has_chat_template=has_template) == resolved


def test_prompt_style_is_validated_on_evaluations_and_training() -> None:
    from pydantic import ValidationError

    from app.domains.evaluations.spec import JobEvalSpec, SamplingSpec
    from app.domains.jobs.spec import TrainingSettings

    assert SamplingSpec().prompt_style == "auto" and TrainingSettings().prompt_style == "auto"
    assert JobEvalSpec(prompt_style="completion").model_dump(mode="json")["prompt_style"] == "completion"
    for spec in (SamplingSpec, TrainingSettings):
        with pytest.raises(ValidationError, match="'auto', 'chat' or 'completion'"):
            spec(prompt_style="instruct")


def test_text_is_compared_without_case_or_layout() -> None:
    normal = formats.normalize_text("  Write a FUNCTION\n\tto add  two numbers. ")
    assert normal == "write a function to add two numbers."
    assert formats.normalize_text("Add two numbers.") != formats.normalize_text("Add three numbers.")


def test_code_is_compared_without_layout_comments_or_docstrings_but_with_its_names() -> None:
    original = 'def add(a, b):\n    """Sum of a and b."""\n    return a + b\n'
    reformatted = "def add(a,b):  # sum\n\n    return (a+b)"
    assert formats.normalize_code(original) == formats.normalize_code(reformatted) == "def add(a, b):\n    return a + b"
    assert formats.normalize_code("def plus(a, b):\n    return a + b") != formats.normalize_code(original)
    assert formats.normalize_code('class C:\n    """Doc."""\n') == "class C:\n    pass"
    assert formats.normalize_code("    return x\n") == "return x"  # an indented body alone
    assert formats.normalize_code("def f(:") is None and formats.normalize_code("# only a comment") is None
