"""SmolLM2-135M-Instruct through the API and the real worker: a few steps, a few tasks.

This proves the machinery on a real pretrained chat model (its template in training and
evaluation, code extracted from its fenced answers, the adapter it ends with), not the quality:
bench/quality.py measures that. The model comes converted from the package index's wheel into a
cache that outlives the run (worker.base_models.packaged), so a machine converts it once.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from importlib import resources

import pytest

from tests.factories import all_events, jsonl, uploaded_file_id, wait_for_job

# Conversion (cached), a 4-bit load, 2 steps, then 2 evaluations of 2 tasks each: about 3 minutes alone.
pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1200)]

NAME = "smollm2-e2e"


def _records(name: str, count: int) -> list[dict]:
    text = resources.files("tuneforge.data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()][:count]


@pytest.fixture(scope="module")
def smollm2(services_env):
    """The converted model, registered under NAME in this session's database."""
    from app.core.db import session_scope
    from app.domains.base_models import service as base_models
    from worker.base_models.packaged import default_cache_dir, ensure_smollm2

    path = ensure_smollm2(default_cache_dir())
    with session_scope() as session:
        base_models.register(session, name=NAME, path=path, replace=True)
    return path


def test_a_real_chat_model_trains_and_is_scored_on_programs_extracted_from_its_answers(api, make_team, worker,
                                                                                        smollm2):
    _, key = make_team()
    client = api(key)
    train = uploaded_file_id(client, jsonl(_records("code_tasks_train.jsonl", 16)))
    tasks = uploaded_file_id(client, jsonl(_records("code_tasks_heldout.jsonl", 2)))
    r = client.post("/fine_tuning/jobs", json={
        "model": NAME, "training_file": train, "hyperparameters": {"n_epochs": 1},
        "eval": {"tasks": tasks, "max_tokens": 128, "timeout_seconds": 5}})
    assert r.status_code == 200, r.text
    job = wait_for_job(client, r.json()["id"], timeout=1100)
    assert job["status"] == "succeeded", job

    usage = job["usage"]
    # 16 records at the paper's effective batch of 8: two optimizer steps, through the chat template.
    assert usage["steps"] == 2 and usage["prompt_style"] == "chat" and job["trained_tokens"] > 16 * 100
    assert usage["quantization"].startswith("nf4-double-quant") and math.isfinite(usage["final_loss"])
    report = usage["evaluation"]
    assert report["overlap"]["contaminated"] is False
    for side in ("base", "tuned"):
        assert report[side]["tasks"] == 2 and report[side]["prompt_style"] == "chat"
        assert math.isfinite(report[side]["heldout_loss"])
    evals = [e for e in client.get("/evaluations").json()["data"] if e["job_id"] == job["id"]]
    rows = [json.loads(line) for e in evals
            for line in client.get(f"/evaluations/{e['id']}/results").text.splitlines()]
    assert len(rows) == 4
    # The model answers in prose around a fenced block; what ran is the code alone.
    fenced = [row for row in rows if "```" in row["completion"]]
    assert fenced, [row["completion"] for row in rows]
    for row in fenced:
        assert "```" not in row["program"] and row["program"].strip()
    # Chat turns train on the assistant's answer only: the prompt's tokens carry no loss.
    [data] = [e["data"] for e in all_events(client, job["id"]) if e["message"].startswith("Training data:")]
    assert data["examples"] == 16 and 0 < data["target_tokens"] < data["tokens"] - 16

    archive = client.get(f"/adapters/{job['adapter_id']}/content")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        names = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers()}
        config = json.load(tar.extractfile(names["adapter_config.json"]))
        tokenizer_config = json.load(tar.extractfile(names["tokenizer_config.json"]))
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "<|im_start|>" in (tokenizer_config.get("chat_template") or
                              _template_file(archive.content) or "")


def _template_file(content: bytes) -> str | None:
    """The chat template where the tokenizer keeps it in a file of its own (chat_template.jinja)."""
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.name.endswith("chat_template.jinja"):
                return tar.extractfile(member).read().decode()
    return None
