"""Blob storage under per-team prefixes: a local directory by default, an
S3-compatible bucket when TUNEFORGE_STORAGE_URL is s3://bucket/prefix (app.core.s3).

Keys are relative POSIX paths built by the services from ids, never from user
input: each domain owns the layout of its keys (files.service.storage_key,
adapters.service.storage_prefix, checkpoints.service.storage_prefix,
evaluations.service.results_key). Every key is checked by one function,
check_key, on either backend: a plain relative path confined to its prefix (the
team's folder for teams/<team_id>/..., else the root); the local backend also
follows symlinks. Writes go to a temporary name first and are put into place
whole (a rename; S3's completed upload), so a reader never sees half a file.

Other layers reach blobs only through the Storage interface: stream them
(open, iter_bytes) or stage them into a local directory of their own
(fetch_to, fetch_tree_to), never through the backend's own paths, so that a
second backend touches only this module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Protocol

from app.core.blob_keys import StorageKeyError, StoredBlob, check_key, partial_path, replace_tree, tree_keys
from app.core.config import get_settings

__all__ = ["LocalStorage", "Storage", "StorageKeyError", "StoredBlob", "check_key", "get_storage"]


class Storage(Protocol):
    """What the services and workers may do with blobs."""

    def check(self) -> None: ...
    def download_url(self, key: str, *, filename: str | None = None) -> str | None: ...
    def temp_file(self) -> tempfile._TemporaryFileWrapper: ...
    def commit(self, temp_path: str | Path, key: str) -> None: ...
    def put_file(self, src: Path, key: str) -> StoredBlob: ...
    def put_tree(self, src: Path, prefix: str) -> list[str]: ...
    def open(self, key: str) -> BinaryIO: ...
    def iter_bytes(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...
    def fetch_to(self, key: str, dest: Path) -> Path: ...
    def fetch_tree_to(self, prefix: str, dest: Path) -> Path: ...


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".tmp").mkdir(exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of a key. Raises StorageKeyError for a key that is not a plain relative path, or
        that resolves (through `..`, an absolute part or a symlink) outside its prefix: the storage
        root, and for a team's key (teams/<team_id>/...) that team's folder."""
        prefix = self.root / check_key(key)
        path = (self.root / key).resolve()
        # The prefix is not resolved: a team folder that is itself a symlink elsewhere is refused too.
        if prefix not in path.parents:
            raise StorageKeyError(f"storage key {key!r} escapes its prefix {prefix.relative_to(self.root)}")
        return path

    def check(self) -> None:
        """Raises unless a blob can be written (the readiness probe)."""
        with self.temp_file() as tmp:
            tmp.write(b"ok")
        os.unlink(tmp.name)

    def download_url(self, key: str, *, filename: str | None = None) -> str | None:
        """None: a directory has no URL of its own; downloads stream through the API."""
        self.path(key)
        return None

    def temp_file(self) -> tempfile._TemporaryFileWrapper:
        """A named temporary file on the same filesystem, for commit()."""
        return tempfile.NamedTemporaryFile(dir=self.root / ".tmp", delete=False)

    def commit(self, temp_path: str | Path, key: str) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp_path, dest)

    def put_file(self, src: Path, key: str) -> StoredBlob:
        self.path(key)  # refuse a bad key before writing anything
        digest, size = hashlib.sha256(), 0
        with open(src, "rb") as f, self.temp_file() as tmp:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
                tmp.write(chunk)
        self.commit(tmp.name, key)
        return StoredBlob(key=key, bytes=size, sha256=digest.hexdigest())

    def put_tree(self, src: Path, prefix: str) -> list[str]:
        files = tree_keys(src, prefix)
        for file, key in files:
            self.put_file(file, key)
        return [key for _, key in files]

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def iter_bytes(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        with self.open(key) as f:
            yield from iter(lambda: f.read(chunk), b"")

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def fetch_to(self, key: str, dest: Path) -> Path:
        """Copy one blob to the local file dest (replaced whole, never half written); returns dest.
        Raises FileNotFoundError when the key holds no blob."""
        source = self.path(key)
        if not source.is_file():
            raise FileNotFoundError(f"no blob at storage key {key!r}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(dest)
        try:
            shutil.copyfile(source, partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
        return dest

    def fetch_tree_to(self, prefix: str, dest: Path) -> Path:
        """Copy every blob under prefix into the local directory dest, keeping their relative
        paths (dest is replaced whole); returns dest. Raises FileNotFoundError when the prefix holds
        no blob."""
        source = self.path(prefix)
        if not source.is_dir() or not any(p.is_file() for p in source.rglob("*")):
            raise FileNotFoundError(f"no blobs under storage prefix {prefix!r}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(dest)
        try:
            shutil.copytree(source, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        replace_tree(partial, dest)
        return dest


@lru_cache
def get_storage() -> Storage:
    """The configured backend, made once per process."""
    settings = get_settings()
    if settings.s3_location is not None:
        from app.core.s3 import S3Storage  # boto3 loads only where S3 is configured

        return S3Storage.from_settings(settings)
    return LocalStorage(settings.storage_dir)
