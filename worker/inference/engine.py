"""One base model in memory serving many LoRA adapters, with requests for different adapters
sharing a batch.

    engine = InferenceEngine("/models/base", max_adapters=32, max_adapter_bytes=256 << 20)
    gen = engine.submit("def add(a, b):", adapter=AdapterRef("ftadapter-1", "/adapters/1"),
                        max_tokens=64, temperature=0)
    for delta in gen:           # streaming
        print(delta.text, end="")
    completion = gen.result()   # text, token ids, finish_reason, usage

How it runs. One background thread owns the model. Requests wait in a FIFO queue; when the
engine is idle it gathers them for batch_window_ms after the first one arrives. Each round it
admits queued requests while there is room (max_batch_size rows; every adapter of the batch
resident in the cache at once), loading adapters on demand and evicting the least recently used
unpinned ones; prefills the new rows in one forward (left-padded); then decodes all running rows
together, one token per row per forward, each row with its own adapter (worker/inference/lora.py).
New requests join rows already running at the next step (their KV caches are left-padded to a
common length and concatenated); finished rows leave it. Greedy rows give the tokens that peft
gives with that adapter alone (PeftModel.from_pretrained + generate); the only differences are
float rounding of batched vs single-row matmuls, which would show only on near-ties of the argmax.

What an adapter may be: a peft LoRA directory (adapter_config.json + adapter_model.safetensors)
trained on this base. Pickled weights are refused, as are adapters whose matrices do not fit the
base's layers. A missing or corrupt adapter fails only the requests that name it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from app.core.errors import TuneforgeError
from app.domains.files import formats
from app.domains.serving.protocol import BASE_ADAPTER_KEY
from worker.inference.adapters import (
    AdapterCache,
    AdapterRef,
    AdapterSpec,
    LinearShape,
    ResidentAdapter,
    inspect_adapter,
)
from worker.inference.errors import (
    AdapterBaseMismatch,
    AdapterInUse,
    AdapterTooLarge,
    EngineClosed,
    EngineOverloaded,
    GenerationCancelled,
    GenerationInvalid,
    InferenceFailed,
)
from worker.inference.grammar import Constraint, Grammars
from worker.inference.lora import BatchedLora, load_lora
from worker.inference.results import Choice, Completion, Delta, Generation, TokenLogprob, Usage
from worker.inference.sampling import SamplingParams, TextState, adjust_logits, sample
from worker.inference.stats import BatchRecord, EngineStats

log = logging.getLogger(__name__)

@dataclass(eq=False)
class _Request:
    id: str
    prompts: list[list[int]]  # token ids of each prompt; prompt p's choices are rows p*n .. p*n+n-1
    params: SamplingParams
    adapter: AdapterRef | None
    handle: Generation
    spec: AdapterSpec | None = None  # checked adapter, kept while the request waits for cache room
    batch_id: int = 0
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    rows_left: int = 0
    choices: dict[int, Choice] = field(default_factory=dict)
    echo: list[str] | None = None  # with echo: each prompt's text, which its choices' texts begin with
    constraint: Constraint | None = None  # what every row's output must match (response_format, a forced tool call)
    matchers: list | None = None  # with a constraint: one llguidance matcher per row, built at submit

    @property
    def rows(self) -> int:
        """Rows the request takes: its candidates (n, or best_of) for each prompt."""
        return len(self.prompts) * self.params.candidates


@dataclass(eq=False)
class _Row:
    request: _Request
    index: int  # choice index within the request
    slot: str | None  # the adapter's slot in BatchedLora, None for the base
    text: TextState
    generator: object | None  # torch.Generator for sampled rows, None for greedy ones
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs
    matcher: object | None = None  # llguidance LLMatcher of a constrained row: what it may write next

    @property
    def prompt(self) -> list[int]:
        """The prompt of this row's choice (choices are prompt-major, as OpenAI indexes them)."""
        return self.request.prompts[self.index // self.request.params.candidates]

    @property
    def echo(self) -> str:
        """The text this row's choice begins with: its prompt's with echo, else nothing."""
        echo = self.request.echo
        return echo[self.index // self.request.params.candidates] if echo is not None else ""


@dataclass(eq=False)
class _Running:
    """Rows decoding together. Invariant: mask.shape[1] == the cache's length; next_ids are the
    rows' last sampled tokens, not yet in the cache; positions are their position ids."""

    rows: list[_Row]
    cache: object  # transformers DynamicCache, tensors (rows, kv_heads, length, head_dim) per layer
    mask: object  # (rows, length) long, 0 = left padding
    next_ids: object  # (rows,) long
    positions: object  # (rows,) long


class InferenceEngine:
    """Serves one base model with LoRA adapters swapped per request row. See the module docstring.

    base_model_path: a save_pretrained directory (config, safetensors weights, tokenizer).
    base_name: the identity adapters are checked against (AdapterRef.base); default the directory name.
    device: "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...; weights in float32 on CPU and
      bfloat16 on CUDA (float16 without bf16 support) unless dtype says otherwise.
    load_in_4bit: NF4 with double quantization and bf16 compute (bitsandbytes), as training uses.
    max_adapters / max_adapter_bytes: bounds of the adapter cache (count, bytes of LoRA weights).
    batch_window_ms: how long an idle engine waits after a request arrives for others to share its batch.
    max_batch_size: rows decoded together (a request with n choices takes n rows).
    max_queue: requests waiting beyond this are refused with EngineOverloaded.
    """

    def __init__(self, base_model_path: str | Path, *, base_name: str | None = None, device: str = "auto",
                 dtype: str | None = None, load_in_4bit: bool = False, max_adapters: int = 32,
                 max_adapter_bytes: int = 1 << 30, batch_window_ms: float = 5.0, max_batch_size: int = 32,
                 max_queue: int = 4096, warmup: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig
        from transformers.cache_utils import DynamicLayer

        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if batch_window_ms < 0:
            raise ValueError("batch_window_ms must be >= 0")
        self.base_path = Path(base_model_path).expanduser().resolve()
        self.base_name = base_name or self.base_path.name
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if dtype is not None:
            self.dtype = getattr(torch, dtype)
        elif self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_ms / 1000
        self.max_queue = max_queue
        self.load_in_4bit = load_in_4bit

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path, local_files_only=True)
        kwargs: dict = {"dtype": self.dtype}
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": str(self.device)}
        model = AutoModelForCausalLM.from_pretrained(self.base_path, local_files_only=True, **kwargs)
        if not load_in_4bit:
            model = model.to(self.device)
        else:
            _fix_bnb_cpu(model, self.device)
        self._model = model.eval()
        self.config = model.config
        self.context_length = int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size = int(self.config.vocab_size)
        self._base_linears = {name: LinearShape(m.in_features, m.out_features)
                              for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self._eos_ids = _eos_ids(self.tokenizer, self.config, GenerationConfig, self.base_path)
        self._grammars = Grammars(self.tokenizer, vocab_size=self.vocab_size, eos_ids=self._eos_ids)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (min(self._eos_ids) if self._eos_ids else 0)
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to encode from several threads
        self._dynamic_cache = DynamicCache
        # Joining running rows rewrites the KV cache; only plain growing caches can be rewritten so.
        self._can_join = all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.config).layers)

        self._lora = BatchedLora(self._model)
        self._cache = AdapterCache(max_adapters=max_adapters, max_bytes=max_adapter_bytes)
        self._slots = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._stats = EngineStats()

        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._commands: deque[tuple] = deque()
        self._running: _Running | None = None
        self._paused = False
        self._closing = False
        self._wake = False
        if warmup:
            with torch.inference_mode():
                self._model(input_ids=torch.tensor([[self._pad_id]], device=self.device))
        self._thread = threading.Thread(target=self._run, name=f"inference-{self.base_name}", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
               adapter: AdapterRef | None = None, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
               stop: str | Sequence[str] | None = None, n: int = 1, seed: int | None = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: Mapping[int | str, float] | None = None, logprobs: int | None = None,
               best_of: int | None = None, echo: bool = False, response_format: Mapping | None = None,
               tools: Sequence[Mapping] | None = None, tool_choice: str | Mapping | None = None,
               parallel_tool_calls: bool | None = None) -> Generation:
        """Queue a completion of `prompt` (text, tokenized with the base tokenizer, or token ids) with the
        adapter (None: the base model). A list of texts or of token-id lists is several prompts in one
        request: n choices each, indexed prompt-major (prompt p's choice i is index p*n + i), all of
        them rows of the same batch, so together at most max_batch_size. With echo, each choice's text
        (and its first delta) begins with its prompt's text (a token-id prompt decoded); usage and
        token_ids still count only generated tokens. logprobs=k gives each generated token's logprob and
        the k most likely tokens' (TokenLogprob), from the forward pass that chose it. best_of > n
        generates best_of candidates per prompt (rows of the batch, as its deltas are) and keeps the n
        with the highest mean token logprob, reindexed p*n + i; usage counts every candidate's tokens.
        response_format (OpenAI's json_object / json_schema) and tools with tool_choice "required" or a
        named function constrain every row's tokens to the grammar (worker/inference/grammar.py), each row
        with its matcher, so the text parses; a row ends ("stop") when its grammar is complete.
        Returns at once; adapter problems surface through the handle.
        Raises GenerationInvalid for out-of-range parameters or a prompt that does not fit the context,
        AdapterBaseMismatch when adapter.base names another base, EngineOverloaded when the queue is
        full, EngineClosed after close()."""
        params = SamplingParams.create(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                       n=n, seed=seed, presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty, logit_bias=logit_bias,
                                       logprobs=logprobs, best_of=best_of, max_n=self.max_batch_size,
                                       vocab_size=self.vocab_size)
        if adapter is not None and not isinstance(adapter, AdapterRef):
            raise GenerationInvalid("adapter must be an AdapterRef or None.", param="model")
        if adapter is not None and adapter.base is not None and adapter.base != self.base_name:
            raise AdapterBaseMismatch(
                f"Adapter {adapter.id!r} was trained on base model {adapter.base!r}, but this engine serves "
                f"{self.base_name!r}; send the request to the inference process serving {adapter.base!r}.",
                param="model")
        if not isinstance(echo, bool):
            raise GenerationInvalid(f"echo must be true or false, got {echo!r}.", param="echo")
        given = _prompt_list(prompt)
        prompts = [self._prompt_ids(p) for p in given]
        if len(prompts) * params.candidates > self.max_batch_size:
            raise GenerationInvalid(
                f"{len(prompts)} prompts with n={params.candidates} make {len(prompts) * params.candidates} choices, "
                f"more than the engine's batch of {self.max_batch_size} rows; send fewer prompts per request or "
                "lower n (or best_of).", param="prompt")
        constraint = self._grammars.constraint(response_format=response_format, tools=tools,
                                               tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
        matchers = [self._grammars.matcher(constraint) for _ in range(len(prompts) * params.candidates)] \
            if constraint is not None else None
        longest = max(len(ids) for ids in prompts)
        if longest + params.max_tokens > self.context_length:
            raise GenerationInvalid(
                f"The prompt has {longest} tokens and max_tokens is {params.max_tokens}; together they must fit "
                f"the model's context of {self.context_length} tokens. Shorten the prompt or lower max_tokens.",
                param="max_tokens")
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        handle = Generation(request_id, sum(len(ids) for ids in prompts), len(prompts) * params.n, self._notify)
        echoed = [p if isinstance(p, str) else self._decode(ids)
                  for p, ids in zip(given, prompts, strict=True)] if echo else None
        request = _Request(id=request_id, prompts=prompts, params=params, adapter=adapter, handle=handle,
                           echo=echoed, constraint=constraint, matchers=matchers)
        with self._cond:
            if self._closing:
                raise EngineClosed("The inference engine is shut down; it accepts no requests.")
            if len(self._pending) >= self.max_queue:
                raise EngineOverloaded(f"{len(self._pending)} requests are already waiting (max_queue); retry later.")
            self._pending.append(request)
            self._cond.notify_all()
        self._stats.count("requests", "submitted")
        return handle

    def chat_template(self, adapter: AdapterRef | None = None) -> str | None:
        """The chat template a chat prompt for `adapter` is rendered with: the one saved with the adapter's
        tokenizer (the one its training used) when it has one, else the base's; None when neither has one."""
        template = _adapter_chat_template(adapter.path) if adapter is not None else None
        return template or getattr(self.tokenizer, "chat_template", None) or None

    def encode_chat(self, messages: Sequence[dict], adapter: AdapterRef | None = None,
                    tools: Sequence[Mapping] | None = None) -> list[int]:
        """Token ids of a chat prompt rendered with chat_template(adapter), with the assistant turn opened.
        With tools (OpenAI function tools), a template that takes tools gets them as its `tools` argument and
        earlier calls as transformers templates read them; any other template gets them described in a
        system message, with earlier calls written as the model is asked to write them: training's rendering,
        formats.render_chat."""
        template = self.chat_template(adapter)
        if not template:
            raise GenerationInvalid(f"Neither the adapter nor the base model {self.base_name!r} has a chat template; "
                                    "use a completion with a plain prompt.", param="messages")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise GenerationInvalid("messages must be a non-empty list of {role, content} objects.", param="messages")
        with self._tok_lock:
            text = formats.render_chat(self.tokenizer, list(messages), tools, add_generation_prompt=True,
                                       chat_template=template)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def preload(self, adapter: AdapterRef, timeout: float | None = None) -> dict:
        """Load an adapter now (an operator warming the cache). Returns its cache entry; raises like a
        request naming it would, or EngineOverloaded when every cached adapter is in use."""
        return self._call(lambda: self._preload(adapter), timeout)

    def evict(self, adapter_id: str, timeout: float | None = None) -> bool:
        """Drop an adapter from memory; False when it was not loaded. Raises AdapterInUse while rows use it."""
        return self._call(lambda: self._evict_command(adapter_id), timeout)

    def pause(self) -> None:
        """Stop admitting queued requests (running rows go on); they wait until resume()."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stats(self) -> dict:
        """Counters for operators: cache (hits, misses, loads, evictions, load times), the loaded
        adapters (id, bytes, last use, requests), queue depth and running rows, batches (count,
        rows per batch, the recent ones), tokens generated and tokens/s, requests per adapter."""
        snapshot = self._stats.snapshot()
        with self._cond:
            entries = self._cache.entries()
            snapshot["adapters_loaded"] = [
                {"id": e.ref.id, "path": str(e.ref.path), "bytes": e.bytes, "loaded_at": round(e.loaded_at, 3),
                 "last_used_at": round(e.last_used_at, 3), "requests": e.requests, "load_ms": round(e.load_ms, 3)}
                for e in reversed(entries)]  # most recently used first
            snapshot["cache"] |= {"adapters": len(entries), "bytes": sum(e.bytes for e in entries),
                                  "max_adapters": self._cache.max_adapters, "max_bytes": self._cache.max_bytes}
            snapshot["queue_depth"] = len(self._pending)
            running = self._running
            snapshot["running_rows"] = sum(r.finish_reason is None for r in running.rows) if running else 0
            snapshot["paused"] = self._paused
        snapshot["base"] = {"name": self.base_name, "path": str(self.base_path), "device": str(self.device),
                            "dtype": str(self.dtype).removeprefix("torch."), "load_in_4bit": self.load_in_4bit,
                            "max_batch_size": self.max_batch_size,
                            "batch_window_ms": self.batch_window_s * 1000}
        return snapshot

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the engine: queued and running requests fail with EngineClosed. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- caller-thread helpers -----------------------------------------------------------------

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationInvalid("prompt must not be empty.", param="prompt")
            with self._tok_lock:
                ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids):
                raise GenerationInvalid(f"prompt token ids must be integers in [0, {self.vocab_size}).", param="prompt")
        if not ids:
            raise GenerationInvalid("prompt must not be empty.", param="prompt")
        return ids

    def _notify(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def _call(self, fn, timeout: float | None):
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise EngineClosed("The inference engine is shut down.")
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future.result(timeout)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while self._wait_for_work():
                admitted: list[_Row] = []
                try:
                    self._run_commands()
                    self._drop_cancelled()
                    admitted = self._admit()
                    if self._running is not None:
                        self._decode_step()
                    if admitted:
                        self._prefill(admitted)
                    self._retire_rows()
                except Exception as exc:  # never let the serving thread die; fail what was in flight
                    log.exception("inference step failed")
                    error = InferenceFailed(f"Generation failed in the model's forward pass: {exc}")
                    self._fail_running(error)
                    for request in {id(r.request): r.request for r in admitted}.values():
                        self._fail_request(request, error)
            self._shutdown()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while True:
                if self._closing:
                    return False
                if self._commands or self._running is not None or self._wake:
                    self._wake = False
                    return True
                if self._pending and not self._paused:
                    rows = sum(r.rows for r in self._pending)
                    remaining = self._pending[0].handle.submitted_at + self.batch_window_s - time.monotonic()
                    if rows >= self.max_batch_size or remaining <= 0:
                        return True
                    self._cond.wait(remaining)
                    continue
                self._cond.wait()

    def _run_commands(self) -> None:
        while True:
            with self._cond:
                if not self._commands:
                    return
                fn, future = self._commands.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        with self._cond:
            cancelled = [r for r in self._pending if r.handle.cancel_requested]
            for request in cancelled:
                self._pending.remove(request)
        for request in cancelled:
            self._fail_request(request, GenerationCancelled(f"Request {request.id} was cancelled."))

    # -- admission and the adapter cache ------------------------------------------------------

    def _pinned(self, extra: Sequence[_Row] = ()) -> set[str]:
        rows = (self._running.rows if self._running is not None else []) + list(extra)
        return {r.request.adapter.id for r in rows if r.request.adapter is not None}

    def _admit(self) -> list[_Row]:
        """Move queued requests into new rows, FIFO, while rows and adapter cache room allow."""
        import torch

        with self._cond:
            if self._paused or not self._pending:
                return []
        if self._running is not None and not self._can_join:
            return []
        capacity = self.max_batch_size - (len(self._running.rows) if self._running is not None else 0)
        rows: list[_Row] = []
        requests: list[_Request] = []
        while True:
            with self._cond:
                if not self._pending:
                    break
                request = self._pending[0]
            if request.rows > capacity:
                break
            slot = None
            if request.adapter is not None:
                try:
                    resident = self._resident(request, pinned=self._pinned(rows))
                except Exception as exc:  # the adapter's own error; anything else is still this adapter's fault
                    if not isinstance(exc, TuneforgeError):
                        log.exception("loading adapter %s failed", request.adapter.id)
                        self._stats.count("cache", "load_failures")
                        exc = InferenceFailed(f"Adapter {request.adapter.id!r} could not be loaded: {exc}",
                                              param="model")
                    with self._cond:
                        self._pending.popleft()
                    self._fail_request(request, exc)
                    continue
                if resident is None:  # every cached adapter is in use: wait for rows to finish
                    break
                slot = resident.slot
                with self._cond:
                    self._cache.touch(request.adapter.id)
            with self._cond:
                self._pending.popleft()
            request.admitted_at = time.monotonic()
            request.rows_left = request.rows
            requests.append(request)
            for index in range(request.rows):
                generator = None
                if not request.params.greedy:
                    generator = torch.Generator(device=self.device).manual_seed(request.params.row_seed(index))
                rows.append(_Row(request=request, index=index, slot=slot, generator=generator,
                                 text=TextState(self._decode, request.params.stop),
                                 logprobs=[] if request.params.scores_tokens else None,
                                 matcher=request.matchers[index] if request.matchers is not None else None))
            capacity -= request.rows
        if not requests:
            return []
        batch_id = next(self._batch_ids)
        for request in requests:
            request.batch_id = batch_id
        keys = [r.adapter.id if r.adapter is not None else BASE_ADAPTER_KEY for r in requests]
        self._stats.record_batch(
            BatchRecord(id=batch_id, at=time.time(), requests=len(requests), rows=len(rows), adapters=len(set(keys)),
                        joined_rows=len(self._running.rows) if self._running is not None else 0),
            keys, sum(len(ids) for r in requests for ids in r.prompts))
        return rows

    def _resident(self, request: _Request, pinned: set[str]) -> ResidentAdapter | None:
        """The request's adapter in memory (loading it, evicting LRU unpinned ones), or None when the cache
        cannot make room now. Raises the adapter's error."""
        ref = request.adapter
        with self._cond:
            entry = self._cache.get(ref.id)
        if entry is not None:
            self._stats.count("cache", "hits")
            return entry
        try:
            if request.spec is None:
                request.spec = inspect_adapter(ref, base_name=self.base_name, base_linears=self._base_linears)
            spec = request.spec
            if spec.estimated_bytes > self._cache.max_bytes:
                raise AdapterTooLarge(
                    f"Adapter {ref.id!r} needs {spec.estimated_bytes} bytes in memory, more than the engine's "
                    f"adapter memory bound of {self._cache.max_bytes} bytes (max_adapter_bytes).", param="model")
            with self._cond:
                victims = self._cache.victims_for(spec.estimated_bytes, pinned)
            if victims is None:
                return None
            entry = self._load(spec, victims)
        except TuneforgeError:
            self._stats.count("cache", "load_failures")
            raise
        self._stats.count("cache", "misses")
        with self._cond:
            extra = self._cache.over_bounds(pinned | {ref.id})
        for victim in extra:
            self._evict(victim)
        return entry

    def _load(self, spec: AdapterSpec, victims: list[str]) -> ResidentAdapter:
        """Read the adapter's weights, then evict the victims and make it servable under a new slot. Raises
        the adapter's error, having evicted nothing. (Memory briefly holds the victims and the new one.)"""
        start = time.perf_counter()
        weights = load_lora(spec, self.device)
        for victim in victims:
            self._evict(victim)
        slot = f"tf{next(self._slots)}"
        self._lora.add(slot, weights)
        load_ms = (time.perf_counter() - start) * 1000
        entry = ResidentAdapter(ref=spec.ref, slot=slot, bytes=weights.nbytes, loaded_at=time.time(), load_ms=load_ms)
        with self._cond:
            self._cache.add(entry)
        self._stats.record_load(load_ms)
        log.info("loaded adapter %s from %s as %s: %d bytes in %.1f ms", spec.ref.id, spec.ref.path, slot,
                 weights.nbytes, load_ms)
        return entry

    def _evict(self, adapter_id: str) -> None:
        with self._cond:
            entry = self._cache.remove(adapter_id)
        self._lora.remove(entry.slot)
        self._stats.count("cache", "evictions")
        log.info("evicted adapter %s (%s)", adapter_id, entry.slot)

    def _preload(self, adapter: AdapterRef) -> dict:
        request = _Request(id="preload", prompts=[], params=SamplingParams(), adapter=adapter,
                           handle=Generation("preload", 0, 1, lambda: None))
        entry = self._resident(request, pinned=self._pinned())
        if entry is None:
            raise EngineOverloaded("Every cached adapter is in use by running requests; retry when they finish.")
        with self._cond:
            self._cache.touch(adapter.id, request=False)
        return {"id": entry.ref.id, "bytes": entry.bytes, "load_ms": entry.load_ms}

    def _evict_command(self, adapter_id: str) -> bool:
        with self._cond:
            if adapter_id not in self._cache:
                return False
        in_use = sum(1 for r in (self._running.rows if self._running else [])
                     if r.request.adapter is not None and r.request.adapter.id == adapter_id)
        if in_use:
            raise AdapterInUse(f"Adapter {adapter_id!r} is used by {in_use} running rows; evict it when they finish.")
        self._evict(adapter_id)
        return True

    # -- forward passes ------------------------------------------------------------------------

    def _forward(self, input_ids, mask, position_ids, cache, slots: list[str | None]):
        """Last-position logits (rows, vocab) in float32, each row through its own adapter."""
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                      use_cache=True, logits_to_keep=1)
        self._lora.use(slots)
        try:
            out = self._model(**kwargs)
        finally:
            self._lora.clear()
        return out.logits[:, -1, :].float()

    def _prefill(self, rows: list[_Row]) -> None:
        import torch

        start = time.perf_counter()
        length = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last prompt token is at the end
            prompt = row.prompt
            ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, length - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._dynamic_cache(config=self.config)
        try:
            logits = self._forward(ids, mask, positions, cache, [r.slot for r in rows])
            tokens = self._choose(logits, rows)
            self._record_logprobs(logits, rows, tokens)
        except Exception as exc:
            log.exception("prefill failed")
            error = InferenceFailed(f"Generation failed in the model's forward pass: {exc}")
            for request in {id(r.request): r.request for r in rows}.values():
                self._fail_request(request, error)
            return
        state = _Running(rows=rows, cache=cache, mask=mask, next_ids=torch.tensor(tokens, device=self.device),
                         positions=mask.sum(-1))
        self._merge(state)
        self._stats.record_forward("prefills", len(rows), len(rows), time.perf_counter() - start)
        self._emit(rows, tokens)

    def _decode_step(self) -> None:
        import torch

        start = time.perf_counter()
        run = self._running
        run.mask = torch.cat([run.mask, run.mask.new_ones((len(run.rows), 1))], dim=1)
        logits = self._forward(run.next_ids[:, None], run.mask, run.positions[:, None], run.cache,
                               [r.slot for r in run.rows])
        tokens = self._choose(logits, run.rows)
        self._record_logprobs(logits, run.rows, tokens)
        run.positions = run.positions + 1
        run.next_ids = torch.tensor(tokens, device=self.device)
        self._stats.record_forward("decode_steps", len(run.rows), len(run.rows), time.perf_counter() - start)
        self._emit(run.rows, tokens)

    def _choose(self, logits, rows: list[_Row]) -> list[int]:
        """Greedy rows take the argmax (as generate(do_sample=False)); sampled rows draw with their own generator.
        Rows with penalties or a logit_bias have their own logits adjusted first, then constrained rows' logits
        are masked to what their grammar allows next; the others' are untouched."""
        for i, row in enumerate(rows):
            if row.request.params.adjusts_logits:
                logits[i] = adjust_logits(logits[i], row.tokens, row.request.params)
        constrained = [(i, row.matcher) for i, row in enumerate(rows) if row.matcher is not None]
        if constrained:
            self._grammars.mask(logits, constrained)
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.generator is not None:
                params = row.request.params
                tokens[i] = sample(logits[i], params.temperature, params.top_p, row.generator)
        return tokens

    def _record_logprobs(self, logits, rows: list[_Row], tokens: list[int]) -> None:
        """Rows that asked for logprobs note their chosen token's and the top alternatives' from the logits
        it was chosen from ((rows, vocab), as _choose left them: penalties and logit_bias applied)."""
        import torch

        for i, row in enumerate(rows):
            if row.logprobs is None:
                continue
            logprobs = torch.log_softmax(logits[i], dim=-1)
            top: tuple[tuple[str, float], ...] = ()
            if k := row.request.params.logprobs:
                values, ids = torch.topk(logprobs, k)
                top = tuple((self._decode([t]), v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
                            if v != float("-inf"))  # a constrained row may allow fewer than k tokens
            token = tokens[i]
            row.logprobs.append(TokenLogprob(self._decode([token]), token, float(logprobs[token]), top))

    def _merge(self, new: _Running) -> None:
        """Add prefilled rows to the running ones: left-pad the shorter KV cache and mask, concatenate rows."""
        import torch

        run = self._running
        if run is None:
            self._running = new
            return
        length = max(run.mask.shape[1], new.mask.shape[1])

        def pad(t, dim: int):
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old_layer, new_layer in zip(run.cache.layers, new.cache.layers, strict=True):
            old_layer.keys = torch.cat([pad(old_layer.keys, 2), pad(new_layer.keys, 2)], dim=0)
            old_layer.values = torch.cat([pad(old_layer.values, 2), pad(new_layer.values, 2)], dim=0)
        run.mask = torch.cat([pad(run.mask, 1), pad(new.mask, 1)], dim=0)
        run.next_ids = torch.cat([run.next_ids, new.next_ids])
        run.positions = torch.cat([run.positions, new.positions])
        run.rows = run.rows + new.rows

    # -- tokens to text, finishing rows and requests ------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        now = time.monotonic()
        for row, token in zip(rows, tokens, strict=True):
            request, params = row.request, row.request.params
            if not request.first_token_at:
                request.first_token_at = now
            row.tokens.append(token)
            finish = None
            if token in self._eos_ids:
                finish = "stop"
            elif row.matcher is not None and not row.matcher.consume_token(token):
                row.finish_reason = "stop"  # retired with its request, which fails
                self._fail_request(request, InferenceFailed(
                    f"Constrained decoding went wrong: {row.matcher.get_error()}"))
                continue
            elif row.text.add(row.tokens):
                finish = "stop"
            elif row.matcher is not None and row.matcher.is_stopped():
                finish = "stop"  # the grammar is complete: nothing more may be written
            if finish is None and len(row.tokens) >= params.max_tokens:
                finish = "length"
            row.finish_reason = finish
            piece = row.text.release(final=finish is not None)
            if len(row.tokens) == 1:
                piece = row.echo + piece
            request.handle._push(Delta(row.index, piece, (token,), finish,
                                       (row.logprobs[-1],) if row.logprobs is not None else None))
            if finish is not None:
                request.choices[row.index] = Choice(row.index, row.echo + row.text.text, tuple(row.tokens), finish,
                                                    tuple(row.logprobs) if row.logprobs is not None else None)
                request.rows_left -= 1
                if request.rows_left == 0:
                    self._complete(request, now)

    def _complete(self, request: _Request, now: float) -> None:
        candidates = [request.choices[i] for i in range(request.rows)]
        prompt_tokens = sum(len(ids) for ids in request.prompts)
        completion_tokens = sum(len(c.token_ids) for c in candidates)
        choices = _best(candidates, request.params)
        submitted = request.handle.submitted_at
        request.handle._finish(Completion(
            id=request.id, created=int(time.time()), adapter_id=request.adapter.id if request.adapter else None,
            choices=choices, usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
            batch_id=request.batch_id, queue_s=request.admitted_at - submitted,
            first_token_s=request.first_token_at - submitted, total_s=now - submitted))
        self._stats.count("requests", "completed")

    def _retire_rows(self) -> None:
        """Drop finished and cancelled rows from the running batch, and padding no row needs any more."""
        import torch

        run = self._running
        if run is None:
            return
        keep, cancelled = [], {}
        for i, row in enumerate(run.rows):
            if row.finish_reason is not None:
                continue
            if row.request.handle.cancel_requested:
                cancelled[id(row.request)] = row.request
                continue
            keep.append(i)
        for request in cancelled.values():
            self._fail_request(request, GenerationCancelled(f"Request {request.id} was cancelled."))
        if len(keep) == len(run.rows):
            return
        if not keep:
            self._running = None
            return
        index = torch.tensor(keep, device=self.device)
        run.cache.batch_select_indices(index)
        run.mask = run.mask.index_select(0, index)
        run.next_ids = run.next_ids.index_select(0, index)
        run.positions = run.positions.index_select(0, index)
        run.rows = [run.rows[i] for i in keep]
        if self._can_join:
            used = run.mask.any(dim=0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first > 0:  # columns that are padding in every remaining row: drop them from mask and cache
                run.mask = run.mask[:, first:]
                for layer in run.cache.layers:
                    layer.keys = layer.keys[:, :, first:]
                    layer.values = layer.values[:, :, first:]

    def _fail_request(self, request: _Request, error: TuneforgeError) -> None:
        if request.handle.done():
            return
        request.handle._fail(error)
        kind = "cancelled" if isinstance(error, GenerationCancelled) else "failed"
        self._stats.count("requests", kind)

    def _fail_running(self, error: TuneforgeError) -> None:
        run, self._running = self._running, None
        if run is None:
            return
        for request in {id(r.request): r.request for r in run.rows}.values():
            self._fail_request(request, error)

    def _shutdown(self) -> None:
        error = EngineClosed("The inference engine was shut down before this request finished.")
        self._fail_running(error)
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            commands, self._commands = list(self._commands), deque()
        for request in pending:
            self._fail_request(request, error)
        for _, future in commands:
            future.set_exception(error)


def _best(candidates: list[Choice], params: SamplingParams) -> tuple[Choice, ...]:
    """The choices to return: of each prompt's candidates (best_of, prompt-major), the n with the highest
    mean token logprob, in that order, indexed p*n + i; all of them when best_of is n."""
    if params.best_of <= params.n:
        return tuple(candidates)
    chosen = []
    for start in range(0, len(candidates), params.best_of):
        group = candidates[start:start + params.best_of]
        ranked = sorted(group, key=lambda c: -sum(e.logprob for e in c.logprobs or ()) / max(len(c.token_ids), 1))
        chosen += ranked[:params.n]
    keep_logprobs = params.logprobs is not None
    return tuple(dataclasses.replace(c, index=i, logprobs=c.logprobs if keep_logprobs else None)
                 for i, c in enumerate(chosen))


def _prompt_list(prompt) -> list:
    """The prompts of a request: one text or token-id list, or a non-empty list of either (OpenAI's
    batched prompt). Raises GenerationInvalid for an empty list or a mix of the two kinds."""
    if isinstance(prompt, str) or not isinstance(prompt, Sequence):
        return [prompt]
    items = list(prompt)
    if not items:
        raise GenerationInvalid("prompt must not be empty.", param="prompt")
    if all(isinstance(p, str) for p in items) or all(not isinstance(p, str) and isinstance(p, Sequence)
                                                     for p in items):
        return items
    return [items]  # token ids (checked by _prompt_ids), or a mix that _prompt_ids refuses


def _fix_bnb_cpu(model, device) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights on the first forward, after which
    layers whose output size is not a multiple of 32 fail; the plain CPU path has neither problem."""
    if device.type != "cpu":
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _eos_ids(tokenizer, config, generation_config_cls, path: Path) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    try:
        sources.append(generation_config_cls.from_pretrained(path, local_files_only=True).eos_token_id)
    except (OSError, ValueError):  # no generation_config.json
        pass
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _adapter_chat_template(path: Path) -> str | None:
    """The chat template saved with an adapter's tokenizer: chat_template.jinja (transformers 5) or the
    chat_template field of tokenizer_config.json (older saves)."""
    import json

    path = Path(path)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except (OSError, ValueError):
            return None
        return template if isinstance(template, str) else None
    return None
