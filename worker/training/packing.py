"""Packed batches: attention per example without a dense mask, and splitting a packed batch into rows.

A packed batch (data.PackedCollator with flash-attention kwargs) is one row of concatenated
examples with cu_seq_lens_q/k, the cumulative example lengths [0, l1, l1+l2, ...]. Stock SDPA
attends over it with a dense block-diagonal (tokens x tokens) mask: the cost of the whole row
squared. packed_sdpa_attention runs SDPA's causal kernel once per example instead, which costs
the sum of the squared example lengths, as flash-attention's varlen kernel does on GPU. Measured
on a 2-core CPU, 30M Llama, 8 examples of 50-1,000 tokens per row: 1.9x the tokens/s of the
dense mask, and 1.17x that of one example per forward pass.

split_packed_batch cuts a packed batch at example boundaries into rows of at most row_tokens
tokens, so that a whole optimizer step can be one Trainer step (the per-pass overheads paid once
per row instead of once per example) while activation memory stays that of one row. It can pad
each row to a multiple of some tokens with a segment of its own (no label, attended by nothing
else): on CPU, oneDNN's bf16 kernels keep memory for every input shape they meet, so rows of a
few lengths use less memory than rows of a new length each pass (measured on the 30M Llama
shape, 16 steps: 0.88x the peak resident memory at the same tokens/s with multiples of 128).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from worker.training.data import IGNORE_INDEX

# On CPU, SDPA's math backend (matmuls and a softmax) runs forward + backward of a short example faster
# than its flash kernel: measured on a 2-core Xeon, bf16, 9 heads of 64: 2.8 vs 4.9 ms at 175 tokens,
# 1.2 vs 1.8 ms at 64; from about 200 tokens on the flash kernel wins (7.3 vs 5.3 ms at 256).
_CPU_MATH_SDPA_TOKENS = 192

# The attn_implementation name models are loaded with when the spec's attention is "sdpa".
PACKED_SDPA = "tuneforge_packed_sdpa"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: per-example causal SDPA for packed rows, stock SDPA otherwise.

    query (1, heads, tokens, head_dim), key/value (1, kv_heads, tokens, head_dim); returns
    (1, tokens, heads, head_dim). Packed means batch size 1 with cu_seq_lens_q in kwargs and no
    KV cache (training and the loss pass of evaluation); anything else, generation included,
    goes to transformers' own sdpa_attention_forward unchanged.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    edges = bounds.tolist()
    cpu = query.device.type == "cpu"
    outputs = []
    for s, e in zip(edges[:-1], edges[1:], strict=True):
        with sdpa_kernel(SDPBackend.MATH) if cpu and e - s <= _CPU_MATH_SDPA_TOKENS else nullcontext():
            outputs.append(F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                          dropout_p=dropout, scale=scaling, is_causal=True))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> str:
    """Make PACKED_SDPA a valid attn_implementation (idempotent); returns the name."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # Masks as for sdpa: needed by the unpacked fallback; packed rows ignore theirs.
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def split_packed_batch(batch: dict[str, Any], row_tokens: int, *, pad_to_multiple_of: int | None = None,
                       pad_token_id: int = 0) -> list[dict[str, Any]]:
    """Cut a packed batch at example boundaries into rows of at most row_tokens tokens.

    batch: input_ids, labels, position_ids (1, tokens) and cu_seq_lens_q/k (examples + 1,),
    max_length_q/k, as PackedCollator(with_flash_attn_kwargs=True) makes them. Examples are
    taken in order; an example longer than row_tokens gets a row of its own. Each row has the
    same keys, with boundaries relative to the row. The rows' labels together are the batch's.

    With pad_to_multiple_of, a row whose length is not a multiple of it ends in a padding
    segment of its own: pad_token_id inputs, labels -100, positions from 0, and a boundary in
    cu_seq_lens, so no real token attends to it and it adds nothing to the loss.
    """
    edges = batch["cu_seq_lens_q"].tolist()
    rows: list[tuple[int, int, list[int]]] = []  # (start, end, example edges relative to start)
    start, row_edges = edges[0], [0]
    for end in edges[1:]:
        if end - start > row_tokens and len(row_edges) > 1:
            rows.append((start, start + row_edges[-1], row_edges))
            start, row_edges = start + row_edges[-1], [0]
        row_edges.append(end - start)
    rows.append((start, start + row_edges[-1], row_edges))
    out = []
    for s, e, rel in rows:
        row = {key: batch[key][:, s:e] for key in ("input_ids", "labels", "position_ids") if key in batch}
        pad = (-(e - s)) % pad_to_multiple_of if pad_to_multiple_of else 0
        if pad:
            fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
            for key, tensor in row.items():
                tail = (torch.arange(pad, dtype=tensor.dtype, device=tensor.device).unsqueeze(0)
                        if key == "position_ids"
                        else torch.full((1, pad), fill[key], dtype=tensor.dtype, device=tensor.device))
                row[key] = torch.cat([tensor, tail], dim=1)
            rel = [*rel, rel[-1] + pad]
        cu = torch.tensor(rel, dtype=batch["cu_seq_lens_q"].dtype, device=batch["cu_seq_lens_q"].device)
        longest = max(b - a for a, b in zip(rel[:-1], rel[1:], strict=True))
        row.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        out.append(row)
    return out
