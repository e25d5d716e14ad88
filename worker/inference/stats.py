"""The engine's counters for operators: cache behaviour, batching, throughput, per-adapter use.

Updated by the engine thread, read by anyone through InferenceEngine.stats(); a lock keeps a
snapshot consistent. EngineCollector shows them to Prometheus."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

RECENT_WINDOW_S = 30.0


@dataclass(frozen=True)
class BatchRecord:
    """One admission round: the requests prefilled together and then decoded together (joining any
    rows already running)."""

    id: int
    at: float  # unix seconds
    requests: int
    rows: int
    adapters: int  # distinct adapters among the new rows, the base counting as one
    joined_rows: int  # rows already running that this batch joined


class EngineStats:
    def __init__(self, recent_batches: int = 256) -> None:
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.requests = Counter()  # submitted, completed, failed, cancelled
        self.cache = Counter()  # hits, misses, loads, load_failures, evictions
        self.load_ms: deque[float] = deque(maxlen=256)
        self.batches = 0
        self.rows_per_batch = Counter()  # rows -> number of batches of that size
        self.recent_batches: deque[BatchRecord] = deque(maxlen=recent_batches)
        self.forwards = Counter()  # prefills, decode_steps
        self.rows_per_step = Counter()  # running rows -> number of decode steps with that many
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.busy_s = 0.0  # time spent in forward passes and sampling
        self.per_adapter = Counter()  # adapter id (or protocol.BASE_ADAPTER_KEY) -> requests admitted
        self._token_times: deque[tuple[float, int]] = deque()  # (monotonic, tokens) per forward

    def count(self, group: str, key: str, n: int = 1) -> None:
        with self._lock:
            getattr(self, group)[key] += n

    def record_load(self, ms: float) -> None:
        with self._lock:
            self.cache["loads"] += 1
            self.load_ms.append(ms)

    def record_batch(self, record: BatchRecord, adapter_keys: list[str], prompt_tokens: int) -> None:
        with self._lock:
            self.batches += 1
            self.rows_per_batch[record.rows] += 1
            self.recent_batches.append(record)
            self.per_adapter.update(adapter_keys)
            self.prompt_tokens += prompt_tokens

    def record_forward(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.forwards[kind] += 1
            if kind == "decode_steps":
                self.rows_per_step[rows] += 1
            self.tokens_generated += tokens
            self.busy_s += seconds
            self._token_times.append((now, tokens))
            while self._token_times and self._token_times[0][0] < now - RECENT_WINDOW_S:
                self._token_times.popleft()

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._token_times if t >= now - RECENT_WINDOW_S]
            span = (now - recent[0][0]) if len(recent) > 1 else 0.0
            steps = sum(self.rows_per_step.values())
            return {
                "uptime_s": round(time.time() - self.started_at, 3),
                "requests": {k: self.requests[k] for k in ("submitted", "completed", "failed", "cancelled")},
                "cache": {k: self.cache[k] for k in ("hits", "misses", "loads", "load_failures", "evictions")}
                | {"load_ms_last": round(self.load_ms[-1], 3) if self.load_ms else None,
                   "load_ms_mean": round(sum(self.load_ms) / len(self.load_ms), 3) if self.load_ms else None},
                "batches": {
                    "count": self.batches,
                    "rows_histogram": dict(sorted(self.rows_per_batch.items())),
                    "max_rows": max(self.rows_per_batch, default=0),
                    "recent": [asdict(b) for b in list(self.recent_batches)[-32:]],
                },
                "forwards": {
                    "prefills": self.forwards["prefills"],
                    "decode_steps": self.forwards["decode_steps"],
                    "mean_rows_per_step": round(sum(r * c for r, c in self.rows_per_step.items()) / steps, 3)
                    if steps else 0.0,
                    "max_rows_per_step": max(self.rows_per_step, default=0),
                },
                "tokens": {
                    "generated": self.tokens_generated,
                    "prompt": self.prompt_tokens,
                    "per_s_recent": round(sum(n for _, n in recent[1:]) / span, 2) if span > 0 else 0.0,
                    "per_s_busy": round(self.tokens_generated / self.busy_s, 2) if self.busy_s else 0.0,
                    "busy_s": round(self.busy_s, 3),
                },
                "per_adapter_requests": dict(self.per_adapter),
            }


class EngineCollector:
    """The engine's counters (InferenceEngine.stats()) in Prometheus' terms, read at scrape time; the
    inference process serves them at GET /metrics. Per-adapter counts stay in /v1/stats: adapter ids
    as labels would grow without bound."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield _labelled(CounterMetricFamily, "tuneforge_inference_requests",
                        "Generation requests, by what became of them.", "outcome", s["requests"])
        yield _labelled(CounterMetricFamily, "tuneforge_inference_adapter_cache", "Adapter cache events.", "event",
                        {k: s["cache"][k] for k in ("hits", "misses", "loads", "load_failures", "evictions")})
        yield GaugeMetricFamily("tuneforge_inference_adapters_loaded", "Adapters in memory.",
                                value=s["cache"].get("adapters", 0))
        yield GaugeMetricFamily("tuneforge_inference_adapter_cache_bytes", "Bytes of the adapters in memory.",
                                value=s["cache"].get("bytes", 0))
        yield CounterMetricFamily("tuneforge_inference_batches", "Admission rounds (batches prefilled together).",
                                  value=s["batches"]["count"])
        yield _labelled(CounterMetricFamily, "tuneforge_inference_forwards", "Forward passes, by kind.", "kind",
                        {k: s["forwards"][k] for k in ("prefills", "decode_steps")})
        yield _labelled(CounterMetricFamily, "tuneforge_inference_tokens", "Tokens, generated and prompted.", "kind",
                        {k: s["tokens"][k] for k in ("generated", "prompt")})
        yield CounterMetricFamily("tuneforge_inference_busy_seconds", "Time spent in forward passes and sampling.",
                                  value=s["tokens"]["busy_s"])
        yield GaugeMetricFamily("tuneforge_inference_tokens_per_second",
                                f"Tokens generated per second over the last {RECENT_WINDOW_S:.0f} s.",
                                value=s["tokens"]["per_s_recent"])
        yield GaugeMetricFamily("tuneforge_inference_queue_depth", "Requests waiting for admission.",
                                value=s.get("queue_depth", 0))
        yield GaugeMetricFamily("tuneforge_inference_running_rows", "Rows being decoded now.",
                                value=s.get("running_rows", 0))


def _labelled(kind: type, name: str, documentation: str, label: str, values: dict) -> Metric:
    family = kind(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
