"""What both storage backends share (app.core.storage's local directory, app.core.s3's bucket):
the stored blob's record and the one check of a key, in a module of its own so the S3 backend
needs nothing of the module that chooses it; and how both write a fetched blob into place."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path


class StorageKeyError(ValueError):
    pass


@dataclass
class StoredBlob:
    key: str
    bytes: int
    sha256: str


def check_key(key: str) -> str:
    """The prefix a key is confined to: "teams/<team_id>" for a team's key, else "" (the root).
    Raises StorageKeyError for a key that is not a plain relative path (empty, absolute, `.` or `..`
    parts, empty parts, a backslash or NUL): such a key could name something outside its prefix."""
    parts = key.split("/")
    if (not key or key.startswith("/") or "\\" in key or "\0" in key
            or any(p in ("", ".", "..") for p in parts)):
        raise StorageKeyError(f"invalid storage key {key!r}")
    return f"teams/{parts[1]}" if parts[0] == "teams" and len(parts) > 2 else ""


def tree_keys(src: Path, prefix: str) -> list[tuple[Path, str]]:
    """Every file under src with the key it is stored under (prefix/relative path), in sorted
    order: what a backend's put_tree uploads."""
    return [(file, f"{prefix}/{file.relative_to(src).as_posix()}")
            for file in sorted(p for p in src.rglob("*") if p.is_file())]


def partial_path(dest: Path) -> Path:
    """A sibling of dest, unique to this call, to fetch into before it is renamed to dest: two
    processes fetching the same blob at once (two pool processes staging one base model) must not
    write into, or delete, each other's copy."""
    return dest.with_name(f".{dest.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")


def replace_tree(partial: Path, dest: Path) -> None:
    """Rename the fetched directory partial to dest, replacing a dest that exists (then removed).
    rename(2) only replaces an absent or empty directory, so an existing one is moved aside first."""
    for _ in range(8):
        try:
            os.rename(partial, dest)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # not a dest in the way (a missing partial, a full disk): the dest stays as it is
            aside = partial_path(dest)  # dest exists and is not empty (or another fetch just put it back)
            try:
                os.rename(dest, aside)
            except FileNotFoundError:
                continue  # another fetch moved it aside first
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not put the fetched tree at {dest}: other fetches keep replacing it")
