"""Request parameters (validated the way OpenAI's completions API bounds them), next-token choice
and the per-row text state: detokenization, stop sequences and the text safe to stream."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.inference.errors import GenerationInvalid

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs (chat); completions' logprobs allows 5
REPLACEMENT = "\ufffd"  # what a decoder shows for the first bytes of an unfinished UTF-8 character


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens new tokens at most; temperature 0 is greedy (argmax, the same tokens as peft's
    generate(do_sample=False)); top_p nucleus sampling; stop: up to 4 strings that end a choice
    (not included in its text); n choices of one prompt; seed makes sampling reproducible.
    presence_penalty, frequency_penalty and logit_bias change a row's logits before it chooses, as
    OpenAI defines them (adjust_logits)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely tokens'
    best_of: int = 1  # candidates per prompt, of which the n with the highest mean token logprob are kept

    @classmethod
    def create(cls, *, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
               stop: str | Sequence[str] | None = None, n: int = 1, seed: int | None = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: Mapping[int | str, float] | None = None, logprobs: int | None = None,
               best_of: int | None = None, max_n: int, vocab_size: int) -> SamplingParams:
        """Raises GenerationInvalid naming the parameter that is out of range."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise GenerationInvalid(f"max_tokens must be a positive integer, got {max_tokens!r}.", param="max_tokens")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise GenerationInvalid(f"temperature must be between 0 and 2, got {temperature!r}.", param="temperature")
        if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
            raise GenerationInvalid(f"top_p must be in (0, 1], got {top_p!r}.", param="top_p")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
            raise GenerationInvalid(f"n must be an integer from 1 to {max_n} (the engine's batch size), got {n!r}.",
                                    param="n")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise GenerationInvalid(f"seed must be an integer, got {seed!r}.", param="seed")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise GenerationInvalid(f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty "
                                    f"strings, got {stop!r}.", param="stop")
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not -2 <= value <= 2:
                raise GenerationInvalid(f"{name} must be between -2 and 2, got {value!r}.", param=name)
        bias = []
        for key, value in (logit_bias or {}).items():
            token = int(key) if isinstance(key, str) and key.isdigit() else key
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise GenerationInvalid(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}.",
                                        param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
                raise GenerationInvalid(f"logit_bias values must be between -100 and 100, got {value!r} for "
                                        f"token {key!r}.", param="logit_bias")
            bias.append((token, float(value)))
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise GenerationInvalid(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r}.",
                                    param="logprobs")
        if best_of is None:
            best_of = n
        if isinstance(best_of, bool) or not isinstance(best_of, int) or not n <= best_of <= max_n:
            raise GenerationInvalid(f"best_of must be an integer from n ({n}) to {max_n} (the engine's batch size), "
                                    f"got {best_of!r}.", param="best_of")
        return cls(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=stops, n=n,
                   seed=seed, presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
                   logit_bias=tuple(bias), logprobs=logprobs, best_of=best_of)

    @property
    def candidates(self) -> int:
        """Rows generated per prompt: best_of (n when not given)."""
        return max(self.best_of, self.n)

    @property
    def scores_tokens(self) -> bool:
        """Whether rows note each token's logprob: asked for, or needed to rank best_of candidates."""
        return self.logprobs is not None or self.best_of > self.n

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def row_seed(self, index: int) -> int:
        """Seed of choice `index`: seed + index, so the n choices differ and each is reproducible."""
        base = self.seed if self.seed is not None else secrets.randbits(62)
        return (base + index) % (2**63)


def adjust_logits(logits, tokens: Sequence[int], params: SamplingParams):
    """One row's logits (vocab,) float32 as OpenAI adjusts them before choosing: logit_bias added, then
    for each token j already generated c[j] times, c[j] * frequency_penalty + (c[j] > 0) *
    presence_penalty subtracted. Returns a new tensor."""
    import torch

    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=logits.device)
        logits[ids] += torch.tensor([b for _, b in params.logit_bias], device=logits.device, dtype=logits.dtype)
    if tokens and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(tokens), device=logits.device), minlength=logits.shape[0])
        counts = counts[:logits.shape[0]].to(logits.dtype)
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


def sample(logits, temperature: float, top_p: float, generator) -> int:
    """One token from logits (vocab,) float32: softmax(logits / temperature) cut to the smallest set of
    tokens whose probability reaches top_p (the most likely one always kept)."""
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability mass ranked above each token
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextState:
    """One choice's text as tokens arrive. Text is always the decode of all its tokens (so the
    streamed pieces add up to exactly the final text), cut before the first stop sequence. What
    may still turn into a stop sequence, and unfinished UTF-8, is held back from streaming."""

    def __init__(self, decode, stops: tuple[str, ...]) -> None:
        self._decode = decode  # list[int] -> str
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.released = 0  # characters of text already streamed

    def add(self, token_ids: list[int]) -> bool:
        """Update from all tokens so far; True when a stop sequence appeared (text is cut before it)."""
        text = self._decode(token_ids)
        if self._stops:
            # A stop may begin in the last characters of the earlier text, or where it ended in an unfinished
            # character that this token completed.
            start = max(0, len(self.text.rstrip(REPLACEMENT)) - self._hold)
            cuts = [i for s in self._stops if (i := text.find(s, start)) != -1]
            if cuts:
                self.text = text[:min(cuts)]
                return True
        self.text = text
        return False

    def release(self, final: bool) -> str:
        """The next piece safe to stream (all the rest when final)."""
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip(REPLACEMENT)) - self._hold
        if end <= self.released:
            return ""
        piece = self.text[self.released:end]
        self.released = end
        return piece
