"""Completion-only labels, the padding and packing collators, and packed-batch loss equality."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForCausalLM

from app.domains.files import formats
from app.domains.files.formats import RecordFormat
from worker.training.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    PackedCollator,
    encode_record_with_labels,
    format_record,
    prompt_style_for,
    tokenize_records,
)
from worker.training.packing import PACKED_SDPA, register_packed_sdpa, split_packed_batch
from worker.training.tiny import EOS


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The text of the tokens that carry a label."""
    assert len(ids) == len(labels)
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def ignored_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])


@pytest.mark.parametrize(
    ("record", "prompt", "completion"),
    [
        ({"prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n", "completion": "    return 2 * x\n"},
         "def f(x):\n    \"\"\"Double x.\"\"\"\n", "    return 2 * x\n" + EOS),
        ({"prompt": "def g():\n", "canonical_solution": "    return 1\n", "test": "assert g() == 1",
          "entry_point": "g"}, "def g():\n", "    return 1\n" + EOS),
        ({"text": "Return one.", "code": "def h():\n    return 1", "test_list": ["assert h() == 1"]},
         "You are an expert Python programmer, and here is your task: Return one. Your code should pass these "
         "tests:\n\nassert h() == 1\n", "def h():\n    return 1" + EOS),
    ],
    ids=["prompt_completion", "humaneval", "mbpp"],
)
def test_completion_only_labels_cover_the_completion_and_eos_not_the_prompt(tokenizer, record, prompt, completion):
    ids, labels = encode_record_with_labels(record, tokenizer, completion_only=True)
    trained, ignored = trained_text(tokenizer, ids, labels), ignored_text(tokenizer, ids, labels)
    # The labelled tokens are a suffix of the text: the completion, plus at most the one token that
    # straddles the prompt/completion boundary (BPE may merge "\n" + "    ").
    assert ignored + trained == prompt + completion
    assert trained.endswith(completion) and len(trained) - len(completion) <= 1
    assert ignored.strip() and prompt.startswith(ignored)


def test_chat_labels_cover_each_assistant_turn_with_its_end_of_turn(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Write Python."},
        {"role": "user", "content": "Add one."},
        {"role": "assistant", "content": "x + 1"},
        {"role": "user", "content": "Now two."},
        {"role": "assistant", "content": "x + 2"},
    ]}
    ids, labels = encode_record_with_labels(record, tokenizer, completion_only=True)
    assert trained_text(tokenizer, ids, labels) == f"x + 1{EOS}\nx + 2{EOS}\n"
    ignored = ignored_text(tokenizer, ids, labels)
    assert "Add one." in ignored and "<|assistant|>" in ignored


def test_chat_labels_without_a_template_cover_assistant_content_and_final_eos(tokenizer):
    tokenizer.chat_template = None
    record = {"messages": [{"role": "user", "content": "Add one."}, {"role": "assistant", "content": "x + 1"}]}
    ids, labels = encode_record_with_labels(record, tokenizer, completion_only=True)
    assert trained_text(tokenizer, ids, labels) == f"x + 1\n{EOS}"


MBPP_H = {"text": "Return one.", "code": "def h():\n    return 1", "test_list": ["assert h() == 1"]}


def test_a_code_task_in_the_chat_style_trains_on_its_fenced_answer_as_the_assistant_turn(tokenizer):
    ids, labels = encode_record_with_labels(MBPP_H, tokenizer, completion_only=True, prompt_style="chat")
    assert trained_text(tokenizer, ids, labels) == f"```python\ndef h():\n    return 1\n```{EOS}\n"
    assert "Your code should pass these tests" in ignored_text(tokenizer, ids, labels)
    conversation = formats.task_conversation(MBPP_H, RecordFormat.MBPP)
    assert format_record(MBPP_H, tokenizer, "chat") == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert format_record(MBPP_H, tokenizer, "auto") == format_record(MBPP_H, tokenizer, "chat")


def test_auto_lays_a_code_task_out_for_completion_without_a_chat_template(tokenizer):
    tokenizer.chat_template = None
    assert prompt_style_for(tokenizer, "auto") == "completion"
    prompt, code = formats.prompt_and_completion(MBPP_H, RecordFormat.MBPP)
    assert format_record(MBPP_H, tokenizer, "auto") == prompt + code + EOS
    # chat asked for without a template: the plain chat layout, as chat records train
    ids, labels = encode_record_with_labels(MBPP_H, tokenizer, completion_only=True, prompt_style="chat")
    assert trained_text(tokenizer, ids, labels) == f"```python\ndef h():\n    return 1\n```\n{EOS}"


def test_plain_text_and_full_loss_label_every_token(tokenizer):
    text_ids, text_labels = encode_record_with_labels({"text": "import os\n"}, tokenizer, completion_only=True)
    assert text_labels == text_ids
    record = {"prompt": "def f():\n", "completion": "    return 1\n"}
    ids, labels = encode_record_with_labels(record, tokenizer, completion_only=False)
    assert labels == ids


def test_example_whose_completion_is_truncated_away_is_skipped(tokenizer):
    records = [{"prompt": "x = 1\n" * 40, "completion": "y = 2\n"}, {"prompt": "a = ", "completion": "3\n"}]
    examples = tokenize_records(records, tokenizer, max_seq_length=16, completion_only=True)
    assert len(examples.input_ids) == 1 and examples.num_skipped == 1 and examples.num_truncated == 1
    assert examples.num_target_tokens == sum(label != IGNORE_INDEX for label in examples.labels[0][1:])
    assert examples.num_target_tokens < examples.num_tokens


def test_padding_collator_keeps_given_labels_and_ignores_padding(tokenizer):
    pad = tokenizer.pad_token_id
    batch = CausalLMCollator(tokenizer)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [-100, 9]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_packing_collator_restarts_positions_and_blocks_the_first_label_of_each_example():
    batch = PackedCollator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                              {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_SDPA])
def test_loss_of_a_packed_batch_equals_the_token_weighted_loss_of_its_examples(base_path, tokenizer, attention):
    register_packed_sdpa()
    model = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=torch.float32,
                                                 attn_implementation=attention)
    model.eval()
    # As in training: with a KV cache transformers does not look for packed sequences.
    model.config.use_cache = False
    records = [{"prompt": "def f(x):\n", "completion": "    return x * 3\n"},
               {"text": "import os\nprint(os.sep)\n"},
               {"prompt": "class A:\n", "completion": "    pass\n"}]
    examples = [dict(zip(("input_ids", "labels"), encode_record_with_labels(r, tokenizer, completion_only=True),
                         strict=True))
                for r in records]
    # Stock attention finds the boundaries in the position ids (it ignores cu_seq_lens); the
    # per-example SDPA reads cu_seq_lens.
    packed = PackedCollator(with_flash_attn_kwargs=True)(examples)
    with torch.no_grad():
        packed_loss = model(**packed).loss
        total, count = 0.0, 0
        for e in examples:
            labels = torch.tensor([e["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += model(input_ids=torch.tensor([e["input_ids"]]), labels=labels).loss.item() * n
            count += n
        # The same row with positions counting on across examples (no boundaries): attention would cross them.
        crossing = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
        rows = split_packed_batch(packed, row_tokens=len(examples[0]["input_ids"]) + 2)
        row_losses = [model(**row).loss.item() * int((row["labels"] != IGNORE_INDEX).sum()) for row in rows]
        # Rows padded to a multiple of 16 with a segment of their own: the same token losses.
        padded = split_packed_batch(packed, row_tokens=len(examples[0]["input_ids"]) + 2, pad_to_multiple_of=16,
                                    pad_token_id=tokenizer.pad_token_id)
        padded_losses = [model(**row).loss.item() * int((row["labels"] != IGNORE_INDEX).sum()) for row in padded]
    assert len(rows) >= 2
    assert sum(row_losses) / count == pytest.approx(total / count, rel=1e-5)
    assert any(row["input_ids"].shape[1] % 16 for row in rows)
    assert all(row["input_ids"].shape[1] % 16 == 0 for row in padded)
    assert padded_losses == pytest.approx(row_losses, rel=1e-5)
    assert packed_loss.item() == pytest.approx(total / count, rel=1e-5)
    assert abs(crossing.item() - total / count) > 1e-3


def test_split_packed_batch_cuts_rows_at_example_boundaries():
    examples = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))} for n in (3, 2, 4, 6)]
    batch = PackedCollator(with_flash_attn_kwargs=True)(examples)
    rows = split_packed_batch(batch, row_tokens=5)
    # 3+2 fit in 5; 4 alone; 6 is longer than a row and gets one of its own.
    assert [r["cu_seq_lens_q"].tolist() for r in rows] == [[0, 3, 5], [0, 4], [0, 6]]
    assert [r["max_length_q"] for r in rows] == [3, 4, 6]
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([r[key] for r in rows], dim=1), batch[key])
    assert all(r["labels"][0, 0].item() == IGNORE_INDEX for r in rows)


def test_split_packed_batch_pads_each_row_with_a_segment_of_its_own():
    examples = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))} for n in (3, 2, 4, 8)]
    batch = PackedCollator(with_flash_attn_kwargs=True)(examples)
    rows = split_packed_batch(batch, row_tokens=5, pad_to_multiple_of=4, pad_token_id=1)
    # 3+2 -> 8 (pad 3), 4 -> 4 (no pad), 8 -> 8 (no pad).
    assert [r["cu_seq_lens_q"].tolist() for r in rows] == [[0, 3, 5, 8], [0, 4], [0, 8]]
    assert [r["max_length_q"] for r in rows] == [3, 4, 8]
    first = rows[0]
    assert first["input_ids"][0, 5:].tolist() == [1, 1, 1]
    assert first["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert first["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    # Without the padding segments the rows are exactly the unpadded cut.
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([first[key][:, :5], rows[1][key], rows[2][key]], dim=1), batch[key])
