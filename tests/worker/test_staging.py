"""The staged cache is bounded: a new blob evicts the least recently used ones, never a recent one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.core.config import get_settings
from app.core.storage import get_storage
from worker import staging

BLOB = 1000


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """Local storage and a cache of this test's own, holding at most three blobs' worth of bytes."""
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TUNEFORGE_STORAGE_URL", raising=False)
    monkeypatch.setenv("TUNEFORGE_CACHE__MAX_BYTES", str(3 * BLOB + BLOB // 2))
    monkeypatch.setenv("TUNEFORGE_CACHE__MIN_IDLE_SECONDS", "60")
    get_settings.cache_clear()
    get_storage.cache_clear()
    source = tmp_path / "src"
    source.mkdir()
    for name in "abcde":
        (source / name).write_bytes(name.encode() * BLOB)
        get_storage().put_file(source / name, f"files/{name}")
        tree = source / f"tree-{name}"
        tree.mkdir()
        (tree / "adapter_model.safetensors").write_bytes(name.encode() * (BLOB // 2))
        (tree / "adapter_config.json").write_bytes(name.encode() * (BLOB // 2))
        get_storage().put_tree(tree, f"adapters/{name}")
    yield tmp_path / "cache"
    get_settings.cache_clear()
    get_storage.cache_clear()


def _age(key: str, seconds: float) -> None:
    """Make key's last use `seconds` ago, as if that much time had passed since."""
    when = time.time() - seconds
    os.utime(staging._marker(key), (when, when))


def test_staging_past_the_limit_evicts_the_least_recently_used_idle_blobs(cache: Path):
    for i, name in enumerate("abc"):
        staging.stage_file(f"files/{name}")
        _age(f"files/{name}", 600 - 100 * i)  # a: 600 s ago, b: 500 s, c: 400 s
    staging.stage_file("files/a")  # a cache hit counts as a use: b is now the oldest

    staging.stage_file("files/d")

    assert not (cache / "files/b").exists()
    assert {p.name for p in (cache / "files").iterdir()} == {"a", "c", "d"}
    assert (cache / "files/d").read_bytes() == b"d" * BLOB
    # b is fetched again when it is needed again, and c (the oldest idle one now) makes room.
    assert staging.stage_file("files/b").read_bytes() == b"b" * BLOB
    assert {p.name for p in (cache / "files").iterdir()} == {"a", "b", "d"}


def test_blobs_used_recently_are_kept_even_past_the_limit(cache: Path):
    for name in "abc":
        staging.stage_file(f"files/{name}")
    staging.stage_tree("adapters/a")  # 4 blobs' worth, all used within min_idle_seconds

    assert {p.name for p in (cache / "files").iterdir()} == {"a", "b", "c"}
    assert (cache / "adapters/a/adapter_model.safetensors").is_file()
    _age("files/a", 120)
    _age("adapters/a", 120)

    staging.stage_tree("adapters/b")  # the idle ones go, whole trees included, the recent ones stay

    assert {p.name for p in (cache / "files").iterdir()} == {"b", "c"}
    assert {p.name for p in (cache / "adapters").iterdir()} == {"b"}
    assert sorted(p.name for p in (cache / "adapters/b").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]


def test_no_limit_keeps_everything(cache: Path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE__MAX_BYTES", "0")
    get_settings.cache_clear()
    for name in "abcde":
        staging.stage_file(f"files/{name}")
        _age(f"files/{name}", 600)
    assert staging.evict() == []
    assert len(list((cache / "files").iterdir())) == 5
