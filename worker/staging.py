"""Blobs a worker needs, staged from storage into this machine's cache (<data_dir>/cache).

Workers never read storage's own paths: they stage what they use here, so a worker on another
host, or a storage backend that is not a directory, works the same. Only immutable blobs are
cached (an uploaded file and an adapter never change under their id); a checkpoint, which a step
saved again replaces, is fetched afresh each time (worker.training.checkpoint_store).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from app.core.blob_keys import partial_path
from app.core.config import get_settings
from app.core.storage import get_storage
from app.domains.base_models.service import STORED


def _cached(key: str) -> Path:
    return get_settings().data_dir / "cache" / key


def stage_file(key: str) -> Path:
    """A local copy of the blob at key, fetched on first use. Raises FileNotFoundError when
    storage has no blob there."""
    target = _cached(key)
    if not target.is_file():
        get_storage().fetch_to(key, target)
    return target


def stage_tree(prefix: str) -> Path:
    """A local copy of every blob under prefix, as a directory, fetched on first use. Raises
    FileNotFoundError when storage holds nothing there."""
    target = _cached(prefix)
    if not target.is_dir():
        # Fetched aside and renamed into place: a staged tree is never replaced, since another pool
        # process may be reading it (loading a base model); one that lost the race drops its copy.
        fetched = get_storage().fetch_tree_to(prefix, partial_path(target))
        try:
            os.rename(fetched, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(fetched, ignore_errors=True)
    return target


def stage_base(path: str | Path) -> Path:
    """The local directory of a registered base model: staged from storage (once per revision; a
    replaced model gets a new prefix) when it was registered into storage, else its own path."""
    recorded = str(path)
    if recorded.startswith(STORED):
        return stage_tree(recorded.removeprefix(STORED))
    return Path(recorded)
