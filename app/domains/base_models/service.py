"""Base models: directories an operator registered. Read without importing transformers:
config.json tells the architecture; the worker loads the weights.

A model is registered either where it is (a path every worker can read) or copied into blob storage
(`storage=`), recorded as STORED + its storage prefix: workers on other hosts stage it into their
own cache (worker.staging.stage_base), and nothing assumes a shared filesystem."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import queue
from app.core.ids import new_id
from app.core.storage import Storage
from app.domains.base_models.errors import InvalidModelDirectory, InvalidModelName, ModelExists
from app.domains.base_models.models import RegisteredModel

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# A registered path that starts with this names a storage prefix, not a local directory.
STORED = "storage:"
# A name is a route segment (/v1/models/NAME), part of every fine-tuned model's name (ft:NAME:...)
# and a directory under the data dir (models import): one safe path component, nothing else.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    """Return `name` when it can name a base model; raises InvalidModelName otherwise. Call it before
    using a name for anything, a directory included."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidModelName(f"Model name {name!r} is invalid: 1-128 letters, digits, '.', '_' or '-', starting "
                               "with a letter or digit, and no '..' (e.g. 'llama-3.2-1b').", param="name")
    return name


def register(session: Session, *, name: str, path: str | Path, replace: bool = False,
             storage: Storage | None = None) -> RegisteredModel:
    """Record a local model directory under `name`; with `storage`, copy its files into blob storage
    first (under a prefix of their own, models/<name>/<revision>, so a replaced model never changes
    under a worker that staged the old one) and record that prefix. Raises InvalidModelName for an
    unsafe name (check_name), InvalidModelDirectory when the directory lacks config.json, weights or a
    tokenizer; ModelExists when the name is taken and replace is False. Stored files of a transaction
    that rolls back are deleted."""
    check_name(name)
    root = Path(path).expanduser().resolve()
    config_file = root / "config.json"
    if not config_file.is_file():
        raise InvalidModelDirectory(f"{root} has no config.json; pass a directory written by save_pretrained.",
                                    param="path")
    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise InvalidModelDirectory(f"{root} has no weights (*.safetensors).", param="path")
    if not any((root / f).is_file() for f in _TOKENIZER_FILES):
        raise InvalidModelDirectory(f"{root} has no tokenizer files (tokenizer.json).", param="path")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelDirectory(f"{config_file} is not readable JSON: {exc}", param="path") from None
    architecture = str(config.get("model_type") or "unknown")
    context = context_length(config)
    row = session.get(RegisteredModel, name)
    if row is not None and not replace:
        raise ModelExists(f"A base model named {name!r} is registered already ({row.path}).", param="name")
    recorded = str(root)
    if storage is not None:
        prefix = f"models/{name}/{new_id('rev')}"
        queue.delete_after_rollback(session, prefix)
        storage.put_tree(root, prefix)
        recorded = f"{STORED}{prefix}"
    if row is None:
        row = RegisteredModel(id=name, path=recorded, architecture=architecture, context_length=context)
        session.add(row)
    else:
        row.path, row.architecture, row.context_length = recorded, architecture, context
    session.flush()
    return row


def get_base(session: Session, name: str) -> RegisteredModel | None:
    return session.get(RegisteredModel, name)


def list_base(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)))


# Where config.json states the positions a model was trained for, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config: dict) -> int | None:
    """The longest sequence a model's config.json says it handles (its text config's, for a
    multimodal one); None when it says nothing."""
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def context_of(row: RegisteredModel) -> int | None:
    """The model's context length: as registered, or for a model registered before it was recorded,
    what its config.json says; None when neither says."""
    if row.context_length is not None:
        return row.context_length
    try:
        return context_length(json.loads((Path(row.path) / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None
