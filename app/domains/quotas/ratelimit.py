"""Per-key token buckets: a key may send `burst` requests at once, refilled at `rate` per second.

With a Redis broker the buckets live in Redis, updated by one Lua script (atomic, on Redis's own
clock), so every API process shares them. On the embedded default (one machine, no Redis) each
process keeps its own. If Redis cannot be reached the request is let through and a warning logged:
an outage of the limiter must not take the API down with it.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache

import redis

from app.core.config import get_settings

log = logging.getLogger("tuneforge.ratelimit")

# Returns {allowed (0/1), seconds until one token is available} (as a string: Lua numbers
# returned to Redis are truncated to integers).
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class LocalBuckets:
    """In-process token buckets (the embedded default)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, *, rate: float, burst: int) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, ts = self._buckets.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - ts) * rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / rate


class RedisBuckets:
    """Token buckets in Redis, shared by every API process."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._client.register_script(_BUCKET)

    def take(self, key: str, *, rate: float, burst: int) -> float:
        try:
            allowed, wait = self._script(keys=[f"tuneforge:ratelimit:{key}"], args=[rate, burst])
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, request let through: %s", exc)
            return 0.0
        return 0.0 if int(allowed) else float(wait)


@lru_cache
def buckets() -> LocalBuckets | RedisBuckets:
    url = get_settings().broker_url
    if url and url.startswith(("redis://", "rediss://")):
        return RedisBuckets(url)
    return LocalBuckets()
