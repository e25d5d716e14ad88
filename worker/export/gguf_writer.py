"""Writing a Llama-family model as one GGUF file with the `gguf` package's writer.

What is written is what llama.cpp's convert_hf_to_gguf.py writes for a LlamaForCausalLM, and what
transformers' GGUF loader (modeling_gguf_pytorch_utils.load_gguf_checkpoint, integrations/gguf)
reads back:
- tensors named by gguf's own name map for MODEL_ARCH.LLAMA (model.layers.N.self_attn.q_proj ->
  blk.N.attn_q, ...); q_proj and k_proj rows permuted as llama.cpp expects (its rotary embedding
  pairs adjacent dimensions, transformers' pairs the two halves), which the loader undoes;
  no output.weight when the embeddings are tied (the loader infers tie_word_embeddings from it);
- llama.* hyperparameters (context, embedding, block count, feed-forward, heads, KV heads, rope
  dimension and base, RMS norm epsilon, vocabulary size);
- a byte-level BPE tokenizer ("gpt2"): the tokens by id, their types (control for special added
  tokens, user-defined for other added ones), the merges, the special token ids and the chat template.
Matrices are f16 or q8_0 (gguf.quants quantizes q8_0 in numpy: blocks of 32 values sharing one f16
scale); 1-D tensors (norms) stay f32, as llama.cpp keeps them, and a matrix whose rows are not a
multiple of the q8_0 block stays f16.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

QUANTIZATIONS = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Token types as llama.cpp numbers them (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL,
                                              gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED)


class GGUFExportError(ValueError):
    """A model or tokenizer this writer cannot express as a llama.cpp GGUF; the message says why."""


def permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rows (n_head * head_dim, in) regrouped from transformers'
    rotate-half layout [h][half][d] to llama.cpp's interleaved [h][d][pair]."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _check_model(config) -> None:
    if config.model_type != "llama":
        raise GGUFExportError(f"GGUF export writes Llama-family models; this one is {config.model_type!r}.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope scaling {rope.get('rope_type')!r} is not written by this exporter; only "
                              "the default rotary embedding is.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("attention or MLP biases are not part of llama.cpp's llama architecture.")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) model. Raises GGUFExportError for any
    other kind: a file that tokenizes differently from the model's training would be worse than none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("the tokenizer has no tokenizer.json (a fast tokenizer is needed)")
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        raise GGUFExportError("GGUF export writes byte-level BPE tokenizers with GPT-2's pre-tokenizer; this "
                              f"tokenizer is {model.get('type')!r} with pre-tokenizer {pre.get('type')!r}.")
    vocab = backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # rows the embedding has past the vocabulary (padding)
            tokens.append(f"[PAD{index}]")
            types.append(_UNUSED)
            continue
        tokens.append(by_id[index])
        extra = added.get(index)
        types.append(_NORMAL if extra is None else _CONTROL if extra.get("special") else _USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            add(int(token_id))
    sample, bos = tokenizer("a").input_ids, tokenizer.bos_token_id
    writer.add_add_bos_token(bool(sample) and bos is not None and sample[0] == bos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensor(value: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's data as written, and its ggml type: f32 for 1-D, else `qtype` where it fits."""
    data = value.detach().to(torch.float32).cpu().numpy()
    if data.ndim <= 1:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_path: Path, *, quantization: str,
               name: str) -> Path:
    """Write `model` (a LlamaForCausalLM, any dtype) and its tokenizer as one GGUF file at out_path,
    its matrices in `quantization` (f16 or q8_0). Returns out_path. Raises GGUFExportError for a
    model or tokenizer that llama.cpp's llama architecture cannot express, KeyError for an unknown
    quantization."""
    qtype = QUANTIZATIONS[quantization]
    config = model.config
    _check_model(config)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, value in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"tensor {hf_name!r} has no llama.cpp name")
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            value = torch.from_numpy(permute(value.detach().to(torch.float32).cpu().numpy(), n_head,
                                             n_head if "attn_q" in gguf_name else n_kv))
        data, raw_type = _tensor(value, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
