"""Checkpoint models served through the API with the official openai client: a job's
`fine_tuned_model_checkpoint` names answer completions with the adapter of that checkpoint, loaded by a
real `tuneforge inference` process (tiny model, CPU); each greedy output is checked against peft alone
with that checkpoint's adapter. Deleting the job's model makes them answer 404."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import _stop, start_inference
from tests.e2e.test_serving import BASE, MAX_TOKENS, MESSAGES, PROMPT, TIMEOUT, Reference
from tests.factories import create_team, job_with_checkpoint_models


@dataclass
class Job:
    key: str
    model: str  # the job's fine-tuned model
    checkpoints: dict[int, str]  # step -> checkpoint model name
    reference: Reference  # peft alone, adapters "final", "step-4", "step-8"


@pytest.fixture(scope="module")
def job(services_env, server, tiny_model, tmp_path_factory) -> Job:
    """A team's job with checkpoints at steps 4 and 8 and its final adapter, all different LoRA weights; and an
    inference process on the tiny base."""
    from tests.worker.inference.conftest import make_adapter

    root = tmp_path_factory.mktemp("checkpoints")
    dirs = {name: make_adapter(tiny_model, root / name, seed=seed)
            for name, seed in (("step-4", 31), ("step-8", 32), ("final", 33))}
    team_id, key = create_team()
    with httpx.Client(base_url=f"{server}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        job_id, model = job_with_checkpoint_models(client, team_id, {4: dirs["step-4"], 8: dirs["step-8"]},
                                                   adapter_dir=dirs["final"])
        listed = client.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    names = {c["step_number"]: c["fine_tuned_model_checkpoint"] for c in listed}

    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / "inference-checkpoints.log"
    proc, url = start_inference(services_env, log, BASE, timeout=TIMEOUT)
    yield Job(key=key, model=model, checkpoints=names, reference=Reference(tiny_model, dirs))
    _stop(proc)


def _client(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def test_each_checkpoint_model_serves_its_own_adapter_like_peft(job, server):
    client = _client(server, job.key)
    texts = set()
    for model, adapter in ((job.checkpoints[4], "step-4"), (job.checkpoints[8], "step-8"), (job.model, "final")):
        tokens, text = job.reference.chat(adapter)
        out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        assert out.model == model and out.choices[0].message.content == text, adapter
        assert out.usage.completion_tokens == len(tokens), adapter
        texts.add(text)
    assert len(texts) == 3  # the checkpoints really differ from each other and from the final adapter
    _, text = job.reference.completion("step-4")
    out = client.completions.create(model=job.checkpoints[4], prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].text == text
    assert client.models.retrieve(job.checkpoints[4]).id == job.checkpoints[4]


def test_another_teams_checkpoint_model_answers_404(job, server):
    _, other_key = create_team()
    other = _client(server, other_key)
    with pytest.raises(openai.NotFoundError) as info:
        other.chat.completions.create(model=job.checkpoints[4], messages=MESSAGES, max_tokens=4)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(job.checkpoints[4])


def test_deleting_the_jobs_model_makes_its_checkpoint_models_answer_404(job, server):
    client = _client(server, job.key)
    assert client.completions.create(model=job.checkpoints[8], prompt=PROMPT, max_tokens=2).choices
    assert client.models.delete(job.model).deleted is True
    for model in (job.model, *job.checkpoints.values()):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(model)
