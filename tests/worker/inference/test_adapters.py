"""Adapter checks and the cache's LRU bookkeeping, without a model."""

from __future__ import annotations

import json
import shutil

import pytest

from worker.inference.adapters import AdapterCache, AdapterRef, LinearShape, ResidentAdapter, inspect_adapter
from worker.inference.errors import AdapterNotFound, AdapterUnsupported


def entry(adapter_id: str, nbytes: int) -> ResidentAdapter:
    return ResidentAdapter(ref=AdapterRef(adapter_id, "/nowhere"), slot=adapter_id, bytes=nbytes, loaded_at=0.0,
                           load_ms=0.0)


def test_victims_are_least_recently_used_first_and_never_pinned():
    cache = AdapterCache(max_adapters=3, max_bytes=1000)
    for name in ("a", "b", "c"):
        cache.add(entry(name, 100))
    cache.touch("a")  # order now b, c, a

    assert cache.victims_for(100, pinned=set()) == ["b"]
    assert cache.victims_for(100, pinned={"b"}) == ["c"]
    assert cache.victims_for(100, pinned={"a", "b", "c"}) is None


def test_victims_free_enough_bytes():
    cache = AdapterCache(max_adapters=10, max_bytes=1000)
    for name, nbytes in (("a", 400), ("b", 300), ("c", 200)):
        cache.add(entry(name, nbytes))

    assert cache.victims_for(100, pinned=set()) == []
    assert cache.victims_for(500, pinned=set()) == ["a"]
    assert cache.victims_for(500, pinned={"a"}) == ["b", "c"]
    assert cache.victims_for(900, pinned={"c"}) is None


def test_dora_adapters_are_refused_with_the_reason(tiny, tmp_path):
    adapter = tmp_path / "dora"
    shutil.copytree(tiny.adapters["a"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    linears = {f"model.layers.{i}.self_attn.{p}": LinearShape(128, 128)
               for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}

    with pytest.raises(AdapterUnsupported, match="DoRA"):
        inspect_adapter(AdapterRef("dora", adapter), base_name="tiny", base_linears=linears)
    ok = inspect_adapter(AdapterRef("a", tiny.adapters["a"]), base_name="tiny", base_linears=linears)
    assert ok.estimated_bytes == 65_536 and set(ok.modules) == set(linears)


def test_a_directory_without_weights_is_not_found(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterNotFound, match="adapter_model.safetensors is missing"):
        inspect_adapter(AdapterRef("x", tmp_path), base_name="tiny", base_linears={})
