"""Converting a local GGUF file into a safetensors model directory, once.

transformers reads GGUF (Llama, Mistral, Qwen2 and the other architectures it
maps) by dequantizing every tensor, which takes tens of seconds even for a
135M model. Doing that on every load would slow every job and inference
server, so a GGUF is converted once into the directory layout the rest of the
worker loads with from_pretrained: config.json, generation_config.json,
model.safetensors (fp32: dequantized values are exact in fp32, not in bf16)
and the tokenizer with its chat template. Only local files are read.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Written last into a finished conversion: it is how a later call knows the directory is complete
# and which file it came from.
MARKER = "gguf_import.json"
# What the project's model registry requires of a directory (app.domains.base_models.service.register),
# besides weights: one model.safetensors, or numbered shards past save_pretrained's shard size.
REQUIRED_FILES = ("config.json", "tokenizer.json")


class GGUFImportError(ValueError):
    """A GGUF file that cannot be converted, or a destination that cannot take the conversion."""


def import_gguf(gguf_path: str | Path, dest_dir: str | Path) -> Path:
    """Convert the GGUF file at `gguf_path` into a safetensors model directory at `dest_dir`; returns dest_dir.

    Idempotent: a dest_dir that holds a finished conversion of the same file
    (same name and size) is returned as it is. The conversion is written to a
    temporary sibling of dest_dir and renamed into place, so a crash never
    leaves a half-written dest_dir (only a hidden ".<name>.*.partial" sibling,
    safe to delete). Two processes converting at once both end with the same
    finished directory. Reads only local files.

    Raises FileNotFoundError when gguf_path is not a file; GGUFImportError when
    it is not a GGUF file, holds an architecture transformers cannot read from
    GGUF or a model that is not a causal language model, has tensors that
    cannot be dequantized, or when dest_dir exists and is something else.
    """
    source = Path(gguf_path).expanduser().resolve()
    dest = Path(dest_dir).expanduser().resolve()
    check_gguf_file(source)
    if is_conversion_of(dest, source.name, source.stat().st_size):
        log.info("reusing %s, converted from %s", dest, source.name)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model directory is read by other processes
    try:
        _convert(source, staging)
        try:
            # Atomic on one filesystem; replaces an empty dest_dir, fails on a non-empty one.
            staging.rename(dest)
        except OSError:
            # another process may have finished the same conversion first
            if is_conversion_of(dest, source.name, source.stat().st_size):
                shutil.rmtree(staging, ignore_errors=True)
                return dest
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("converted %s into %s", source, dest)
    return dest


def check_gguf_file(path: Path) -> None:
    """Raise FileNotFoundError unless `path` is a file, GGUFImportError unless it starts with the GGUF magic."""
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}; pass the path of a .gguf file.")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                              "pass a model file in llama.cpp's GGUF format.")


def is_conversion_of(dest: Path, source_name: str, source_bytes: int) -> bool:
    """Whether `dest` holds a finished conversion of the GGUF file named `source_name` of `source_bytes` bytes.

    False when dest does not exist or is an empty directory. Raises GGUFImportError when dest holds
    anything else: another file's conversion, or a directory that is no conversion at all.
    """
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise GGUFImportError(f"{dest} exists and is not a directory; choose another destination.")
    marker = dest / MARKER
    if not marker.is_file():
        if not any(dest.iterdir()):
            return False  # an empty directory: the rename replaces it
        raise GGUFImportError(f"{dest} exists and is not a GGUF conversion (no {MARKER}); "
                              "choose another destination or empty it.")
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise GGUFImportError(f"{marker} is unreadable ({exc}); delete {dest} to convert again.") from None
    if record.get("source") != source_name or record.get("bytes") != source_bytes:
        raise GGUFImportError(f"{dest} holds a conversion of {record.get('source')!r}, not of {source_name!r}; "
                              "choose another destination or delete it.")
    return True


def _readable_architectures() -> list[str]:
    try:  # transformers' own table; internal, so only used to word the error
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return ["llama", "mistral", "qwen2"]
    # "general" and "tokenizer" are sections of its metadata table, not architectures
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})


def _convert(source: Path, out: Path) -> None:
    """Dequantize `source` to fp32 and save model, generation config, tokenizer and marker into `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # No separate metadata check first: parsing a GGUF's metadata costs seconds (its vocabulary is in
    # it), and both loads below already raise ValueError for an architecture transformers does not map
    # (tokenizer and model) or that is not a causal LM (model).
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
        )
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise GGUFImportError(
            f"transformers {transformers.__version__} cannot load {source} as a causal language model: {exc} "
            f"(it reads these GGUF architectures: {', '.join(_readable_architectures())})"
        ) from exc
    # The weights are plain dequantized tensors now, but transformers still marks the model as
    # quantized with "gguf" and save_pretrained refuses it ("not serializable") until the marker goes.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
    if not any(out.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise GGUFImportError(f"converting {source} wrote no {', '.join(missing)}; transformers "
                              f"{transformers.__version__} saved only: {sorted(p.name for p in out.iterdir())}")
    record = {"source": source.name, "bytes": source.stat().st_size, "dtype": "float32",
              "transformers": transformers.__version__}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
