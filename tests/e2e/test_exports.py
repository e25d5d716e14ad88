"""Exports through the API and a real worker: create, poll, download, quota, tenancy, bad input."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.storage import get_storage
from app.domains.adapters import service as adapters
from app.domains.base_models import service as base_models


def _adapter(team_id: str, base: Path, work: Path, base_model: str = "tiny-llama") -> str:
    """An adapter of `base` with random B weights, stored as a job would store it; its id."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = work / "adapter"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    adapter_id = new_id("ftadapter")
    prefix = adapters.storage_prefix(team_id=team_id, adapter_id=adapter_id)
    storage = get_storage()
    storage.put_tree(folder, adapters.files_prefix(prefix))
    with tarfile.open(work / "a.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=".")
    blob = storage.put_file(work / "a.tar.gz", adapters.archive_key(prefix))
    with session_scope() as session:
        adapters.create(session, adapter_id=adapter_id, team_id=team_id, job_id=None, base_model=base_model,
                        name=f"ft:{base_model}:{adapter_id}", storage_prefix=prefix, archive_key=blob.key,
                        size=blob.bytes, sha256=blob.sha256)
    return adapter_id


def _wait(client, export_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = client.get(f"/exports/{export_id}").json()
        if row["status"] in ("succeeded", "failed"):
            return row
        assert time.monotonic() < deadline, f"export {export_id} still {row['status']} after {timeout} s"
        time.sleep(0.2)


def test_exports_are_written_by_the_worker_downloaded_and_counted(api, make_team, worker, tiny_model, tmp_path):
    team_id, key = make_team()
    client = api(key)
    adapter_id = _adapter(team_id, tiny_model, tmp_path)
    used_before = client.get("/quotas").json()["storage_bytes"]["usage"]

    r = client.post(f"/adapters/{adapter_id}/exports", json={"format": "merged", "dtype": "float32"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and r.json()["dtype"] == "float32"
    merged = _wait(client, r.json()["id"])
    assert merged["status"] == "succeeded", merged
    content = client.get(f"/exports/{merged['id']}/content")
    assert content.status_code == 200 and len(content.content) == merged["bytes"]
    assert content.headers["x-export-sha256"] == merged["sha256"]
    with tarfile.open(fileobj=io.BytesIO(content.content)) as tar:
        tar.extractall(tmp_path / "merged", filter="data")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.float32 and json.loads((tmp_path / "merged" / "tuneforge_export.json").read_text())[
        "format"] == "merged"

    r = client.post(f"/adapters/{adapter_id}/exports", json={"format": "gguf", "quantization": "q8_0"})
    assert r.status_code == 200, r.text
    gguf = _wait(client, r.json()["id"])
    assert gguf["status"] == "succeeded", gguf
    blob = client.get(f"/exports/{gguf['id']}/content")
    assert blob.content[:4] == b"GGUF" and gguf["filename"].endswith("-q8_0.gguf")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / gguf["filename"]).write_bytes(blob.content)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=gguf["filename"]).config.model_type == "llama"

    listed = client.get(f"/adapters/{adapter_id}/exports").json()["data"]
    assert {e["id"] for e in listed} == {merged["id"], gguf["id"]}
    used = client.get("/quotas").json()["storage_bytes"]["usage"]
    assert used == used_before + merged["bytes"] + gguf["bytes"]

    _, other_key = make_team()
    other = api(other_key)
    assert other.get(f"/exports/{gguf['id']}").status_code == 404
    assert other.get(f"/exports/{gguf['id']}/content").status_code == 404
    assert other.post(f"/adapters/{adapter_id}/exports", json={"format": "merged"}).status_code == 404

    assert client.delete(f"/exports/{gguf['id']}").status_code == 200
    assert client.get(f"/exports/{gguf['id']}").status_code == 404
    assert client.get("/quotas").json()["storage_bytes"]["usage"] == used_before + merged["bytes"]


@pytest.mark.parametrize(("body", "param"), [
    ({"format": "onnx"}, "format"),
    ({"format": "gguf", "dtype": "float16"}, "dtype"),
    ({"format": "merged", "quantization": "q8_0"}, "quantization"),
    ({"format": "gguf", "quantization": "q4_k"}, "quantization"),
    ({"format": "merged", "merge_method": "ties"}, "merge_method"),
])
def test_bad_export_requests_answer_400_with_the_param(api, make_team, tiny_model, tmp_path, body, param):
    team_id, key = make_team()
    client = api(key)
    adapter_id = _adapter(team_id, tiny_model, tmp_path)
    r = client.post(f"/adapters/{adapter_id}/exports", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert client.get(f"/adapters/{adapter_id}/exports").json()["data"] == []


def test_gguf_of_a_base_that_is_not_llama_answers_400(api, make_team, tiny_model, tmp_path):
    other = tmp_path / "not-llama"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    name = f"neox-{new_id('m')[-6:]}"
    with session_scope() as session:
        base_models.register(session, name=name, path=other)
    team_id, key = make_team()
    client = api(key)
    adapter_id = _adapter(team_id, tiny_model, tmp_path, base_model=name)
    r = client.post(f"/adapters/{adapter_id}/exports", json={"format": "gguf"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"
    assert r.json()["error"]["code"] == "unsupported_architecture"
    assert client.post("/adapters/ftadapter-nope/exports", json={"format": "merged"}).status_code == 404
