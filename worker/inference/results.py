"""What a caller gets back from the engine: a Generation handle that streams Deltas and ends in a
Completion (or raises the request's error). Shaped so an HTTP layer maps them onto OpenAI's
completion / chat completion objects and their stream chunks directly."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (natural log) under the logits it was chosen from (after
    penalties and logit_bias, before temperature and top_p), with the top alternatives', most likely
    first. token: its text decoded alone (an EOS decodes to "")."""

    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output of one choice. The texts of a choice's deltas add up to its final text and their
    token_ids to its token_ids; the last delta of a choice carries its finish_reason."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" on a choice's last delta
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when the request asked for logprobs


@dataclass(frozen=True)
class Choice:
    """text: the decoded completion, cut before a stop sequence; token_ids: every generated token,
    including an EOS and the token that completed a stop sequence (so len(token_ids) is what the
    choice cost); finish_reason: "stop" (EOS or a stop sequence) or "length" (max_tokens);
    logprobs: one per token of token_ids, when the request asked for them."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Completion:
    id: str
    created: int  # unix seconds
    adapter_id: str | None
    choices: tuple[Choice, ...]
    usage: Usage
    batch_id: int  # the batch the request was admitted in (InferenceEngine.stats()["batches"]["recent"])
    queue_s: float  # submit -> admitted into a batch
    first_token_s: float  # submit -> first token
    total_s: float  # submit -> done


class Generation:
    """A submitted request. Iterate it (or stream()/astream()) for Deltas as tokens arrive, or call
    result()/aresult() for the Completion. Failures (a bad adapter, a closed engine, cancellation)
    raise the request's TuneforgeError from both. No Delta comes before the request is admitted
    with its adapter loaded, so an HTTP layer can wait for the first one (or the error) before it
    commits to a status code. cancel() ends it at the engine's next step. Thread-safe."""

    def __init__(self, request_id: str, prompt_tokens: int, n: int, wake_engine: Callable[[], None]) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.n = n
        self.submitted_at = time.monotonic()
        self._wake_engine = wake_engine
        self._cond = threading.Condition()
        self._deltas: list[Delta] = []
        self._result: Completion | None = None
        self._error: BaseException | None = None
        self._cancel_requested = False
        self._listeners: list[Callable[[], None]] = []

    # -- caller side -------------------------------------------------------------------------

    def done(self) -> bool:
        with self._cond:
            return self._result is not None or self._error is not None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Ask the engine to drop this request (queued or running); it then fails with GenerationCancelled."""
        with self._cond:
            if self._result is not None or self._error is not None:
                return
            self._cancel_requested = True
        self._wake_engine()

    def result(self, timeout: float | None = None) -> Completion:
        """Block until done. Raises the request's error, or TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._result is None and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"generation {self.id} not done after {timeout} s")
                self._cond.wait(remaining)
            if self._error is not None:
                raise self._error
            return self._result

    def __iter__(self) -> Iterator[Delta]:
        return self.stream()

    def stream(self, timeout: float | None = None) -> Iterator[Delta]:
        """Deltas in order; `timeout` bounds the wait for each one (TimeoutError)."""
        cursor = 0
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while cursor >= len(self._deltas) and self._result is None and self._error is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"no output from generation {self.id} for {timeout} s")
                    self._cond.wait(remaining)
                pending = self._deltas[cursor:]
                cursor = len(self._deltas)
                error, finished = self._error, self._result is not None
            yield from pending
            if error is not None and not pending:
                raise error
            if finished and not pending:
                return

    async def astream(self) -> AsyncIterator[Delta]:
        """stream() for asyncio: never blocks the event loop (the engine thread wakes it)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def notify() -> None:
            loop.call_soon_threadsafe(ready.set)

        with self._cond:
            self._listeners.append(notify)
        try:
            cursor = 0
            while True:
                ready.clear()
                with self._cond:
                    pending = self._deltas[cursor:]
                    cursor = len(self._deltas)
                    error, finished = self._error, self._result is not None
                for delta in pending:
                    yield delta
                if pending:
                    continue
                if error is not None:
                    raise error
                if finished:
                    return
                await ready.wait()
        finally:
            with self._cond:
                self._listeners.remove(notify)

    async def aresult(self) -> Completion:
        async for _ in self.astream():
            pass
        return self.result(timeout=0)

    # -- engine side -------------------------------------------------------------------------

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._deltas.append(delta)
            self._cond.notify_all()
            listeners = list(self._listeners)
        for notify in listeners:
            notify()

    def _finish(self, result: Completion) -> None:
        self._settle(result=result)

    def _fail(self, error: BaseException) -> None:
        self._settle(error=error)

    def _settle(self, result: Completion | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self._result is not None or self._error is not None:
                return
            self._result, self._error = result, error
            self._cond.notify_all()
            listeners = list(self._listeners)
        for notify in listeners:
            notify()
