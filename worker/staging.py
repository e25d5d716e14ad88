"""Blobs a worker needs, staged from storage into this machine's cache (<data_dir>/cache).

Workers never read storage's own paths: they stage what they use here, so a worker on another
host, or a storage backend that is not a directory, works the same. Only immutable blobs are
cached (an uploaded file and an adapter never change under their id); a checkpoint, which a step
saved again replaces, is fetched afresh each time (worker.training.checkpoint_store).

The cache is bounded (cache.max_bytes): staging a new blob removes the least recently used ones
until the cache fits, except those used within cache.min_idle_seconds, so a model being loaded or
an adapter being served is never taken away. Each staged blob has a marker under .used/ whose
mtime is its last use. Staging touches the marker and checks the copy under a shared lock; the
eviction picks and moves its victims aside under an exclusive one, so a blob is never removed
between a caller's check and its use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from app.core.blob_keys import partial_path
from app.core.config import get_settings
from app.core.storage import get_storage
from app.domains.base_models.service import STORED


log = logging.getLogger("tuneforge.worker")


def _root() -> Path:
    return get_settings().data_dir / "cache"


def _cached(key: str) -> Path:
    return _root() / key


def _marker(key: str) -> Path:
    return _root() / ".used" / hashlib.sha256(key.encode()).hexdigest()


@contextlib.contextmanager
def _locked(exclusive: bool) -> Iterator[None]:
    lock = _root() / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _used(key: str, present: Callable[[], bool]) -> bool:
    """Mark key used now and say whether its copy is present, under the shared lock."""
    with _locked(exclusive=False):
        marker = _marker(key)
        try:
            os.utime(marker)
        except FileNotFoundError:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(key, encoding="utf-8")
        return present()


def _added(key: str) -> None:
    """After a fetch: mark key used again (the fetch may have outlasted min_idle_seconds), then make
    room for it."""
    _used(key, lambda: True)
    evict(keep=key)


def stage_file(key: str) -> Path:
    """A local copy of the blob at key, fetched on first use. Raises FileNotFoundError when
    storage has no blob there."""
    target = _cached(key)
    if not _used(key, target.is_file):
        get_storage().fetch_to(key, target)
        _added(key)
    return target


def stage_tree(prefix: str) -> Path:
    """A local copy of every blob under prefix, as a directory, fetched on first use. Raises
    FileNotFoundError when storage holds nothing there."""
    target = _cached(prefix)
    if not _used(prefix, target.is_dir):
        # Fetched aside and renamed into place: a staged tree is never replaced, since another pool
        # process may be reading it (loading a base model); one that lost the race drops its copy.
        fetched = get_storage().fetch_tree_to(prefix, partial_path(target))
        try:
            os.rename(fetched, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(fetched, ignore_errors=True)
        _added(prefix)
    return target


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict(keep: str | None = None) -> list[str]:
    """Remove the least recently used staged blobs until the cache is within cache.max_bytes,
    sparing `keep` and those used within cache.min_idle_seconds; returns the keys removed."""
    settings = get_settings().cache
    markers = _root() / ".used"
    if settings.max_bytes == 0 or not markers.is_dir():
        return []
    removed, aside = [], []
    with _locked(exclusive=True):
        entries = []
        for marker in markers.iterdir():
            key = marker.read_text(encoding="utf-8")
            path = _cached(key)
            if not path.exists():
                marker.unlink(missing_ok=True)
                continue
            entries.append((marker.stat().st_mtime, key, path, _size(path), marker))
        total = sum(e[3] for e in entries)
        idle_before = time.time() - settings.min_idle_seconds
        for used_at, key, path, size, marker in sorted(entries, key=lambda e: e[0]):
            if total <= settings.max_bytes or used_at > idle_before:
                break
            if key == keep:
                continue
            moved = partial_path(path)
            os.rename(path, moved)
            marker.unlink(missing_ok=True)
            aside.append(moved)
            removed.append(key)
            total -= size
    for moved in aside:  # outside the lock: nothing reaches them under their own names any more
        if moved.is_dir():
            shutil.rmtree(moved, ignore_errors=True)
        else:
            moved.unlink(missing_ok=True)
    if removed:
        log.info("removed %d staged blob(s) from the cache, least recently used first: %s", len(removed),
                 ", ".join(removed))
    return removed


def stage_base(path: str | Path) -> Path:
    """The local directory of a registered base model: staged from storage (once per revision; a
    replaced model gets a new prefix) when it was registered into storage, else its own path."""
    recorded = str(path)
    if recorded.startswith(STORED):
        return stage_tree(recorded.removeprefix(STORED))
    return Path(recorded)
