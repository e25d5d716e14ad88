"""Mean token accuracy: the chunked loss's counts and the trainer's logged value equal the share of
labelled tokens that the full logits' argmax predicts."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import TrainingArguments

from app.domains.jobs.spec import LoraSpec, QuantizationSpec
from worker.training.data import CausalLMCollator
from worker.training.model import load_base, lora_config
from worker.training.ops import IGNORE_INDEX, apply_chunked_loss, linear_cross_entropy_and_correct
from worker.training.trainer import RowTrainer


def _model(base_path, chunked: bool):
    model = load_base(base_path, QuantizationSpec(bits=None), "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    if chunked:
        assert apply_chunked_loss(model)
    model.config.use_cache = False
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(LoraSpec(dropout=0.0)))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    return peft_model.eval()


def _half_predicted_labels(model, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels for ids (1, length) where about half the targets are the model's own argmax prediction
    (so the accuracy is far from 0 and 1), the rest random, and the first eight ignored as a prompt."""
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)  # (1, length): the prediction for token t + 1
    labels = torch.randint(5, 4000, ids.shape, generator=torch.Generator().manual_seed(seed))
    take = torch.rand(ids.shape[1] - 1, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    labels[0, 1:][take] = predicted[0, :-1][take]
    labels[0, :8] = IGNORE_INDEX
    return labels


def _direct_accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, labelled) from the stock forward's full logits (batch, length, vocabulary)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits is not None
    predicted, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    return int((predicted[labelled] == targets[labelled]).sum()), int(labelled.sum())


def test_chunk_counts_equal_the_argmax_over_full_logits():
    """Several chunks, a partial last one, one with no labels at all."""
    gen = torch.Generator().manual_seed(3)
    tokens, hidden_size, vocab = 200, 16, 50
    hidden, weight = torch.randn(tokens, hidden_size, generator=gen), torch.randn(vocab, hidden_size, generator=gen)
    predicted = (hidden @ weight.T).argmax(-1)
    labels = torch.where(torch.rand(tokens, generator=gen) < 0.5, predicted,
                         torch.randint(0, vocab, (tokens,), generator=gen))
    labels[::7] = IGNORE_INDEX
    labels[64:128] = IGNORE_INDEX
    _, correct = linear_cross_entropy_and_correct(hidden, weight, labels, chunk=64)
    labelled = labels != IGNORE_INDEX
    expected = int((predicted[labelled] == labels[labelled]).sum())
    assert 0 < expected < int(labelled.sum())
    assert int(correct) == expected


def test_chunked_forward_reports_the_accuracy_of_the_full_logits(base_path):
    model = _model(base_path, chunked=True)
    ids = torch.randint(5, 4000, (1, 96), generator=torch.Generator().manual_seed(4))
    labels = _half_predicted_labels(model, ids, seed=5)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the chunked path: no logits tensor to take an argmax of
    correct, labelled = _direct_accuracy(model, ids, labels)  # no labels: the stock forward, full logits
    assert 0 < correct < labelled
    assert (int(out.correct_tokens), int(out.labelled_tokens)) == (correct, labelled)


@pytest.mark.parametrize("chunked", [True, False])
def test_evaluation_logs_the_mean_token_accuracy_of_the_full_logits(base_path, tokenizer, tmp_path, chunked):
    """Through the trainer's evaluation, on the chunked loss and on the stock (logits) loss alike."""
    model = _model(base_path, chunked=chunked)
    examples, correct, labelled = [], 0, 0
    for seed in range(3):
        ids = torch.randint(5, 4000, (1, 40 + 8 * seed), generator=torch.Generator().manual_seed(10 + seed))
        labels = _half_predicted_labels(model, ids, seed=20 + seed)
        c, n = _direct_accuracy(model, ids, labels)
        correct, labelled = correct + c, labelled + n
        examples.append({"input_ids": ids[0].tolist(), "labels": labels[0].tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=1, use_cpu=True, report_to="none",
                             prediction_loss_only=True, disable_tqdm=True)
    trainer = RowTrainer(model=model, args=args, data_collator=CausalLMCollator(tokenizer), eval_dataset=examples)
    metrics = trainer.evaluate()
    assert 0 < correct < labelled
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(correct / labelled, abs=1e-12)
    assert trainer.state.log_history[-1]["eval_mean_token_accuracy"] == metrics["eval_mean_token_accuracy"]
