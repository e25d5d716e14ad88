"""The JSONL dataset validator: formats, line errors, chunking and bounded memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from app.domains.files.validation import FORMATS, JsonlValidator, LineError, ValidationReport, validate_bytes_iter

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}
PROMPT_COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "Once upon a time."}
MBPP = {"task_id": 2, "text": "Write a function that adds two numbers.", "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"}


def jsonl(*records: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def validate(data: bytes, **kw: Any) -> ValidationReport:
    return validate_bytes_iter([data], **kw)


def only_error(report: ValidationReport) -> LineError:
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


# --- accepted formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, record", [("chat", CHAT), ("prompt_completion", PROMPT_COMPLETION), ("text", TEXT),
                                         ("mbpp", MBPP), ("humaneval", HUMANEVAL)],
                         ids=["chat", "prompt_completion", "text", "mbpp", "humaneval"])
def test_each_format_is_accepted_detected_and_counted(fmt: str, record: dict) -> None:
    report = validate(jsonl(record, record, record))
    assert fmt in FORMATS
    assert report == ValidationReport(format=fmt, examples=3, errors=[], lines=3, error_count=0)
    assert report.ok


def test_extra_keys_are_allowed_and_do_not_change_detection() -> None:
    report = validate(jsonl({**CHAT, "prompt": "ignored", "completion": "ignored", "id": 1},
                            {**CHAT, "text": "ignored", "tools": []}))
    assert (report.format, report.examples, report.errors) == ("chat", 2, [])
    assert validate(jsonl({**TEXT, "source": "web", "meta": {"lang": "en"}})).format == "text"


def test_optional_fields_are_accepted() -> None:
    chat = {"messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                         "function": {"name": "weather",
                                                                                      "arguments": "{}"}}]},
                         {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                         {"role": "assistant", "content": "draft", "weight": 0},
                         {"role": "assistant", "content": "It is sunny.", "weight": 1}]}
    assert validate(jsonl(chat)).errors == []
    mbpp_without_id = {k: v for k, v in MBPP.items() if k != "task_id"}
    assert validate(jsonl({**MBPP, "task_id": "Mbpp/2"}, mbpp_without_id)).errors == []
    assert validate(jsonl({k: v for k, v in HUMANEVAL.items() if k != "task_id"})).errors == []
    assert validate(jsonl({"prompt": "", "completion": "free text"})).errors == []


def test_chat_names_and_text_content_parts_are_accepted() -> None:
    chat = {"messages": [{"role": "user", "name": "ada", "content": [{"type": "text", "text": "2+2?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}
    report = validate(jsonl(chat))
    assert (report.format, report.examples, report.errors) == ("chat", 1, [])


def test_blank_and_whitespace_lines_are_skipped_but_counted_as_lines() -> None:
    data = b"\n" + jsonl(TEXT) + b"   \t\n\n" + jsonl(TEXT) + b" \r\n"
    report = validate(data)
    assert (report.examples, report.errors, report.lines) == (2, [], 6)


def test_last_line_without_newline_is_validated() -> None:
    report = validate(jsonl(TEXT) + b'{"text": ""}')
    assert report.lines == 2
    assert only_error(report) == LineError(2, '"text" must be a non-empty string; got ""')


def test_crlf_line_endings_are_accepted() -> None:
    report = validate(jsonl(CHAT, CHAT).replace(b"\n", b"\r\n"))
    assert (report.format, report.examples, report.errors, report.lines) == ("chat", 2, [], 2)


def test_utf8_bom_at_the_start_is_accepted() -> None:
    report = validate(b"\xef\xbb\xbf" + jsonl(TEXT, TEXT))
    assert (report.format, report.examples, report.errors) == ("text", 2, [])


def test_utf8_bom_in_the_middle_is_reported() -> None:
    report = validate(jsonl(TEXT) + b"\xef\xbb\xbf" + jsonl(TEXT))
    error = only_error(report)
    assert error.line == 2 and "byte-order mark" in error.message


# --- line errors --------------------------------------------------------------------------------


def test_invalid_json_is_reported_with_line_and_column() -> None:
    report = validate(jsonl(TEXT) + b'{"text": "a",}\n' + jsonl(TEXT))
    error = only_error(report)
    assert error.line == 2
    assert error.message.startswith("invalid JSON: Expecting property name enclosed in double quotes at column 14")
    assert report.examples == 2


def test_a_line_that_is_not_an_object_is_reported() -> None:
    report = validate(jsonl(TEXT, ["text", "hi"], "hi"))
    assert [(e.line, e.message.split(";")[0]) for e in report.errors] == [
        (2, 'each line must be a JSON object ({"key": value, ...})'),
        (3, 'each line must be a JSON object ({"key": value, ...})')]
    assert report.errors[1].message.endswith('got "hi"')


def test_invalid_utf8_is_reported_with_its_byte_offset() -> None:
    line2 = '{"text": "café '.encode() + b"\xff" + b'"}\n'
    report = validate(jsonl(TEXT) + line2)
    offset = line2.index(b"\xff")
    assert only_error(report) == LineError(
        2, f"not valid UTF-8: byte 0xff at byte offset {offset} of the line "
           f"(offset {len(jsonl(TEXT)) + offset} in the file); save the file as UTF-8")


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, '"messages" must be a non-empty array of {"role": ..., "content": ...} objects; got []'),
    ({"messages": "hi"}, '"messages" must be a non-empty array of {"role": ..., "content": ...} objects; got "hi"'),
    ({"messages": ["hi"]}, '"messages"[0] must be an object like {"role": "user", "content": "..."}; got "hi"'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     '"messages"[1]["role"] must be one of system, user, assistant, tool; got "bot"'),
    ({"messages": [{"content": "hi"}]},
     '"messages"[0]["role"] is missing; set it to one of system, user, assistant, tool'),
    ({"messages": [{"role": "user", "content": ["hi"]}]},
     '"messages"[0]["content"][0] must be a text part like {"type": "text", "text": "..."}; got "hi"'),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]},
     '"messages"[0]["content"] must be a string or a non-empty array of {"type": "text", "text": "..."} parts; '
     'got an object'),
    ({"messages": [{"role": "user", "content": "hi", "name": ""}, {"role": "assistant", "content": "yo"}]},
     '"messages"[0]["name"] must be a non-empty string; got ""'),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "text", "text": ""}]}]},
     '"messages" has no assistant message with non-empty content to learn from; add one like '
     '{"role": "assistant", "content": "..."}'),
    ({"messages": [{"role": "user", "content": None}]},
     '"messages"[0]["content"] is null; give it a string '
     '(only an assistant message with "tool_calls" may leave it null)'),
    ({"messages": [{"role": "assistant"}]},
     '"messages"[0]["content"] is missing; give it a string '
     '(only an assistant message with "tool_calls" may leave it null)'),
    ({"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "yo"}]},
     '"messages"[0]["weight"] is allowed only on assistant messages; remove it'),
    ({"messages": [{"role": "assistant", "content": "yo", "weight": 2}]},
     '"messages"[0]["weight"] must be 0 or 1 (1 = learn from this message); got 2'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     '"messages" has no assistant message with non-empty content to learn from; add one like '
     '{"role": "assistant", "content": "..."}'),
    ({"messages": [{"role": "assistant", "content": "yo", "weight": 0}]},
     '"messages" has no assistant message with non-empty content to learn from; add one like '
     '{"role": "assistant", "content": "..."} or set "weight": 1 on one'),
], ids=["empty", "not_array", "message_not_object", "role_not_allowed", "role_missing", "content_part_not_text",
        "content_not_string_or_parts", "name_empty", "assistant_parts_empty",
        "content_null", "content_missing", "weight_on_user", "weight_not_0_or_1", "no_assistant_content",
        "assistant_weighted_out"])
def test_chat_field_errors_name_the_field(record: dict, message: str) -> None:
    report = validate(jsonl(CHAT, record))
    assert only_error(report) == LineError(2, message)
    assert str(report.errors[0]) == f"line 2: {message}"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "", "completion": ""}, '"completion" must be a non-empty string; got ""'),
    ({"prompt": 1, "completion": "4"}, '"prompt" must be a string; got 1'),
], ids=["completion_empty", "prompt_not_string"])
def test_prompt_completion_field_errors_name_the_field(record: dict, message: str) -> None:
    assert only_error(validate(jsonl(record))) == LineError(1, message)


@pytest.mark.parametrize("record, message", [
    ({"text": ""}, '"text" must be a non-empty string; got ""'),
    ({"text": None}, '"text" must be a non-empty string; got null'),
], ids=["empty", "null"])
def test_text_field_errors_name_the_field(record: dict, message: str) -> None:
    assert only_error(validate(jsonl(record))) == LineError(1, message)


@pytest.mark.parametrize("record, message", [
    ({k: v for k, v in MBPP.items() if k != "test_list"},
     '"test_list" is missing; an mbpp record needs "text" and "code" (non-empty strings) and "test_list" '
     "(a non-empty array of assert statements as strings)"),
    ({**MBPP, "test_list": []}, '"test_list" must be a non-empty array of assert statements as strings; got []'),
    ({**MBPP, "test_list": "assert add(1, 2) == 3"},
     '"test_list" must be a non-empty array of assert statements as strings; got "assert add(1, 2) == 3"'),
    ({**MBPP, "test_list": ["assert True", 3]},
     '"test_list"[1] must be a non-empty string (an assert statement); got 3'),
    ({**MBPP, "code": ""}, '"code" must be a non-empty string; got ""'),
    ({**MBPP, "task_id": 2.5}, '"task_id" must be an integer or a string; got 2.5'),
], ids=["test_list_missing", "test_list_empty", "test_list_not_array", "test_not_string", "code_empty",
        "task_id_float"])
def test_mbpp_field_errors_name_the_field(record: dict, message: str) -> None:
    assert only_error(validate(jsonl(record))) == LineError(1, message)


@pytest.mark.parametrize("record, message", [
    ({k: v for k, v in HUMANEVAL.items() if k != "entry_point"},
     '"entry_point" is missing; a humaneval record needs "prompt", "canonical_solution", "test" and '
     '"entry_point", all non-empty strings'),
    ({**HUMANEVAL, "test": ""}, '"test" must be a non-empty string; got ""'),
    ({**HUMANEVAL, "canonical_solution": ["x"]}, '"canonical_solution" must be a non-empty string; got an array'),
    ({**HUMANEVAL, "task_id": 0}, '"task_id" must be a string like "HumanEval/0"; got 0'),
], ids=["entry_point_missing", "test_empty", "solution_not_string", "task_id_not_string"])
def test_humaneval_field_errors_name_the_field(record: dict, message: str) -> None:
    assert only_error(validate(jsonl(record))) == LineError(1, message)


def test_every_problem_of_a_record_is_reported_on_its_line() -> None:
    report = validate(jsonl({"prompt": "def f():", "test": ""}))
    assert [e.line for e in report.errors] == [1, 1, 1]
    assert [e.message.split(" ")[0] for e in report.errors] == ['"canonical_solution"', '"test"', '"entry_point"']


def test_unknown_shape_lists_the_accepted_shapes() -> None:
    report = validate(jsonl(TEXT, {"question": "2+2?", "answer": "4"}))
    error = only_error(report)
    assert error.line == 2
    assert error.message.startswith('no dataset format matches this record\'s keys ("question", "answer")')
    for shape in FORMATS:
        assert f"({shape})" in error.message


def test_mixed_formats_are_reported_naming_both_formats_and_the_fixing_line() -> None:
    report = validate(b"not json\n" + jsonl(CHAT, CHAT, PROMPT_COMPLETION, CHAT))
    assert report.format == "chat" and report.examples == 3
    assert report.errors[1] == LineError(
        4, "this record is prompt_completion but the file's format is chat, fixed by its first valid record on "
           "line 2; a file holds one format: move the prompt_completion records to a file of their own")


def test_an_invalid_record_does_not_fix_the_format() -> None:
    report = validate(jsonl({"text": ""}, PROMPT_COMPLETION, PROMPT_COMPLETION))
    assert report.format == "prompt_completion" and report.examples == 2
    assert [e.line for e in report.errors] == [1]


@pytest.mark.parametrize("data", [b"", b"\n \n\t\r\n", b"\xef\xbb\xbf"], ids=["no_bytes", "blank_lines", "bom_only"])
def test_an_empty_file_is_one_file_level_error(data: bytes) -> None:
    report = validate(data)
    error = only_error(report)
    assert error.line == 0 and error.message.startswith("the file is empty: ")
    assert str(error) == error.message
    assert report.format is None and report.examples == 0 and not report.ok


def test_an_over_long_line_is_reported_and_skipped() -> None:
    data = jsonl(TEXT) + jsonl({"text": "x" * 200}) + jsonl({"text": ""})
    report = validate(data, max_line_bytes=100)
    assert [(e.line, e.message.split(";")[0]) for e in report.errors] == [
        (2, "the line is longer than the limit of 100 bytes"), (3, '"text" must be a non-empty string')]
    assert (report.examples, report.lines) == (1, 3)


def test_a_crlf_line_of_exactly_max_line_bytes_is_accepted() -> None:
    line = json.dumps({"text": "x" * 50}).encode()
    assert validate(line + b"\r\n", max_line_bytes=len(line)).errors == []
    assert validate(line + b"x\r\n", max_line_bytes=len(line)).errors[0].message.startswith("the line is longer")


# --- streaming ----------------------------------------------------------------------------------

MESSY = (b"\xef\xbb\xbf" + jsonl(CHAT) + b"\r\n" + jsonl({"messages": [{"role": "bot", "content": "h\u00e9"}]})
         + '{"messages": [{"role": "user", "content": "日本"}, {"role": "assistant", "content": "€"}]}\r\n'.encode()
         + b'{"text": "\xe6\x97' + b'"}\n' + b"[1, 2\n" + jsonl({"text": "y" * 300}) + jsonl(TEXT) + b'{"text": "end"')


def test_one_byte_at_a_time_gives_the_same_report_as_the_whole_file() -> None:
    whole = validate(MESSY, max_line_bytes=200)
    assert [e.line for e in whole.errors] == [3, 5, 6, 7, 8, 9] and whole.lines == 9
    assert validate_bytes_iter((MESSY[i:i + 1] for i in range(len(MESSY))), max_line_bytes=200) == whole


def test_a_chunk_boundary_anywhere_gives_the_same_report() -> None:
    whole = validate(MESSY, max_line_bytes=200)
    for cut in range(len(MESSY) + 1):
        assert validate_bytes_iter([MESSY[:cut], MESSY[cut:]], max_line_bytes=200) == whole, cut


def test_max_errors_caps_the_list_while_lines_keep_counting() -> None:
    data = jsonl(TEXT) + b"{bad\n" * 50 + jsonl(TEXT)
    report = validate(data, max_errors=3)
    assert [e.line for e in report.errors] == [2, 3, 4]
    assert (report.error_count, report.lines, report.examples) == (50, 52, 2)


def test_memory_stays_bounded_for_a_50_mb_line() -> None:
    max_line_bytes, chunk = 1 << 20, b"a" * (64 << 10)

    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range((50 << 20) // len(chunk)):
            yield chunk
        yield b'"}\n' + jsonl(TEXT)

    validator = JsonlValidator(max_line_bytes=max_line_bytes)
    largest = 0
    for part in chunks():
        validator.feed(part)
        largest = max(largest, validator.buffered)
    report = validator.finish()
    assert largest <= max_line_bytes + 1
    assert report.errors == [LineError(1, f"the line is longer than the limit of {max_line_bytes} bytes; shorten "
                                          "this example or split it into several, one JSON object per line")]
    assert (report.lines, report.examples, report.format) == (2, 1, "text")


def test_feed_after_finish_is_refused() -> None:
    validator = JsonlValidator()
    validator.feed(jsonl(TEXT))
    assert validator.finish() is validator.finish()
    with pytest.raises(RuntimeError):
        validator.feed(jsonl(TEXT))


@pytest.mark.parametrize(("line", "message"), [
    (b'{"prompt": "p", "completion": NaN}', "NaN is not a finite number (JSON has no NaN or Infinity); send a "
                                            "finite number (at completion)"),
    (b'{"text": "t", "score": -Infinity}', "-Infinity is not a finite number"),
    (b'{"text": "t", "score": 1e400}', "1e400 is not a finite number"),
    (b'{"text": "a", "text": "b"}', 'the key "text" appears more than once in one object; keep one (at text)'),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "role": "user", "content": "b"}]}',
     "(at messages.1.role)"),
])
def test_non_finite_numbers_and_duplicate_keys_are_line_errors(line: bytes, message: str) -> None:
    report = validate(jsonl(TEXT) + line + b"\n")
    assert report.examples == 1 and report.error_count == 1
    (error,) = report.errors
    assert error.line == 2 and error.message.startswith("invalid JSON: ") and message in error.message
