"""DPO (method.type "dpo"): preference records -> answer pairs -> the DPO loss, inside the recipe's Trainer.

Direct Preference Optimization (Rafailov et al. 2023) raises the likelihood of the preferred
answer relative to the non-preferred one, measured against a frozen reference:

    loss = -log sigmoid(beta * ((pc - rc) - (pn - rn)))

with pc, pn the policy's summed log-probabilities of the preferred and non-preferred answer tokens
and rc, rn the reference's. This is TRL's default ("sigmoid") DPO loss; the per-token
log-probabilities come from TRL's selective_log_softmax.

Why not TRL's DPOTrainer: it tokenizes with its own chat handling (not formats.render_chat, which
serving shares), patches the model's head for its fused loss, and replaces the Trainer subclass
whose resume, checkpoint and stop behaviour the jobs rely on. Here DPO is only a different
compute_loss on the same Trainer (DpoTrainer below), so leases, heartbeats, checkpoints,
pause/resume, cancel, events and evaluation are those of supervised jobs, unchanged.

The reference is the model the job starts from: the base with the adapter disabled (a fresh LoRA
adapter changes nothing before its first step anyway), or the fine-tuned adapter the job continues
from (TrainingSpec.init_adapter). Its log-probabilities are computed once, in setup, before any
checkpoint is loaded (reference_logps), and travel with each pair; no second model is held and no
reference forward pass runs per step.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase
from trl.trainer.utils import selective_log_softmax

from app.domains.files import formats
from worker.training.callbacks import REWARD_METRICS
from worker.training.data import IGNORE_INDEX, DataFormatError, encode_record_with_labels, read_records
from worker.training.model import Device, Precision
from worker.training.trainer import RowTrainer

# Reference log-probabilities are computed this many pairs at a time (2x that many sequences a pass).
REFERENCE_BATCH_PAIRS = 8


@dataclass(frozen=True)
class PreferencePairs:
    """Token ids and labels of a preference dataset's answer pairs, one entry per usable record.

    Each sequence is the input conversation followed by one answer, rendered as chat training
    renders it (formats.render_chat); its labels are IGNORE_INDEX everywhere but on the answer
    (including its end-of-turn text). input_ids/labels hold the preferred answers, rejected_ids/
    rejected_labels the non-preferred ones. Counts as TokenizedExamples has them, over both
    sequences of each pair; a pair is skipped when either answer has no target token left after
    truncation to max_seq_length.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    rejected_ids: list[list[int]]
    rejected_labels: list[list[int]]
    num_tokens: int
    num_target_tokens: int
    num_truncated: int
    num_skipped: int


def encode_pair(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int],
                                                                                      list[int], list[int]]:
    """(preferred ids, labels, non-preferred ids, labels) of one preference record, untruncated. Raises
    DataFormatError for a record that is not a valid preference record."""
    try:
        formats.require(record, formats.PREFERENCE_FORMATS)
    except formats.RecordInvalid as e:
        raise DataFormatError(str(e)) from None
    preferred, other, tools = formats.preference_conversations(record)
    return (*_encode_answer(preferred, tools, tokenizer), *_encode_answer(other, tools, tokenizer))


def _encode_answer(messages: list[dict[str, Any]], tools: Any,
                   tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The conversation as a chat record whose only target is its last (answer) turn: earlier assistant
    turns of the input get weight 0, so they are context, as the prompt is."""
    last = len(messages) - 1
    turns = [{**m, "weight": 0} if m.get("role") == "assistant" and i != last else m for i, m in enumerate(messages)]
    chat: dict[str, Any] = {"messages": turns, **({"tools": tools} if tools is not None else {})}
    return encode_record_with_labels(chat, tokenizer, completion_only=True)


def load_pairs(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, *,
               lines: Collection[int] | None = None) -> PreferencePairs:
    """The answer pairs of a preference JSONL file (with `lines`, of the records on those lines only).

    Raises DataFormatError naming the file and line of the first bad record, ValueError when no pair
    is usable, OSError when the file cannot be read.
    """
    wanted = frozenset(lines) if lines is not None else None
    chosen: list[list[int]] = []
    chosen_labels: list[list[int]] = []
    rejected: list[list[int]] = []
    rejected_labels: list[list[int]] = []
    truncated = skipped = 0
    for line_no, record in read_records(path):
        if wanted is not None and line_no not in wanted:
            continue
        try:
            c, cl, r, rl = encode_pair(record, tokenizer)
        except DataFormatError as e:
            raise DataFormatError(f"{path.name} line {line_no}: {e}") from e
        if len(c) > max_seq_length or len(r) > max_seq_length:
            truncated += 1
            c, cl, r, rl = c[:max_seq_length], cl[:max_seq_length], r[:max_seq_length], rl[:max_seq_length]
        if not _has_target(cl) or not _has_target(rl):
            skipped += 1
            continue
        chosen.append(c)
        chosen_labels.append(cl)
        rejected.append(r)
        rejected_labels.append(rl)
    if not chosen:
        raise ValueError(f"{path.name} has no usable preference records (each answer needs a token within the "
                         f"first {max_seq_length} tokens of its conversation; raise training.max_seq_length)")
    return PreferencePairs(
        input_ids=chosen, labels=chosen_labels, rejected_ids=rejected, rejected_labels=rejected_labels,
        num_tokens=sum(map(len, chosen)) + sum(map(len, rejected)),
        num_target_tokens=sum(_targets(x) for x in chosen_labels) + sum(_targets(x) for x in rejected_labels),
        num_truncated=truncated, num_skipped=skipped)


def _targets(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels[1:])  # the first token is never predicted


def _has_target(labels: list[int]) -> bool:
    return _targets(labels) > 0


def as_pair_dataset(pairs: PreferencePairs, reference: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """A map-style dataset for the Trainer, with each pair's reference log-probabilities. The preferred
    sequence is "input_ids" because the length-grouped sampler (training.group_by_length) reads that."""
    return [{"input_ids": c, "labels": cl, "rejected_input_ids": r, "rejected_labels": rl,
             "ref_chosen_logps": rc, "ref_rejected_logps": rr}
            for c, cl, r, rl, (rc, rr) in zip(pairs.input_ids, pairs.labels, pairs.rejected_ids,
                                              pairs.rejected_labels, reference, strict=True)]


class PairCollator:
    """A micro-batch of B pairs -> one right-padded batch of 2B sequences, preferred answers first.

    Returns input_ids, attention_mask, labels (IGNORE_INDEX on padding and prompts), all (2B, longest)
    int64, and, when the pairs carry them, ref_logps (2B,) float32 in the same order.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [p["input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
        labels = [p["labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
        longest = max(map(len, ids))
        batch = {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (longest - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids]),
            "labels": torch.tensor([x + [IGNORE_INDEX] * (longest - len(x)) for x in labels]),
        }
        if "ref_chosen_logps" in pairs[0]:
            batch["ref_logps"] = torch.tensor([p["ref_chosen_logps"] for p in pairs]
                                              + [p["ref_rejected_logps"] for p in pairs], dtype=torch.float32)
        return batch


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's summed log-probability of its labelled tokens, (batch,) float32.

    Position t predicts labels[t + 1]. Only labelled positions go through the output head (answer
    tokens: the prompt and padding need no vocabulary-sized logits), via the decoder's hidden states
    where the model exposes them (a peft model's base: get_decoder / get_output_embeddings).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX  # (batch, length - 1)
    rows = mask.nonzero(as_tuple=True)[0]
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is not None and head is not None and decoder is not base:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][mask]).float()  # (labelled tokens, vocabulary)
    else:
        logits = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][mask].float()
    # As one (1, tokens, vocabulary) row: selective_log_softmax loops over its first dimension.
    logps = selective_log_softmax(logits[None], targets[mask][None])[0]  # (labelled tokens,)
    return torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logps.device).index_add(0, rows, logps)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean DPO loss, reward metrics) of policy and reference log-probs, (2B,) each, preferred first.

    The rewards are beta x (policy - reference) log-ratios (TRL's rewards/chosen and rewards/rejected);
    margins their difference, accuracies the share of pairs whose preferred answer has the higher
    reward; each is the micro-batch's mean.
    """
    chosen, rejected = (policy - reference).chunk(2)
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    margins = (chosen_rewards - rejected_rewards).detach()
    return loss, {"rewards/chosen": chosen_rewards.detach().mean().item(),
                  "rewards/rejected": rejected_rewards.detach().mean().item(),
                  "rewards/margins": margins.mean().item(),
                  "rewards/accuracies": (margins > 0).float().mean().item()}


def reference_logps(model: torch.nn.Module, dataset: list[dict[str, Any]], collator: PairCollator, *,
                    device: Device, precision: Precision, base_only: bool) -> list[tuple[float, float]]:
    """(preferred, non-preferred) reference log-probabilities of each pair, in order: the model as it is
    (base_only: with its adapter disabled), in eval mode (no dropout), under the training's autocast.
    Leaves the model in train mode."""
    model.eval()
    out: list[tuple[float, float]] = []
    disabled = model.disable_adapter() if base_only else contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=precision in ("bf16", "fp16"))
    target = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    try:
        with torch.no_grad(), disabled, autocast:
            for chunk in _chunks(dataset, REFERENCE_BATCH_PAIRS):
                batch = {k: v.to(target) for k, v in collator(chunk).items()}
                logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).cpu()
                chosen, rejected = logps.chunk(2)
                out += list(zip(chosen.tolist(), rejected.tolist(), strict=True))
    finally:
        model.train()
    return out


def _chunks(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class DpoTrainer(RowTrainer):
    """RowTrainer whose loss is DPO's on PairCollator batches (beta: DpoSpec.beta).

    compute_loss is the Trainer's public hook for a custom loss. Its loss is the micro-batch's mean
    over pairs; model_accepts_loss_kwargs is off so the Trainer divides it by the accumulation steps
    (a per-token count, num_items_in_batch, means nothing for a per-pair loss). The reward metrics of
    the micro-batches since the last log are averaged into each logged entry (log), as TRL logs them:
    rewards/* in training logs, eval_rewards/* in evaluation logs.
    """

    def __init__(self, *args, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.model_accepts_loss_kwargs = False
        self._rewards: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        loss, rewards = dpo_loss(policy, inputs["ref_logps"].to(policy.device), self.beta)
        mode = "train" if model.training else "eval"
        for key, value in rewards.items():
            self._rewards[mode][key].append(value)
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode, prefix = ("eval", "eval_") if "eval_loss" in logs else ("train", "")
        collected = self._rewards[mode]
        for key in REWARD_METRICS:
            values = [v for v in collected.get(key, ()) if math.isfinite(v)]
            if values:
                logs[prefix + key] = sum(values) / len(values)
        collected.clear()
        super().log(logs, start_time)
