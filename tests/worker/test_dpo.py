"""DPO on the tiny model (CPU, offline): pairs from preference records, the loss, what training does
to the two answers' likelihoods, exact resume, and DPO on top of an existing adapter."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from app.domains.jobs.spec import DpoSpec, LoraSpec, QuantizationSpec, TrainingSettings, TrainingSpec
from worker.training.callbacks import REWARD_METRICS
from worker.training.data import IGNORE_INDEX, DataFormatError
from worker.training.dpo import PairCollator, as_pair_dataset, dpo_loss, encode_pair, load_pairs, sequence_logps
from worker.training.model import lora_config
from worker.training.recipe import LoraRecipe


@dataclass
class Hooks:
    """TrainingHooks keeping every event; should_stop answers `stop` once `stop_at` steps have ended."""

    stop_at: int | None = None
    stop: str = "pause"
    events: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    checkpoints: list[tuple[int, Path, dict[str, Any]]] = field(default_factory=list)
    steps: int = 0
    keep: Path | None = None  # copy handed-over checkpoints here (the recipe deletes its own)

    def on_event(self, type: str, message: str, data: dict[str, Any] | None) -> None:
        self.events.append((type, message, data))

    def should_stop(self):
        self.steps += 1
        return self.stop if self.stop_at is not None and self.steps >= self.stop_at else None

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        kept = path
        if self.keep is not None:
            kept = self.keep / path.name
            shutil.copytree(path, kept)
        self.checkpoints.append((step, kept, metrics))

    def train_metrics(self) -> list[dict[str, Any]]:
        return [d for t, _, d in self.events if t == "metrics" and d and "loss" in d]


def preference_records(n: int) -> list[dict[str, Any]]:
    """Questions answered well (preferred) and badly (non-preferred), the good answers all alike."""
    return [{"input": {"messages": [{"role": "system", "content": "Answer in Python."},
                                    {"role": "user", "content": f"Write a function that adds {i} to x."}]},
             "preferred_output": [{"role": "assistant", "content": f"def add(x):\n    return x + {i}\n"}],
             "non_preferred_output": [{"role": "assistant", "content": f"I cannot help with adding {i}."}]}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def dpo_spec(**training: Any) -> TrainingSpec:
    settings = {"gradient_accumulation_steps": 1, "batch_size": 2, "learning_rate": 5e-3, "max_seq_length": 128,
                "checkpoint_every_steps": None, "warmup_ratio": 0.0, "lr_scheduler": "constant", **training}
    return TrainingSpec(training=TrainingSettings(**settings), dpo=DpoSpec(beta=0.1), seed=3)


def margins(model: torch.nn.Module, pairs) -> torch.Tensor:
    """Per pair: log p(preferred) - log p(non-preferred) under the model, in eval mode."""
    collate = PairCollator(0)
    rows = as_pair_dataset(pairs, [(0.0, 0.0)] * len(pairs.input_ids))
    model.eval()
    with torch.no_grad():
        batch = collate(rows)
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    model.train()
    chosen, rejected = logps.chunk(2)
    return chosen - rejected


def test_a_pair_labels_only_its_answer(tokenizer):
    record = preference_records(1)[0]
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(record, tokenizer)
    answer = [t for t, label in zip(chosen, chosen_labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer).startswith("def add(x):\n    return x + 0")
    other = [t for t, label in zip(rejected, rejected_labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(other).startswith("I cannot help")
    # The conversation before the answer is the same tokens in both.
    first = next(i for i, label in enumerate(chosen_labels) if label != IGNORE_INDEX)
    assert chosen[:first - 1] == rejected[:first - 1]
    with pytest.raises(DataFormatError, match="non_preferred_output"):
        encode_pair({"input": record["input"], "preferred_output": record["preferred_output"]}, tokenizer)


def test_the_loss_is_dpo_sigmoid_loss_with_its_rewards():
    policy = torch.tensor([-3.0, -5.0, -6.0, -4.0])  # preferred of pairs 0 and 1, then non-preferred
    reference = torch.tensor([-4.0, -5.0, -5.0, -4.0])
    loss, rewards = dpo_loss(policy, reference, beta=0.5)
    # pair 0: chosen reward 0.5, rejected -0.5 -> margin 1; pair 1: both 0 -> margin 0
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(1.0)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected.item())
    assert rewards == pytest.approx({"rewards/chosen": 0.25, "rewards/rejected": -0.25, "rewards/margins": 0.5,
                                     "rewards/accuracies": 0.5})


def test_dpo_raises_the_preferred_answers_likelihood_over_the_other(base_path, tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "prefs.jsonl", preference_records(8))
    hooks = Hooks()
    recipe = LoraRecipe(spec=dpo_spec(epochs=3), base_model_path=base_path, train_file=train, validation_file=None,
                        work_dir=tmp_path / "work", hooks=hooks)
    recipe.setup()
    pairs = load_pairs(train, tokenizer, 128)
    before = margins(recipe.model, pairs)
    result = recipe.train()
    after = margins(recipe.model, pairs)
    recipe.cleanup()

    assert result.steps == 12
    assert (after - before).min() > 0, (before, after)  # every pair moved toward its preferred answer
    assert (after - before).mean() > 1.0
    logged = hooks.train_metrics()
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference before the first step
    assert all(set(REWARD_METRICS) <= set(m) for m in logged)
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
    assert logged[-1]["rewards/accuracies"] == 1.0
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert any("reward margin" in m for t, m, _ in hooks.events if t == "metrics")
    assert any(m.startswith("DPO reference: log-probabilities of 8 answer pairs from the base model")
               for _, m, _ in hooks.events)


def test_a_paused_dpo_job_resumes_to_the_same_adapter(base_path, tmp_path):
    train = write_jsonl(tmp_path / "prefs.jsonl", preference_records(6))
    spec = dpo_spec(epochs=2, checkpoint_every_steps=2)

    def run(name: str, hooks: Hooks, resume: Path | None = None):
        recipe = LoraRecipe(spec=spec, base_model_path=base_path, train_file=train, validation_file=None,
                            work_dir=tmp_path / name, hooks=hooks, resume_from=resume)
        recipe.setup()
        result = recipe.train()
        if result.stopped is None:
            recipe.save(tmp_path / name / "adapter")
        recipe.cleanup()
        return result

    whole = run("whole", Hooks())
    (tmp_path / "kept").mkdir()
    paused = Hooks(stop_at=3, keep=tmp_path / "kept")
    first = run("first", paused)
    assert first.stopped == "pause" and first.steps == 3
    step, checkpoint, metrics = paused.checkpoints[-1]
    assert step == 3 and {"rewards/margins", "rewards/accuracies", "train_loss"} <= set(metrics)
    rest = run("rest", Hooks(), resume=checkpoint)
    assert rest.resumed_from_step == 3 and rest.steps == whole.steps == 6
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "rest" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_dpo_starts_from_a_given_adapter_with_its_own_config_as_the_reference(base_path, tmp_path):
    start = tmp_path / "sft"
    base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True)
    sft = get_peft_model(base, lora_config(LoraSpec(r=4, alpha=8, dropout=0.0)))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sft.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    sft.save_pretrained(start)
    train = write_jsonl(tmp_path / "prefs.jsonl", preference_records(4))
    hooks = Hooks()
    # fp32 and no dropout: the policy's first forward pass computes exactly the reference's numbers.
    spec = dpo_spec(epochs=1, precision="fp32").model_copy(update={"quantization": QuantizationSpec(bits=None)})
    recipe = LoraRecipe(spec=spec,
                        base_model_path=base_path, train_file=train, validation_file=None, work_dir=tmp_path / "w",
                        hooks=hooks, init_adapter=start)
    recipe.setup()
    result = recipe.train()
    recipe.save(tmp_path / "out")
    recipe.cleanup()

    assert result.steps == 2
    # The reference is the starting adapter: before the first update policy and reference agree.
    first = hooks.train_metrics()[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert any("from the model it continues from" in m for _, m, _ in hooks.events)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4
    before, after = load_file(str(start / "adapter_model.safetensors")), load_file(
        str(tmp_path / "out" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_dpo_validation_reports_loss_and_rewards_and_keeps_the_best(base_path, tmp_path):
    train = write_jsonl(tmp_path / "prefs.jsonl", preference_records(8))
    hooks = Hooks()
    recipe = LoraRecipe(spec=dpo_spec(epochs=1, validation_split=0.25, eval_every_steps=1), base_model_path=base_path,
                        train_file=train, validation_file=None, work_dir=tmp_path / "work", hooks=hooks)
    recipe.setup()
    result = recipe.train()
    recipe.cleanup()

    valid = [d for t, _, d in hooks.events if t == "metrics" and d and "valid_loss" in d]
    assert len(valid) == result.steps == 3  # 6 training pairs in batches of 2, evaluated after each step
    assert all({"valid_rewards/margins", "valid_rewards/accuracies"} <= set(d) for d in valid)
    assert valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    assert result.validation_records == 2 and result.best_step is not None and result.select_best == "valid_loss"


def test_the_loss_equals_trl_dpo_trainers_on_the_same_batch(base_path, tokenizer, tmp_path):
    """TRL's DPOTrainer, given a peft model, keeps a copy of its adapter as the reference ("ref"): the
    same reference a job continuing from an adapter has. Moved away from it, both losses must agree."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True),
                           lora_config(LoraSpec(dropout=0.0)))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    data = Dataset.from_list([{"prompt": f"Add {i} to x:", "chosen": f" return x + {i}", "rejected": f" no {i}"}
                              for i in range(4)])
    trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                     args=DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.3, use_cpu=True,
                                    report_to="none"))
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    trainer.model.eval()
    with torch.no_grad():
        reference = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], labels)
        for name, p in trainer.model.named_parameters():
            if ".default." in name:
                p.add_(torch.randn_like(p) * 0.05)
        expected = trainer.compute_loss(trainer.model, batch)
        policy = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], labels)
    loss, _ = dpo_loss(policy, reference, beta=0.3)
    assert abs(expected.item() - math.log(2)) > 0.05  # the policy did move from the reference
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
