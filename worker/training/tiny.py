"""Builds a tiny Llama-architecture model and tokenizer, offline.

The tokenizer is a byte-level BPE trained on the Python standard library's own
sources (on disk wherever Python is), so no hub is touched. The result is saved
with save_pretrained and loads through the same from_pretrained path a real
model uses.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from app.domains.files.formats import plain_chat_template

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# A minimal chat template, saved with the tokenizer so training and serving agree: the plain chat
# layout with the eos token ending each turn, so the model learns where its answer stops.
CHAT_TEMPLATE = plain_chat_template(end_of_turn=EOS)


def _corpus(max_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def make_tokenizer(path: str | Path, *, vocab_size: int = 4096, corpus_bytes: int = 3_000_000,
                   max_position_embeddings: int = 2048):
    """Train the byte-level BPE tokenizer on the stdlib sources and save it (with the chat template) to `path`.

    Returns the PreTrainedTokenizerFast. Deterministic for the same Python stdlib."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(corpus_bytes), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=max_position_embeddings,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(Path(path))
    return tokenizer


def make_tiny_model(
    path: str | Path,
    *,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int | None = None,
    max_position_embeddings: int = 2048,
    corpus_bytes: int = 3_000_000,
    seed: int = 0,
    pretrain_steps: int = 0,
    tokenizer_from: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write config, weights and tokenizer to `path`; returns it. Deterministic for a seed.

    pretrain_steps > 0 first trains all weights briefly on the same Python sources, so the model
    writes Python-looking text (the demo uses this; tests keep random weights, which is faster).
    tokenizer_from: a folder with a tokenizer made here before, copied instead of training one
    (about 2 s saved per model). num_key_value_heads < num_heads gives grouped-query attention.
    dtype and device are those the random weights are created in and saved as ("cuda" makes
    billion-parameter shapes quick to initialize)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer_from), local_files_only=True)
        tokenizer.save_pretrained(path)
    else:
        tokenizer = make_tokenizer(path, vocab_size=vocab_size, corpus_bytes=corpus_bytes,
                                   max_position_embeddings=max_position_embeddings)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads or num_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch_dtype)
    if pretrain_steps:
        corpus_ids = tokenizer.backend_tokenizer.encode("\n".join(_corpus(corpus_bytes))).ids
        _pretrain(model, corpus_ids, steps=pretrain_steps, seed=seed)
    model.save_pretrained(path)
    return path


def _pretrain(model, corpus_ids: list[int], *, steps: int, seed: int, seq_len: int = 128,
              batch: int = 16, lr: float = 3e-3) -> None:
    """Full-parameter next-token training on random windows of the corpus (batch x seq_len tokens a step)."""
    import torch

    ids = torch.tensor(corpus_ids, dtype=torch.long)  # (corpus_tokens,)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # (batch, seq_len)
        loss = model(input_ids=window, labels=window).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
