"""What both storage backends share (app.core.storage's local directory, app.core.s3's bucket):
the stored blob's record and the one check of a key, in a module of its own so the S3 backend
needs nothing of the module that chooses it."""

from __future__ import annotations

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
