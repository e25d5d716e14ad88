"""The LoRA recipe and its data pipeline on the real tiny model (CPU, offline).

One training run is shared by the tests that check its outcome (loss, events,
files, adapter), because each run costs seconds on a 2-core machine. Every
model and tokenizer is loaded from a local folder; nothing touches the hub.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.domains.jobs.spec import TrainingSettings, TrainingSpec
from worker.training.data import (
    CausalLMCollator,
    DataFormatError,
    encode_record,
    ensure_pad_token,
    format_record,
    load_examples,
    tokenize_records,
)
from worker.training.model import cpu_has_bf16
from worker.training.recipe import LoraRecipe, TrainResult
from worker.training.tiny import EOS


@dataclass
class RecordingHooks:
    """TrainingHooks that keeps every event and asks to stop after `stop_after` steps."""

    stop_after: int | None = None
    events: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    steps_seen: int = 0
    checkpoint_steps: list[int] = field(default_factory=list)

    def on_event(self, type: str, message: str, data: dict[str, Any] | None) -> None:
        self.events.append((type, message, data))

    def should_stop(self) -> bool:
        self.steps_seen += 1
        return self.stop_after is not None and self.steps_seen >= self.stop_after

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        assert (path / "trainer_state.json").is_file()
        self.checkpoint_steps.append(step)

    def train_metrics(self) -> list[dict[str, Any]]:
        return [d for t, _, d in self.events if t == "metrics" and "loss" in d]

    def messages(self) -> list[str]:
        return [m for t, m, _ in self.events if t == "message"]


def code_task_records(n: int, seed: int) -> list[dict[str, str]]:
    """Small prompt/completion Python tasks of varying length (so batches need padding)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        k = rng.randint(1, 9)
        body = "    total = x\n" * rng.randint(0, 3)
        records.append({
            "prompt": f'def add_{i}(x):\n    """Return x plus {k}."""\n',
            "completion": f"{body}    return x + {k}\n",
        })
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def same_random_lora(model: torch.nn.Module, copy: torch.nn.Module, seed: int = 0) -> None:
    """Give model's LoRA weights seeded normal values (std 0.05) and copy them into copy's, by name.
    peft's B = 0 would leave every A's gradient at 0."""
    torch.manual_seed(seed)
    copies = dict(copy.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
                copies[name].copy_(p)


def spec_for(**training: Any) -> TrainingSpec:
    """Periodic checkpoints off unless asked for: these tests see the Trainer's own epoch-end save."""
    settings = {"gradient_accumulation_steps": 1, "learning_rate": 3e-3, "max_seq_length": 128,
                "checkpoint_every_steps": None, **training}
    return TrainingSpec(training=TrainingSettings(**settings), seed=7)


# ---- data formats ----------------------------------------------------------

WRITE_F = ("You are an expert Python programmer, and here is your task: Write f. Your code should pass these "
           "tests:\n\nassert f() == 1\n")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "def f():\n", "completion": "    return 1\n"}, "def f():\n    return 1\n" + EOS),
        ({"text": "import os\n"}, "import os\n" + EOS),
        (
            {"text": "Write f.", "code": "def f():\n    return 1", "test_list": ["assert f() == 1"]},
            WRITE_F + "def f():\n    return 1" + EOS,
        ),
        (
            {"prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "def check(c): pass",
             "entry_point": "f"},
            "def f():\n    return 1\n" + EOS,
        ),
    ],
    ids=["prompt_completion", "text", "mbpp", "humaneval"],
)
def test_each_record_format_becomes_its_training_text(tokenizer, record, expected):
    assert format_record(record, tokenizer) == expected
    ids = encode_record(record, tokenizer)
    assert tokenizer.decode(ids) == expected
    assert ids[-1] == tokenizer.eos_token_id


def test_a_record_trains_as_the_format_the_upload_validator_gave_it(tokenizer):
    mbpp = {"text": "Write f.", "code": "def f():\n    return 1", "test_list": ["assert f() == 1"],
            "prompt": "not this", "completion": "nor this"}
    assert format_record(mbpp, tokenizer) == WRITE_F + "def f():\n    return 1" + EOS
    incomplete_humaneval = {"prompt": "def f():\n", "completion": "    return 1\n", "test": "assert f() == 1"}
    with pytest.raises(DataFormatError, match='"canonical_solution" is missing'):
        format_record(incomplete_humaneval, tokenizer)


def test_chat_record_goes_through_the_saved_chat_template(tokenizer):
    record = {"messages": [{"role": "user", "content": "Add one."}, {"role": "assistant", "content": "x + 1"}]}
    text = format_record(record, tokenizer)
    assert text == f"<|user|>\nAdd one.{EOS}\n<|assistant|>\nx + 1{EOS}\n"
    assert encode_record(record, tokenizer).count(tokenizer.eos_token_id) == 2


def test_chat_record_without_template_uses_role_tags_and_eos(tokenizer):
    tokenizer.chat_template = None
    record = {"messages": [{"role": "user", "content": "Add one."}, {"role": "assistant", "content": "x + 1"}]}
    assert format_record(record, tokenizer) == f"<|user|>\nAdd one.\n<|assistant|>\nx + 1\n{EOS}"


def test_record_of_no_known_format_is_rejected_with_its_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"input": "?", "output": "!"}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl line 2: .*match no format"):
        load_examples(path, tokenizer, 64)


def test_long_records_are_truncated_and_real_tokens_counted(tokenizer):
    records = [{"text": "x = 1\n" * 50}, {"text": "y = 2\n"}]
    examples = tokenize_records(records, tokenizer, max_seq_length=16)
    assert [len(ids) for ids in examples.input_ids] == [16, len(encode_record(records[1], tokenizer))]
    assert examples.num_tokens == sum(len(ids) for ids in examples.input_ids)
    assert examples.num_truncated == 1


def test_pad_token_becomes_eos_and_collator_still_trains_on_eos(tokenizer):
    tokenizer.pad_token = None
    assert ensure_pad_token(tokenizer) is True
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    batch = CausalLMCollator(tokenizer)([{"input_ids": [5, 6, eos]}, {"input_ids": [7, eos]}])
    # Each example's own eos is a target; only the padding after the short one is ignored.
    assert batch["labels"].tolist() == [[5, 6, eos], [7, eos, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


# ---- training --------------------------------------------------------------


@dataclass
class Run:
    result: TrainResult
    hooks: RecordingHooks
    adapter_dir: Path
    train_tokens: int


@pytest.fixture(scope="module")
def trained(base_path, tmp_path_factory) -> Run:
    """One epoch over 32 tasks in batches of 2 (16 steps), with a validation file, saved."""
    tmp = tmp_path_factory.mktemp("run")
    train_file = write_jsonl(tmp / "train.jsonl", code_task_records(32, seed=1))
    valid_file = write_jsonl(tmp / "valid.jsonl", code_task_records(4, seed=2))
    hooks = RecordingHooks()
    recipe = LoraRecipe(
        spec=spec_for(epochs=1, batch_size=2), base_model_path=base_path, train_file=train_file,
        validation_file=valid_file, work_dir=tmp / "work", hooks=hooks,
    )
    recipe.setup()
    result = recipe.train()
    recipe.save(tmp / "adapter")
    recipe.cleanup()
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    train_tokens = load_examples(train_file, tokenizer, 128).num_tokens
    return Run(result=result, hooks=hooks, adapter_dir=tmp / "adapter", train_tokens=train_tokens)


def test_training_loss_is_finite_and_falls(trained):
    losses = [m["loss"] for m in trained.hooks.train_metrics()]
    assert len(losses) == 16
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert trained.result.final_loss == losses[-1]


def test_metrics_events_report_progress_and_real_token_throughput(trained):
    metrics = trained.hooks.train_metrics()
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert all(m["total_steps"] == 16 and m["tokens_per_second"] > 0 for m in metrics)
    assert metrics[-1]["eta_seconds"] == 0
    # One epoch sees every example once; padding in the batches of 2 is not counted.
    assert metrics[-1]["trained_tokens"] == trained.result.trained_tokens == trained.train_tokens


def test_result_describes_the_run(trained):
    r = trained.result
    assert (r.steps, r.total_steps, r.stopped is not None) == (16, 16, False)
    assert r.tokens_per_second > 0 and r.wall_seconds > 0 and r.peak_memory_bytes > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU run uses")
def test_on_cpu_lora_trains_on_the_4bit_nf4_base_with_fused_adamw(trained):
    r = trained.result
    assert (r.device, r.quantization, r.attention) == ("cpu", "nf4-double-quant-dequantized-bf16", "sdpa")
    assert r.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert (r.optimizer, r.gradient_checkpointing) == ("adamw_torch_fused", False)
    # batch_size 2 on CPU: the spec's micro-batch, packed into one row.
    assert (r.micro_batch_size, r.gradient_accumulation_steps, r.packing) == (2, 1, True)
    messages = trained.hooks.messages()
    assert any("quantization nf4-double-quant" in m and "gradient checkpointing off" in m for m in messages)
    assert any(m.startswith("Optimizer paged_adamw_8bit is a bitsandbytes GPU optimizer") for m in messages)


def test_completion_only_loss_is_announced_with_its_token_count(trained):
    data = next(d for t, m, d in trained.hooks.events if t == "message" and m.startswith("Training data:"))
    # Prompt/completion records: the prompts (docstring and signature) carry no loss.
    assert 0 < data["target_tokens"] < data["tokens"] - data["examples"]


def test_validation_file_produces_a_validation_loss(trained):
    valid = [d for t, _, d in trained.hooks.events if t == "metrics" and "valid_loss" in d]
    assert [(d["step"], d["valid_loss"]) for d in valid] == [(16, trained.result.valid_loss)]
    assert valid[0].keys() == {"step", "valid_loss", "valid_mean_token_accuracy"}
    assert 0 <= valid[0]["valid_mean_token_accuracy"] <= 1
    assert math.isfinite(trained.result.valid_loss)


def test_epoch_end_writes_a_checkpoint(trained):
    assert "Checkpoint saved at step 16" in trained.hooks.messages()


def test_save_writes_safetensors_adapter_and_tokenizer_with_chat_template(trained, tokenizer):
    names = {p.name for p in trained.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "adapter_model.bin" not in names
    saved = AutoTokenizer.from_pretrained(trained.adapter_dir, local_files_only=True)
    assert saved.chat_template == tokenizer.chat_template is not None


def test_saved_adapter_loads_on_the_base_and_changes_its_logits(trained, base_path, tokenizer):
    ids = torch.tensor([tokenizer("def add_3(x):\n    return")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, trained.adapter_dir)
        tuned_logits = tuned(ids).logits
    assert torch.isfinite(tuned_logits).all()
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)


def test_should_stop_ends_training_at_that_step_without_a_checkpoint(base_path, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", code_task_records(16, seed=3))
    hooks = RecordingHooks(stop_after=3)
    recipe = LoraRecipe(
        spec=spec_for(max_steps=12), base_model_path=base_path, train_file=train_file,
        validation_file=None, work_dir=tmp_path / "work", hooks=hooks,
    )
    recipe.setup()
    result = recipe.train()
    recipe.cleanup()
    assert result.stopped is not None
    assert result.steps in (3, 4) and result.total_steps == 12
    assert [m["step"] for m in hooks.train_metrics()] == list(range(1, result.steps + 1))
    assert result.valid_loss is None
    assert not any(m.startswith("Checkpoint saved") for m in hooks.messages())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trains_lora_on_a_4bit_nf4_base(base_path, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", code_task_records(8, seed=4))
    # The spec's default quantization is the paper's: 4-bit NF4 with double quantization.
    recipe = LoraRecipe(
        spec=spec_for(max_steps=4), base_model_path=base_path, train_file=train_file,
        validation_file=None, work_dir=tmp_path / "work", hooks=RecordingHooks(),
    )
    recipe.setup()
    result = recipe.train()
    recipe.save(tmp_path / "adapter")
    recipe.cleanup()
    assert result.quantization == "nf4-double-quant"
    assert result.steps == 4 and math.isfinite(result.final_loss)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("requested", "resolved"), [("auto", "chat"), ("completion", "completion")])
def test_code_tasks_train_in_the_requested_prompt_style_and_the_result_says_which(base_path, tmp_path, requested,
                                                                                  resolved):
    tasks = [{"text": f"Write add_{k}.", "code": f"def add_{k}(x):\n    return x + {k}",
              "test_list": [f"assert add_{k}(1) == {1 + k}"]} for k in range(4)]
    events = RecordingHooks()
    recipe = LoraRecipe(spec=spec_for(epochs=1, max_steps=1, prompt_style=requested), base_model_path=base_path,
                        train_file=write_jsonl(tmp_path / "tasks.jsonl", tasks), validation_file=None,
                        work_dir=tmp_path / "work", hooks=events)
    recipe.setup()
    try:
        result = recipe.train()
    finally:
        recipe.cleanup()
    assert result.prompt_style == resolved  # the tiny model's tokenizer has a chat template
