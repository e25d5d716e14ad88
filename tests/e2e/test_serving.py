"""Serving through the API with the official openai client: a real `tuneforge inference` process
(tiny model, CPU) registered in the database, the real API forwarding to it, adapters written with
peft and stored through the adapters service. Every greedy output is checked against peft alone
(base + one adapter loaded fresh, generate(do_sample=False))."""

from __future__ import annotations

import io
import secrets
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import _stop, start_inference, wait_until
from tests.factories import create_team

BASE = "tiny-llama"
PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Write a function to add two numbers."}]
MESSAGE_ITEMS = tuple(tuple(m.items()) for m in MESSAGES)  # hashable, for Reference's cache key
MAX_TOKENS = 16
TIMEOUT = 120.0
# Adapter b's tokenizer carries its own chat template, so the chat endpoint must use the adapter's.
OTHER_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}### assistant:{% endif %}")


@dataclass
class Served:
    url: str  # the inference process (internal protocol)
    team_id: str
    key: str
    models: dict[str, str]  # "a", "b", "c", "corrupt", "missing" -> fine-tuned model name
    ids: dict[str, str]  # the same -> adapter id (what the engine's counters name)
    dirs: dict[str, Path]  # adapter name -> its peft directory (the one written with peft)


def _store_adapter(team_id: str, name: str, src: Path) -> tuple[str, str]:
    """Store a peft directory as a training job would (files/ + .tar.gz) and add its row; returns the
    adapter's id and the storage prefix of its files."""
    from app.core.db import session_scope
    from app.core.ids import new_id
    from app.core.storage import get_storage
    from app.domains.adapters import service as adapters

    storage = get_storage()
    adapter_id = new_id("ftadapter")
    prefix = f"teams/{team_id}/adapters/{adapter_id}"
    storage.put_tree(src, f"{prefix}/files")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(src.iterdir()):
            tar.add(path, arcname=path.name)
    archive = src.parent / f"{src.name}.tar.gz"
    archive.write_bytes(buffer.getvalue())
    blob = storage.put_file(archive, f"{prefix}/adapter.tar.gz")
    with session_scope() as session:
        adapters.create(session, adapter_id=adapter_id, team_id=team_id, job_id=None, base_model=BASE, name=name,
                        storage_prefix=prefix, archive_key=blob.key, size=blob.bytes, sha256=blob.sha256)
    return adapter_id, f"{prefix}/files"


@pytest.fixture(scope="module")
def served(services_env, server, tiny_model, tmp_path_factory) -> Served:
    """Three good adapters (b with its own chat template), one corrupt and one whose files are gone, all
    of one team; and an inference process on the tiny base holding at most 2 adapters in memory."""
    from transformers import AutoTokenizer

    from tests.worker.inference.conftest import make_adapter

    root = tmp_path_factory.mktemp("serving")
    team_id, key = create_team()
    suffix = secrets.token_hex(3)
    dirs = {"a": make_adapter(tiny_model, root / "a", seed=11),
            "b": make_adapter(tiny_model, root / "b", seed=12),
            "c": make_adapter(tiny_model, root / "c", seed=13, r=4, targets=("q_proj", "v_proj")),
            "corrupt": make_adapter(tiny_model, root / "corrupt", seed=14),
            "missing": make_adapter(tiny_model, root / "missing", seed=15)}
    tokenizer = AutoTokenizer.from_pretrained(dirs["b"], local_files_only=True)
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.save_pretrained(dirs["b"])
    models, ids, stored = {}, {}, {}
    for name, path in dirs.items():
        models[name] = f"ft:{BASE}:{name}-{suffix}"
        ids[name], stored[name] = _store_adapter(team_id, models[name], path)
    from app.core.storage import get_storage

    storage, garbage = get_storage(), tmp_path_factory.mktemp("corrupt") / "adapter_model.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    storage.put_file(garbage, f"{stored['corrupt']}/adapter_model.safetensors")
    for file in dirs["missing"].iterdir():
        storage.delete(f"{stored['missing']}/{file.name}")

    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / "inference.log"
    proc, url = start_inference(services_env, log, BASE, "--max-adapters", "2", timeout=TIMEOUT)
    yield Served(url=url, team_id=team_id, key=key, models=models, ids=ids, dirs=dirs)
    _stop(proc)


class Reference:
    """peft alone: the tiny base, or base + one adapter, loaded fresh; greedy generate()."""

    def __init__(self, base: Path, dirs: dict[str, Path]) -> None:
        self.base, self.dirs = base, dirs
        self._cache: dict[tuple, tuple[list[int], str]] = {}

    def completion(self, adapter: str | None, prompt: str = PROMPT) -> tuple[list[int], str]:
        return self._run(adapter, ("prompt", prompt))

    def chat(self, adapter: str | None, messages: tuple = MESSAGE_ITEMS) -> tuple[list[int], str]:
        return self._run(adapter, ("chat", messages))

    def _run(self, adapter: str | None, what: tuple) -> tuple[list[int], str]:
        key = (adapter, what)
        if key not in self._cache:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            source = self.dirs[adapter] if adapter else self.base
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(self.base, local_files_only=True)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, self.dirs[adapter])
            model.eval()
            if what[0] == "prompt":
                ids = tokenizer(what[1], return_tensors="pt")["input_ids"]
            else:
                text = tokenizer.apply_chat_template([dict(m) for m in what[1]], tokenize=False,
                                                     add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            tokens = out[0, ids.shape[1]:].tolist()
            self._cache[key] = (tokens, tokenizer.decode(tokens, skip_special_tokens=True))
        return self._cache[key]


@pytest.fixture(scope="module")
def reference(served, tiny_model) -> Reference:
    return Reference(tiny_model, served.dirs)


@pytest.fixture
def client(served, server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=served.key, max_retries=0, timeout=TIMEOUT)


def _model(served: Served, adapter: str | None) -> str:
    return served.models[adapter] if adapter else BASE


def _complete(client, served, adapter, **kwargs):
    return client.completions.create(model=_model(served, adapter), prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0, **kwargs)


def _chat(client, served, adapter, **kwargs):
    return client.chat.completions.create(model=_model(served, adapter), messages=MESSAGES, max_tokens=MAX_TOKENS,
                                          temperature=0, **kwargs)


def _stats(server: str, key: str) -> dict:
    r = httpx.get(f"{server}/v1/inference/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    (endpoint,) = [e for e in r.json()["data"] if e["base_model"] == BASE]
    assert endpoint["error"] is None, endpoint
    return endpoint["stats"]


def test_completions_match_peft_alone_for_two_adapters_and_the_base(client, served, reference):
    texts = set()
    for adapter in (None, "a", "b"):
        tokens, text = reference.completion(adapter)
        out = _complete(client, served, adapter)
        assert out.object == "text_completion" and out.model == _model(served, adapter)
        assert out.choices[0].text == text, adapter
        assert out.usage.completion_tokens == len(tokens), adapter
        assert out.choices[0].finish_reason in ("stop", "length")
        texts.add(text)
    assert len(texts) == 3  # the adapters really change the output


def test_chat_completions_use_the_adapters_chat_template_and_match_peft(client, served, reference):
    for adapter in (None, "a", "b"):
        tokens, text = reference.chat(adapter)
        out = _chat(client, served, adapter)
        assert out.object == "chat.completion"
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == text, adapter
        assert out.usage.completion_tokens == len(tokens), adapter
    # b's own template renders another prompt than the base template: its prompt token count differs.
    base_prompt = _chat(client, served, None).usage.prompt_tokens
    assert _chat(client, served, "b").usage.prompt_tokens != base_prompt
    assert _chat(client, served, "a").usage.prompt_tokens == base_prompt


def test_concurrent_requests_for_different_adapters_are_served_in_one_batch(client, served, server, reference):
    plan = [None, "a", "b"]
    results: dict[int, object] = {}
    httpx.post(f"{served.url}/v1/pause", timeout=10).raise_for_status()
    try:
        threads = [threading.Thread(target=lambda i=i, a=a: results.__setitem__(i, _complete(client, served, a)))
                   for i, a in enumerate(plan)]
        for t in threads:
            t.start()
        wait_until(lambda: _stats(server, served.key)["queue_depth"] == len(plan), timeout=TIMEOUT,
                   message="all three requests queued")
    finally:
        httpx.post(f"{served.url}/v1/resume", timeout=10).raise_for_status()
    for t in threads:
        t.join(TIMEOUT)
    for i, adapter in enumerate(plan):
        assert results[i].choices[0].text == reference.completion(adapter)[1], adapter
    batches = _stats(server, served.key)["batches"]["recent"]
    assert any(b["requests"] == 3 and b["adapters"] == 3 for b in batches), batches


def test_another_teams_model_answers_404_like_a_missing_one(served, server):
    _, other_key = create_team()
    other = openai.OpenAI(base_url=f"{server}/v1", api_key=other_key, max_retries=0, timeout=TIMEOUT)
    errors = []
    for model in (served.models["a"], f"ft:{BASE}:no-such-model"):
        with pytest.raises(openai.NotFoundError) as info:
            other.completions.create(model=model, prompt=PROMPT, max_tokens=4)
        errors.append(info.value.body)
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    theirs, missing = errors
    assert theirs["code"] == missing["code"] == "model_not_found"
    assert theirs["param"] == missing["param"] == "model"
    assert theirs["message"].replace(served.models["a"], "X") == missing["message"].replace(
        f"ft:{BASE}:no-such-model", "X")
    # The operators' counters show a team only its own adapters.
    _complete(openai.OpenAI(base_url=f"{server}/v1", api_key=served.key, max_retries=0), served, "a")
    mine, others = _stats(server, served.key), _stats(server, other_key)
    assert served.ids["a"] in mine["per_adapter_requests"] and served.ids["a"] in {
        e["id"] for e in mine["adapters_loaded"]}
    assert not set(served.ids.values()) & (set(others["per_adapter_requests"]) | {
        e["id"] for e in others["adapters_loaded"]})
    assert others["requests"]["completed"] == mine["requests"]["completed"] > 0


def test_streaming_yields_the_same_text_as_non_streaming(client, served):
    for adapter in ("a", None):
        whole = _complete(client, served, adapter).choices[0].text
        chunks = list(_complete(client, served, adapter, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        chat_whole = _chat(client, served, adapter).choices[0].message.content
        chat_chunks = list(_chat(client, served, adapter, stream=True))
        assert chat_chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_whole


def test_an_evicted_adapter_reloads_with_the_same_output(client, served, server, reference):
    first = _complete(client, served, "a").choices[0].text
    evictions = _stats(server, served.key)["cache"]["evictions"]
    _complete(client, served, "b")
    _complete(client, served, "c")  # the cache holds 2: a, the least recently used, goes
    stats = _stats(server, served.key)
    assert stats["cache"]["evictions"] > evictions
    assert [e["id"] for e in stats["adapters_loaded"]] == [served.ids["c"], served.ids["b"]]  # most recent first
    again = _complete(client, served, "a").choices[0].text
    assert again == first == reference.completion("a")[1]


def test_corrupt_or_missing_adapter_fails_clearly_and_others_keep_serving(client, served, reference):
    with pytest.raises(openai.InternalServerError) as info:
        _complete(client, served, "corrupt")
    assert info.value.body["code"] == "adapter_corrupt" and "safetensors" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, served, "missing")
    assert info.value.body["code"] == "adapter_not_found" and "missing" in info.value.body["message"]
    with pytest.raises(openai.InternalServerError):
        _complete(client, served, "corrupt", stream=True)
    for adapter in ("a", None):
        assert _complete(client, served, adapter).choices[0].text == reference.completion(adapter)[1]


def test_models_show_what_serves_and_an_unserved_base_answers_503(client, served, tiny_model):
    from app.core.db import session_scope
    from app.domains.base_models import service as base_models

    unserved = f"tiny-unserved-{secrets.token_hex(3)}"
    with session_scope() as session:
        base_models.register(session, name=unserved, path=tiny_model)
    listed = {m.id: m.model_extra["serving"] for m in client.models.list()}
    assert listed[BASE] is True and listed[served.models["a"]] is True
    assert listed[unserved] is False
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=unserved, prompt=PROMPT, max_tokens=4)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "model_not_serving" and unserved in info.value.body["message"]


def test_requests_fail_over_past_a_dead_process_and_adapters_spread_over_processes(client, served, reference):
    """A process that died without unregistering keeps a fresh-looking row for a while; requests
    routed to it first go on to the live one. Routing is rendezvous hashing per adapter."""
    from app.core.db import session_scope
    from app.domains.serving import service as serving
    from tests.conftest import free_port

    def order(key: str) -> list[str]:
        with session_scope() as session:
            return [e.id for e in serving.endpoints_for(session, base_model=BASE, key=key)]

    dead = None
    try:
        for _ in range(64):  # until the dead row is the one adapter a is routed to first
            with session_scope() as session:
                dead = serving.register(session, base_model=BASE, url=f"http://127.0.0.1:{free_port()}").id
            if order(served.ids["a"])[0] == dead:
                break
            with session_scope() as session:
                serving.unregister(session, endpoint_id=dead)
        assert order(served.ids["a"])[0] == dead
        for adapter in ("a", None, "b"):
            assert _complete(client, served, adapter).choices[0].text == reference.completion(adapter)[1], adapter
        # The same key always has the same order; different keys go first to different processes.
        firsts = [order(f"adapter-{i}")[0] for i in range(64)]
        assert firsts == [order(f"adapter-{i}")[0] for i in range(64)]
        assert set(firsts) == set(order("x"))
    finally:
        if dead is not None:
            with session_scope() as session:
                serving.unregister(session, endpoint_id=dead)


def test_a_list_of_prompts_answers_n_choices_per_prompt_in_openai_index_order(client, served, reference, tiny_model):
    from transformers import AutoTokenizer

    prompts = [PROMPT, "import os\nclass Config:"]
    texts = [reference.completion("a", p)[1] for p in prompts]
    assert texts[0] != texts[1]
    kwargs = {"model": served.models["a"], "max_tokens": MAX_TOKENS, "temperature": 0, "n": 2}
    out = client.completions.create(prompt=prompts, **kwargs)
    assert [(c.index, c.text) for c in out.choices] == list(enumerate([texts[0], texts[0], texts[1], texts[1]]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert out.usage.prompt_tokens == sum(len(i) for i in ids)
    assert [c.text for c in client.completions.create(prompt=ids, **kwargs).choices] == [c.text for c in out.choices]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=prompts, stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in out.choices}


@pytest.mark.parametrize(("kwargs", "param", "code"), [
    ({"suffix": "\n    return a"}, "suffix", "unsupported_parameter"),
    ({"echo": True, "logprobs": 1}, "echo", "unsupported_parameter"),
    ({"best_of": 2, "n": 3}, "best_of", None),
    ({"best_of": 3, "stream": True}, "best_of", "invalid_value"),
])
def test_parameters_the_engine_cannot_honour_answer_400_naming_them(client, served, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as info:
        _complete(client, served, "a", **kwargs)
    assert info.value.body["param"] == param and param in info.value.body["message"]
    if code is not None:
        assert info.value.body["code"] == code


FUNCTION = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}


@pytest.mark.parametrize(("kwargs", "param"), [  # the deprecated forms of tools and tool_choice
    ({"functions": [FUNCTION]}, "functions"),
    ({"function_call": {"name": "get_weather"}}, "function_call"),
])
def test_chat_parameters_not_honoured_answer_400_naming_them(client, served, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, served, "a", **kwargs)
    assert info.value.body["param"] == param and info.value.body["code"] == "unsupported_parameter"


def test_chat_parameters_at_their_defaults_are_accepted(client, served):
    plain = _chat(client, served, "a").choices[0].message.content
    given = _chat(client, served, "a", tool_choice="none", response_format={"type": "text"})
    assert given.choices[0].message.content == plain


def test_best_of_returns_the_candidates_with_the_highest_mean_logprob(client, served):
    kwargs = {"model": served.models["a"], "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 3}
    every = client.completions.create(n=3, logprobs=0, **kwargs).choices
    best = client.completions.create(n=1, best_of=3, **kwargs).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every]
    assert [c.index for c in best] == [0]
    assert best[0].text == every[means.index(max(means))].text


def test_logprobs_come_from_the_pass_that_chose_each_token(client, served, reference):
    tokens, text = reference.completion("a")
    out = _complete(client, served, "a", logprobs=3)
    logprobs = out.choices[0].logprobs
    assert out.choices[0].text == text and len(logprobs.token_logprobs) == len(tokens)
    assert "".join(logprobs.tokens).startswith(text) and logprobs.text_offset[0] == 0
    for chosen, token, top in zip(logprobs.token_logprobs, logprobs.tokens, logprobs.top_logprobs, strict=True):
        assert len(top) <= 3 and chosen <= 0
        # Greedy: the chosen token is the most likely one.
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5) and token in top
    streamed = [c.choices[0].logprobs for c in _complete(client, served, "a", logprobs=3, stream=True)]
    assert [t for s in streamed for t in s.tokens] == logprobs.tokens
    assert [o for s in streamed for o in s.text_offset] == logprobs.text_offset
    chat = _chat(client, served, "a", logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == len(reference.chat("a")[0])
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
               and bytes(t.bytes).decode() == t.token for t in content)
    assert _chat(client, served, "a").choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, served, "a", top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


def test_echo_begins_each_choice_with_its_prompt(client, served, reference):
    prompts = [PROMPT, "import os\nclass Config:"]
    out = client.completions.create(model=served.models["a"], prompt=prompts, echo=True, max_tokens=MAX_TOKENS,
                                    temperature=0)
    assert [c.text for c in out.choices] == [p + reference.completion("a", p)[1] for p in prompts]
    assert out.usage.completion_tokens == sum(len(reference.completion("a", p)[0]) for p in prompts)
    chunks = list(_complete(client, served, "a", echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + reference.completion("a")[1]


def test_logit_bias_and_penalties_change_the_choice(client, served, reference, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    tokens, text = reference.completion("a")
    forced = next(t for t in tokens if t != tokenizer.eos_token_id)
    out = _complete(client, served, "a", logit_bias={str(forced): 100})
    assert out.choices[0].text == tokenizer.decode([forced] * MAX_TOKENS, skip_special_tokens=True)
    banned = _chat(client, served, "a", logit_bias={str(reference.chat("a")[0][0]): -100})
    assert banned.choices[0].message.content != reference.chat("a")[1]
    # Repeating the forced token costs 2 per use: after 50 it loses to the next best token.
    penalized = client.completions.create(model=served.models["a"], prompt=PROMPT, max_tokens=80, temperature=0,
                                          logit_bias={str(forced): 100}, frequency_penalty=2)
    assert penalized.choices[0].text != tokenizer.decode([forced] * 80, skip_special_tokens=True)
    with pytest.raises(openai.BadRequestError) as info:
        _complete(client, served, "a", logit_bias={str(len(tokenizer) + 10): 1})
    assert info.value.body["param"] == "logit_bias"


def test_default_values_of_those_parameters_are_accepted(client, served, reference):
    defaults = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
    out = _complete(client, served, "a", echo=False, best_of=1, suffix=None, logprobs=None, **defaults)
    assert out.choices[0].text == reference.completion("a")[1]
    chat = _chat(client, served, "a", logprobs=False, **defaults)
    assert chat.choices[0].message.content == reference.chat("a")[1]


def test_max_completion_tokens_bounds_a_chat_and_must_agree_with_max_tokens(client, served, reference):
    model = served.models["a"]
    out = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert out.usage.completion_tokens == len(reference.chat("a")[0][:3])
    assert out.choices[0].finish_reason == ("length" if len(reference.chat("a")[0]) > 3 else "stop")
    same = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=3,
                                          max_completion_tokens=3)
    assert same.choices[0].message.content == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, max_completion_tokens=3)
    assert info.value.body["param"] == "max_completion_tokens"


def test_up_to_four_stop_sequences_are_accepted_and_five_answer_400(client, served, reference):
    four = ["never stop 1", "never stop 2", "never stop 3", "never stop 4"]
    assert _complete(client, served, "a", stop=four).choices[0].text == reference.completion("a")[1]
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, served, "a", stop=[*four, "never stop 5"])
    assert info.value.body["param"] == "stop"
