"""The inference engine on the real tiny model (CPU, offline): outputs against peft alone,
mixed-adapter batches, the adapter cache, failures that stay with their request, streaming and
stop sequences."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from tests.worker.inference.conftest import MAX_TOKENS, PROMPTS
from worker.inference import AdapterRef
from worker.inference.errors import (
    AdapterBaseMismatch,
    AdapterCorrupt,
    AdapterFormatRefused,
    AdapterNotFound,
    AdapterTooLarge,
    GenerationCancelled,
    GenerationInvalid,
)

TIMEOUT = 60.0
ADAPTER_BYTES = 65_536  # r=8 on q/k/v/o of the tiny model: 2 layers x 4 x (8 x 128 + 128 x 8) x 4 bytes


def poll(predicate, *, timeout: float = TIMEOUT, message: str = "condition"):
    """Wait for predicate() to hold, checking often; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.002)
    return value


def run_greedy(engine, tiny, adapter, prompt, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return engine.submit(prompt, adapter=tiny.ref(adapter), temperature=0, **kwargs).result(TIMEOUT)


def submit_all_in_one_batch(engine, jobs):
    """Submit (adapter_ref, prompt, kwargs) jobs from one thread each while admission is paused, so they
    are queued together; returns their handles in order."""
    engine.pause()
    handles = [None] * len(jobs)

    def submit(i, ref, prompt, kwargs):
        handles[i] = engine.submit(prompt, adapter=ref, **kwargs)

    threads = [threading.Thread(target=submit, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    poll(lambda: engine.stats()["queue_depth"] == len(jobs), message="all requests queued")
    engine.resume()
    return handles


def test_greedy_outputs_equal_peft_alone_for_base_and_each_adapter(make_engine, tiny, reference):
    engine = make_engine()
    for adapter in (None, "a", "b", "c"):
        for prompt in PROMPTS[:2]:
            result = run_greedy(engine, tiny, adapter, prompt)
            assert list(result.choices[0].token_ids) == reference.tokens(adapter, prompt), (adapter, prompt)
            assert result.choices[0].text == reference.text(adapter, prompt)
    # The adapters really change the output, so equality above is not the base model's output thrice.
    assert len({tuple(reference.tokens(a, PROMPTS[0])) for a in (None, "a", "b", "c")}) == 4


def test_concurrent_requests_for_different_adapters_run_in_one_batch(make_engine, tiny, reference):
    engine = make_engine(max_batch_size=16)
    plan = [(None, PROMPTS[0]), ("a", PROMPTS[1]), ("b", PROMPTS[2]), ("c", PROMPTS[0]), ("a", PROMPTS[0]),
            ("b", PROMPTS[1])]
    handles = submit_all_in_one_batch(
        engine, [(tiny.ref(a), p, {"max_tokens": MAX_TOKENS, "temperature": 0}) for a, p in plan])
    results = [h.result(TIMEOUT) for h in handles]

    for (adapter, prompt), result in zip(plan, results, strict=True):
        assert list(result.choices[0].token_ids) == reference.tokens(adapter, prompt), (adapter, prompt)
    assert len({r.batch_id for r in results}) == 1
    stats = engine.stats()
    batch = next(b for b in stats["batches"]["recent"] if b["id"] == results[0].batch_id)
    assert batch["requests"] == 6 and batch["rows"] == 6 and batch["adapters"] == 4
    assert stats["batches"]["count"] == 1
    assert stats["forwards"]["prefills"] == 1 and stats["forwards"]["max_rows_per_step"] == 6
    assert stats["per_adapter_requests"] == {"__base__": 1, "ad-a": 2, "ad-b": 2, "ad-c": 1}
    assert stats["cache"]["misses"] == 3 and stats["cache"]["hits"] == 2
    assert stats["tokens"]["generated"] == sum(len(r.choices[0].token_ids) for r in results)


def test_a_request_joins_rows_already_decoding_with_the_same_output(make_engine, tiny, reference):
    engine = make_engine()
    long = 120  # long enough to still be decoding when the others arrive
    # The joining prompt is longer than the running row's context, so that row gets left padding, which is
    # trimmed again once the longer rows finish.
    long_prompt = PROMPTS[1] + "\n        return os.path.join(self.root, name)\n    def load(self, path):"
    first = engine.submit(PROMPTS[2], adapter=tiny.ref("a"), max_tokens=long, temperature=0)
    next(iter(first))  # the first request is decoding
    second = engine.submit(long_prompt, adapter=tiny.ref("b"), max_tokens=MAX_TOKENS, temperature=0)
    third = engine.submit(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    results = [first.result(TIMEOUT), second.result(TIMEOUT), third.result(TIMEOUT)]

    assert list(results[0].choices[0].token_ids) == reference.tokens("a", PROMPTS[2], long)
    assert list(results[1].choices[0].token_ids) == reference.tokens("b", long_prompt)
    assert list(results[2].choices[0].token_ids) == reference.tokens(None, PROMPTS[0])
    joined = [b for b in engine.stats()["batches"]["recent"] if b["joined_rows"] > 0]
    assert joined, "the later requests should have joined the running batch"


def test_evicting_then_reloading_an_adapter_gives_the_same_output(make_engine, tiny, reference):
    engine = make_engine(max_adapters=1)
    first = run_greedy(engine, tiny, "a", PROMPTS[0])
    run_greedy(engine, tiny, "b", PROMPTS[0])  # evicts a
    assert [e["id"] for e in engine.stats()["adapters_loaded"]] == ["ad-b"]
    again = run_greedy(engine, tiny, "a", PROMPTS[0])  # reloads a, evicts b

    assert again.choices[0].token_ids == first.choices[0].token_ids
    assert list(again.choices[0].token_ids) == reference.tokens("a", PROMPTS[0])
    cache = engine.stats()["cache"]
    assert (cache["misses"], cache["evictions"], cache["loads"]) == (3, 2, 3)


def test_cache_evicts_least_recently_used_at_the_count_bound(make_engine, tiny):
    engine = make_engine(max_adapters=2)
    for name in ("a", "b", "a"):  # a was used after b, so b is the least recently used
        run_greedy(engine, tiny, name, PROMPTS[0], max_tokens=1)
    run_greedy(engine, tiny, "c", PROMPTS[0], max_tokens=1)

    loaded = [e["id"] for e in engine.stats()["adapters_loaded"]]  # most recently used first
    assert loaded == ["ad-c", "ad-a"]
    assert engine.stats()["cache"]["evictions"] == 1


def test_cache_evicts_least_recently_used_at_the_byte_bound(make_engine, tiny):
    # Room for a and b (64 KiB each) but not also c (r=4 on q/v/up_proj: 32 KiB).
    engine = make_engine(max_adapters=10, max_adapter_bytes=ADAPTER_BYTES * 2 + ADAPTER_BYTES // 4)
    for name in ("b", "a"):
        run_greedy(engine, tiny, name, PROMPTS[0], max_tokens=1)
    assert engine.stats()["cache"]["bytes"] == 2 * ADAPTER_BYTES
    run_greedy(engine, tiny, "b", PROMPTS[0], max_tokens=1)  # a is now the least recently used
    run_greedy(engine, tiny, "c", PROMPTS[0], max_tokens=1)  # c needs room: a goes

    stats = engine.stats()
    assert [e["id"] for e in stats["adapters_loaded"]] == ["ad-c", "ad-b"]
    assert stats["cache"]["bytes"] <= stats["cache"]["max_bytes"]


def test_an_adapter_larger_than_the_byte_bound_is_refused(make_engine, tiny):
    engine = make_engine(max_adapter_bytes=ADAPTER_BYTES // 2)
    with pytest.raises(AdapterTooLarge, match="max_adapter_bytes"):
        run_greedy(engine, tiny, "a", PROMPTS[0], max_tokens=1)
    assert run_greedy(engine, tiny, None, PROMPTS[0], max_tokens=2).choices[0].finish_reason == "length"


def test_corrupt_and_missing_adapters_fail_only_their_requests(make_engine, tiny, reference, tmp_path):
    garbage = tmp_path / "garbage"
    truncated = tmp_path / "truncated"
    for target in (garbage, truncated):
        target.mkdir()
        (target / "adapter_config.json").write_bytes((tiny.adapters["a"] / "adapter_config.json").read_bytes())
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 50)
    weights = (tiny.adapters["a"] / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    engine = make_engine()
    jobs = [
        (AdapterRef("bad-garbage", garbage), PROMPTS[0], {"max_tokens": MAX_TOKENS, "temperature": 0}),
        (tiny.ref("b"), PROMPTS[1], {"max_tokens": MAX_TOKENS, "temperature": 0}),
        (AdapterRef("bad-missing", tmp_path / "nowhere"), PROMPTS[0], {"max_tokens": 4}),
        (AdapterRef("bad-truncated", truncated), PROMPTS[0], {"max_tokens": 4}),
    ]
    garbage_h, good_h, missing_h, truncated_h = submit_all_in_one_batch(engine, jobs)

    with pytest.raises(AdapterCorrupt, match="bad-garbage.*not a valid safetensors file"):
        garbage_h.result(TIMEOUT)
    with pytest.raises(AdapterNotFound, match="bad-missing.*does not exist"):
        missing_h.result(TIMEOUT)
    with pytest.raises(AdapterCorrupt, match="bad-truncated"):
        truncated_h.result(TIMEOUT)
    assert list(good_h.result(TIMEOUT).choices[0].token_ids) == reference.tokens("b", PROMPTS[1])
    stats = engine.stats()
    assert stats["cache"]["load_failures"] == 3 and stats["requests"]["failed"] == 3
    assert [e["id"] for e in stats["adapters_loaded"]] == ["ad-b"]
    # The engine goes on serving, the base included.
    assert list(run_greedy(engine, tiny, None, PROMPTS[2]).choices[0].token_ids) == reference.tokens(None, PROMPTS[2])


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_an_adapter_with_pickle_weights_only_is_refused_unread(make_engine, tiny, tmp_path):
    import pickle

    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((tiny.adapters["a"] / "adapter_config.json").read_bytes())
    marker = tmp_path / "unpickled"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    engine = make_engine()

    with pytest.raises(AdapterFormatRefused, match="adapter_model.bin.*safetensors"):
        engine.submit(PROMPTS[0], adapter=AdapterRef("pickled", adapter), max_tokens=2).result(TIMEOUT)
    assert not marker.exists()


def test_an_adapter_of_another_base_is_refused(make_engine, tiny, tmp_path):
    from transformers import AutoConfig

    from tests.worker.inference.conftest import make_adapter

    other = AutoConfig.from_pretrained(tiny.base, local_files_only=True)
    other.hidden_size, other.intermediate_size = 96, 256
    foreign = make_adapter(tiny.base, tmp_path / "foreign", seed=5, config=other)
    engine = make_engine()

    with pytest.raises(AdapterBaseMismatch, match="different base model.*96"):
        engine.submit(PROMPTS[0], adapter=AdapterRef("foreign", foreign), max_tokens=2).result(TIMEOUT)
    named = AdapterRef("named", tiny.adapters["a"], base="some-other-base")
    with pytest.raises(AdapterBaseMismatch, match="some-other-base"):
        engine.submit(PROMPTS[0], adapter=named, max_tokens=2).result(TIMEOUT)
    assert engine.stats()["adapters_loaded"] == []


def test_streaming_yields_the_same_text_and_tokens_as_the_final_result(make_engine, tiny, reference):
    engine = make_engine()
    handle = engine.submit(PROMPTS[1], adapter=tiny.ref("c"), max_tokens=MAX_TOKENS, temperature=0)
    deltas = list(handle)
    result = handle.result(TIMEOUT)

    assert len(deltas) == MAX_TOKENS  # one delta per token
    assert "".join(d.text for d in deltas) == result.choices[0].text == reference.text("c", PROMPTS[1])
    assert [t for d in deltas for t in d.token_ids] == list(result.choices[0].token_ids)
    assert [d.finish_reason for d in deltas] == [None] * (MAX_TOKENS - 1) + ["length"]
    assert result.usage.completion_tokens == MAX_TOKENS
    assert result.usage.prompt_tokens == len(reference.tokenizer(PROMPTS[1])["input_ids"])

    async def collect():
        again = engine.submit(PROMPTS[1], adapter=tiny.ref("c"), max_tokens=MAX_TOKENS, temperature=0)
        return "".join([d.text async for d in again.astream()]), await again.aresult()

    text, final = asyncio.run(collect())
    assert text == final.choices[0].text == result.choices[0].text


def test_stop_sequences_cut_the_text_before_them(make_engine, tiny, reference):
    engine = make_engine()
    full = reference.text("a", PROMPTS[0])
    stop = full[6:9]
    assert stop.strip() and full.find(stop) == 6, f"pick another slice of {full!r}"
    handle = engine.submit(PROMPTS[0], adapter=tiny.ref("a"), max_tokens=MAX_TOKENS, temperature=0,
                           stop=["\x00never", stop])
    streamed = "".join(d.text for d in handle)
    result = handle.result(TIMEOUT)

    assert result.choices[0].text == streamed == full[:6]
    assert result.choices[0].finish_reason == "stop"
    assert len(result.choices[0].token_ids) < MAX_TOKENS
    unstopped = engine.submit(PROMPTS[0], adapter=tiny.ref("a"), max_tokens=MAX_TOKENS, temperature=0,
                              stop="\x00never").result(TIMEOUT)
    assert (unstopped.choices[0].text, unstopped.choices[0].finish_reason) == (full, "length")


def test_sampling_is_reproducible_with_a_seed_and_choices_differ(make_engine, tiny):
    engine = make_engine()
    kwargs = {"adapter": tiny.ref("b"), "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7, "n": 3}
    first = engine.submit(PROMPTS[2], **kwargs).result(TIMEOUT)
    second = engine.submit(PROMPTS[2], **kwargs).result(TIMEOUT)

    assert [c.token_ids for c in first.choices] == [c.token_ids for c in second.choices]
    assert len({c.token_ids for c in first.choices}) == 3
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.completion_tokens == sum(len(c.token_ids) for c in first.choices)


def test_a_cancelled_request_fails_and_the_engine_serves_on(make_engine, tiny, reference):
    engine = make_engine()
    handle = engine.submit(PROMPTS[0], adapter=tiny.ref("a"), max_tokens=1000, temperature=0)
    next(iter(handle))
    handle.cancel()
    with pytest.raises(GenerationCancelled):
        handle.result(TIMEOUT)
    poll(lambda: engine.stats()["running_rows"] == 0, message="the cancelled row to leave")
    assert list(run_greedy(engine, tiny, "a", PROMPTS[0]).choices[0].token_ids) == reference.tokens("a", PROMPTS[0])
    assert engine.stats()["requests"]["cancelled"] == 1


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),  # past the tiny model's 2048-token context
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
])
def test_out_of_range_parameters_are_refused_at_submit(make_engine, kwargs, param):
    engine = make_engine(warmup=False)
    with pytest.raises(GenerationInvalid) as caught:
        engine.submit(PROMPTS[0], **kwargs)
    assert caught.value.param == param


def test_chat_prompts_use_the_adapters_own_template(make_engine, tiny, tmp_path):
    import shutil

    adapter = tmp_path / "templated"
    shutil.copytree(tiny.adapters["a"], adapter)
    (adapter / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    engine = make_engine(warmup=False)
    messages = [{"role": "user", "content": "Write a function."}]

    base_ids = engine.encode_chat(messages)
    adapter_ids = engine.encode_chat(messages, AdapterRef("templated", adapter))
    assert engine.tokenizer.decode(base_ids) == "<|user|>\nWrite a function.<|endoftext|>\n<|assistant|>\n"
    assert engine.tokenizer.decode(adapter_ids) == "[user] Write a function.\n[assistant] "


def test_base_model_tokens_are_untouched_by_loaded_adapters(make_engine, tiny, reference):
    engine = make_engine()
    for name in ("a", "b", "c"):
        engine.preload(tiny.ref(name), timeout=TIMEOUT)
    assert len(engine.stats()["adapters_loaded"]) == 3
    result = run_greedy(engine, tiny, None, PROMPTS[1])
    assert list(result.choices[0].token_ids) == reference.tokens(None, PROMPTS[1])


def test_more_distinct_adapters_than_the_cache_holds_are_served_in_turn(make_engine, tiny, reference):
    engine = make_engine(max_adapters=2, max_batch_size=3)
    plan = [("a", PROMPTS[0]), ("b", PROMPTS[1]), ("c", PROMPTS[2]), (None, PROMPTS[0]), ("c", PROMPTS[1])]
    handles = submit_all_in_one_batch(
        engine, [(tiny.ref(a), p, {"max_tokens": MAX_TOKENS, "temperature": 0}) for a, p in plan])
    results = [h.result(TIMEOUT) for h in handles]

    for (adapter, prompt), result in zip(plan, results, strict=True):
        assert list(result.choices[0].token_ids) == reference.tokens(adapter, prompt), (adapter, prompt)
    stats = engine.stats()
    assert stats["batches"]["count"] >= 2
    assert stats["forwards"]["max_rows_per_step"] <= 3
    assert len(stats["adapters_loaded"]) <= 2


def test_4bit_base_mixed_batch_equals_peft_alone_on_the_same_4bit_base(make_engine, tiny):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny.base, local_files_only=True)

    def peft_alone(adapter, prompt):
        model = AutoModelForCausalLM.from_pretrained(
            tiny.base, local_files_only=True, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16))
        for module in model.modules():  # as the engine does on CPU (see STACK-NOTES: AVX512-BF16 repacking)
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        if adapter is not None:
            model = PeftModel.from_pretrained(model, tiny.adapters[adapter])
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.eval().generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[0, enc["input_ids"].shape[1]:].tolist()

    engine = make_engine(load_in_4bit=True)
    plan = [(None, PROMPTS[0]), ("a", PROMPTS[1]), ("c", PROMPTS[2])]
    handles = submit_all_in_one_batch(engine, [(tiny.ref(a), p, {"max_tokens": 12, "temperature": 0}) for a, p in plan])
    for (adapter, prompt), handle in zip(plan, handles, strict=True):
        assert list(handle.result(TIMEOUT).choices[0].token_ids) == peft_alone(adapter, prompt), adapter


def test_a_list_of_prompts_gives_n_choices_each_in_prompt_major_order(make_engine, tiny, reference):
    engine = make_engine()
    prompts = [PROMPTS[0], PROMPTS[2]]
    result = run_greedy(engine, tiny, "a", prompts, n=2)
    expected = [reference.tokens("a", p) for p in prompts for _ in range(2)]
    assert expected[0] != expected[2]  # the two prompts' choices can be told apart
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert [list(c.token_ids) for c in result.choices] == expected
    prompt_ids = [reference.tokenizer(p)["input_ids"] for p in prompts]
    assert result.usage.prompt_tokens == sum(len(ids) for ids in prompt_ids)
    assert result.usage.completion_tokens == sum(len(tokens) for tokens in expected)
    # Token-id lists are the same prompts; streamed pieces add up to each choice's text.
    handle = engine.submit(prompt_ids, adapter=tiny.ref("a"), max_tokens=MAX_TOKENS, temperature=0, n=2)
    pieces: dict[int, str] = {}
    for delta in handle.stream(TIMEOUT):
        pieces[delta.index] = pieces.get(delta.index, "") + delta.text
    assert pieces == {c.index: c.text for c in result.choices}
    assert [c.token_ids for c in handle.result(TIMEOUT).choices] == [c.token_ids for c in result.choices]


def test_batched_prompts_share_a_batch_without_their_settings_leaking(make_engine, tiny, reference):
    engine = make_engine(max_batch_size=8)
    sampled = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 7, "n": 2}
    jobs = [(tiny.ref("a"), [PROMPTS[0], PROMPTS[1]], {"max_tokens": 6, "temperature": 0}),
            (tiny.ref("b"), PROMPTS[2], {"max_tokens": MAX_TOKENS, "temperature": 0}),
            (None, [PROMPTS[1], PROMPTS[2]], sampled)]
    short, single, mixed = [h.result(TIMEOUT) for h in submit_all_in_one_batch(engine, jobs)]
    assert short.batch_id == single.batch_id == mixed.batch_id
    batch = next(b for b in engine.stats()["batches"]["recent"] if b["id"] == short.batch_id)
    assert batch["requests"] == 3 and batch["rows"] == 2 + 1 + 4
    assert [list(c.token_ids) for c in short.choices] == [reference.tokens("a", p, 6) for p in PROMPTS[:2]]
    assert list(single.choices[0].token_ids) == reference.tokens("b", PROMPTS[2])
    # The sampled request's rows keep their own seeds: alone they draw the same tokens.
    alone = engine.submit([PROMPTS[1], PROMPTS[2]], **sampled).result(TIMEOUT)
    assert [c.token_ids for c in mixed.choices] == [c.token_ids for c in alone.choices]
    assert len(mixed.choices) == 4


@pytest.mark.parametrize("prompt", [[], [PROMPTS[0], ""], [PROMPTS[0], [1, 2]]])
def test_an_empty_or_mixed_prompt_list_is_refused(make_engine, prompt):
    engine = make_engine(warmup=False)
    with pytest.raises(GenerationInvalid) as caught:
        engine.submit(prompt)
    assert caught.value.param == "prompt"


def test_prompts_times_n_beyond_the_batch_are_refused_and_four_stops_are_accepted(make_engine, tiny):
    engine = make_engine(max_batch_size=4)
    with pytest.raises(GenerationInvalid) as caught:
        engine.submit(list(PROMPTS), n=2)
    assert caught.value.param == "prompt" and "6 choices" in caught.value.message
    result = run_greedy(engine, tiny, None, PROMPTS[0], stop=["\x00a", "\x00b", "\x00c", "\x00d"])
    assert len(result.choices) == 1


def test_echo_begins_each_choice_with_its_prompt_text(make_engine, tiny, reference):
    engine = make_engine()
    plain = run_greedy(engine, tiny, "a", [PROMPTS[0], PROMPTS[2]], n=2)
    echoed = run_greedy(engine, tiny, "a", [PROMPTS[0], PROMPTS[2]], n=2, echo=True)
    assert [c.text for c in echoed.choices] == [p + c.text for p, c in zip(
        [PROMPTS[0]] * 2 + [PROMPTS[2]] * 2, plain.choices, strict=True)]
    assert echoed.usage == plain.usage and [c.token_ids for c in echoed.choices] == [c.token_ids for c in plain.choices]
    ids = reference.tokenizer(PROMPTS[2])["input_ids"]
    handle = engine.submit(ids, adapter=tiny.ref("a"), max_tokens=MAX_TOKENS, temperature=0, echo=True)
    pieces = [d.text for d in handle.stream(TIMEOUT)]
    assert pieces[0].startswith(PROMPTS[2])
    assert "".join(pieces) == handle.result(TIMEOUT).choices[0].text == PROMPTS[2] + reference.text("a", PROMPTS[2])


def test_penalties_and_logit_bias_follow_openais_formula_per_row(make_engine, tiny, reference):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.base, local_files_only=True).eval()
    prompt_ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    first = reference.tokens(None, PROMPTS[0])[0]
    settings = {"presence_penalty": 1.5, "frequency_penalty": 0.7, "logit_bias": {str(first): -100, "7": 3.0}}

    def expected() -> list[int]:
        """Greedy, one full forward per token, the logits adjusted as OpenAI documents."""
        out: list[int] = []
        for _ in range(MAX_TOKENS):
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + out])).logits[0, -1].float()
            logits[first] -= 100
            logits[7] += 3.0
            for token in set(out):
                logits[token] -= 0.7 * out.count(token) + 1.5
            out.append(int(logits.argmax()))
            if out[-1] == reference.tokenizer.eos_token_id:
                break
        return out

    engine = make_engine()
    plain, adjusted = [h.result(TIMEOUT) for h in submit_all_in_one_batch(engine, [
        (None, PROMPTS[0], {"max_tokens": MAX_TOKENS, "temperature": 0}),
        (None, PROMPTS[0], {"max_tokens": MAX_TOKENS, "temperature": 0, **settings})])]
    assert plain.batch_id == adjusted.batch_id
    assert list(plain.choices[0].token_ids) == reference.tokens(None, PROMPTS[0])  # nothing leaked into it
    assert list(adjusted.choices[0].token_ids) == expected()
    assert adjusted.choices[0].token_ids[0] != first


def test_logprobs_are_those_of_the_pass_that_chose_each_token(make_engine, tiny, reference):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.base, local_files_only=True).eval()
    engine = make_engine()
    plain, scored = [h.result(TIMEOUT) for h in submit_all_in_one_batch(engine, [
        (None, PROMPTS[2], {"max_tokens": 8, "temperature": 0}),
        (None, PROMPTS[0], {"max_tokens": 8, "temperature": 0, "logprobs": 3})])]
    assert plain.batch_id == scored.batch_id and plain.choices[0].logprobs is None
    choice = scored.choices[0]
    assert [e.token_id for e in choice.logprobs] == list(choice.token_ids) == reference.tokens(None, PROMPTS[0], 8)
    prompt_ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    for i, entry in enumerate(choice.logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + list(choice.token_ids[:i])])).logits[0, -1].float()
        expected = torch.log_softmax(logits, dim=-1)
        assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-4)
        top = torch.topk(expected, 3)
        assert [t for t, _ in entry.top] == [reference.tokenizer.decode([t], skip_special_tokens=True)
                                            for t in top.indices.tolist()]
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.token == reference.tokenizer.decode([entry.token_id], skip_special_tokens=True)
    with pytest.raises(GenerationInvalid) as caught:
        engine.submit(PROMPTS[0], logprobs=21)
    assert caught.value.param == "logprobs"


def test_best_of_keeps_the_n_candidates_with_the_highest_mean_logprob_per_prompt(make_engine):
    engine = make_engine()
    prompts = [PROMPTS[0], PROMPTS[1]]
    sampled = {"max_tokens": 12, "temperature": 1.0, "seed": 5}
    every = engine.submit(prompts, n=4, logprobs=0, **sampled).result(TIMEOUT)
    best = engine.submit(prompts, n=2, best_of=4, **sampled).result(TIMEOUT)

    def mean(choice):
        return sum(e.logprob for e in choice.logprobs) / len(choice.token_ids)

    expected = []
    for p in range(2):
        group = sorted(every.choices[p * 4:(p + 1) * 4], key=mean, reverse=True)
        expected += [c.token_ids for c in group[:2]]
    assert len({c.token_ids for c in every.choices}) > 2  # the candidates differ, so ranking matters
    assert [c.index for c in best.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in best.choices] == expected
    assert all(c.logprobs is None for c in best.choices)  # not asked for
    assert best.usage.completion_tokens == every.usage.completion_tokens  # every candidate is paid for
    with pytest.raises(GenerationInvalid) as caught:
        engine.submit(PROMPTS[0], n=3, best_of=2)
    assert caught.value.param == "best_of"
