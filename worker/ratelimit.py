"""Client-side flow control of API calls, so a large backlog never floods the API.

Two independent brakes, both in front of every HTTP attempt:

* a **rate limit** (``COC_WORKER_API_RATE_LIMIT_PER_S``, off by default): a token bucket in its
  GCRA form (one "theoretical arrival time" instead of a token count). With the Redis dedup
  backend the bucket lives in Redis, so the limit holds for all replicas together;
* an **adaptive concurrency limit** (always on): AIMD like TCP's congestion window. It starts at
  the API request limit (``api_max_connections``, else ``max_in_flight``); a 429 halves it (at
  most once per second), every success adds ``1/limit``. So after 429s the worker slows down by
  itself and speeds up again when the API recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from worker.logs import get_logger
from worker.metrics import Metrics
from worker.redis_config import (
    DEFAULT_PREFIX,
    DedupTarget,
    dedup_target,
    is_read_only,
    key_prefix,
    leave_demoted_node,
    redis_client,
)
from worker.settings import WorkerSettings, is_redis_url

log = get_logger(__name__)

_HALVE_AT_MOST_EVERY_S = 1.0
_GIVE_BACK_TIMEOUT_S = 1.0


class RateLimit(Protocol):
    async def acquire(self) -> float:
        """Wait for a slot; returns until when (``time.monotonic()``) the slot counts against the
        rate, which ``give_back`` is given."""

    async def give_back(self, until: float) -> None:
        """Return a slot no call was made with (its job was cancelled, or lost its claim, before
        sending), unless it no longer counts: a slot whose time has passed was made up by time
        itself, and returning it would let an extra call through."""

    async def close(self) -> None: ...


class TokenBucket:
    """GCRA in this process.

    A caller reserves its slot before it sleeps until then; a caller cancelled while it sleeps (a
    rebalance cancels up to ``max_in_flight`` of them at once) gives its slot back, or the slots
    of calls never made would hold every later call back (50 cancelled at 10/s: 5 s).
    """

    def __init__(self, rate_per_s: float, burst: int, metrics: Metrics) -> None:
        self._interval_s = 1.0 / rate_per_s
        self._tolerance_s = (max(1, burst) - 1) * self._interval_s
        self._tat = 0.0
        self._waited = metrics.rate_limited.labels(limit="rate")  # looked up once: per call

    async def acquire(self) -> float:
        now = time.monotonic()
        tat = max(self._tat, now)
        wait_s = tat - self._tolerance_s - now
        until = self._tat = tat + self._interval_s
        if wait_s > 0:
            self._waited.inc()
            try:
                await asyncio.sleep(wait_s)
            except asyncio.CancelledError:
                await self.give_back(until)
                raise
        return until

    async def give_back(self, until: float) -> None:
        """The last slot goes to whoever asks next (the schedule keeps its rate: one call fewer
        at the returned slot's time, one more at the end of what is reserved)."""
        now = time.monotonic()
        if until > now:
            self._tat = max(now, self._tat - self._interval_s)

    async def close(self) -> None:
        return None


# Reserve the next slot atomically with Redis' own clock; returns how long to wait (ms). KEYS[2]
# keeps the clock as last seen: when Redis' host clock steps back, the schedule (an absolute time)
# moves back with it, or every replica would wait out the step (an hour's step: an hour of no API
# calls, with /readyz still green).
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
if now < seen then tat = tat - (seen - now) end
if tat < now then tat = now end
local ttl = math.ceil(tat + interval - now + 1000)
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', ttl)
redis.call('SET', KEYS[2], tostring(now), 'PX', ttl)
return math.floor(tat - tolerance - now)
"""
#: A slot reserved by a caller that made no call with it, given back (``TokenBucket.give_back``).
_GIVE_BACK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local interval = tonumber(ARGV[1])
if tat - interval > now then
  redis.call('SET', KEYS[1], tostring(tat - interval), 'PX', math.ceil(tat - now + 1000))
end
return 0
"""


class RedisTokenBucket:
    """GCRA shared by every replica through one Redis key; degrades to local if Redis is away."""

    def __init__(
        self, url: str | DedupTarget, key: str, rate_per_s: float, burst: int, metrics: Metrics
    ) -> None:
        """``url``: the dedup store's Redis, alone or with its password (``dedup_target``)."""
        self._client: aioredis.Redis = redis_client(url, socket_timeout_s=1.0)
        self._script = self._client.register_script(_GCRA_LUA)
        self._give_back_script = self._client.register_script(_GIVE_BACK_LUA)
        self._key = key
        self._clock_key = f"{key}:clock"
        self._interval_ms = 1000.0 / rate_per_s
        self._tolerance_ms = (max(1, burst) - 1) * self._interval_ms
        self._local = TokenBucket(rate_per_s, burst, metrics)
        self._waited = metrics.rate_limited.labels(limit="rate")
        self._local_since_failure = False

    async def acquire(self) -> float:
        reservation = asyncio.ensure_future(
            self._script(keys=[self._key, self._clock_key], args=[self._interval_ms, self._tolerance_ms])
        )
        try:
            wait_ms = int(await asyncio.shield(reservation))
        except asyncio.CancelledError:
            await self._give_back_reservation(reservation)
            raise
        except (redis_errors.RedisError, OSError) as exc:
            if is_read_only(exc):
                await leave_demoted_node(self._client)
            # The dedup store's own failure handling pauses the worker; meanwhile limit locally
            # (each replica to the whole rate: said once per episode, so it is not a silent change).
            if not self._local_since_failure:
                self._local_since_failure = True
                log.warning(
                    "rate_limit_local", error=type(exc).__name__, detail="Redis away: limited per replica"
                )
            return await self._local.acquire()
        until = self._until(wait_ms)
        if self._local_since_failure:
            self._local_since_failure = False
            log.info("rate_limit_shared_again")
        if wait_ms > 0:
            self._waited.inc()
            try:
                await asyncio.sleep(wait_ms / 1000)
            except asyncio.CancelledError:
                # Kept in Redis, the slots of cancelled callers held back every replica, and the
                # next owner of the partitions, for as long as they reached ahead.
                await self.give_back(until)
                raise
        return until

    def _until(self, wait_ms: int) -> float:
        """Until when a slot reserved ``wait_ms`` ahead counts, on this process' clock (Redis' own
        may differ)."""
        return time.monotonic() + (wait_ms + self._tolerance_ms + self._interval_ms) / 1000

    async def _give_back_reservation(self, reservation: asyncio.Future[Any]) -> None:
        """A caller cancelled while Redis ran its reservation: Redis keeps the slot all the same,
        and the slots of callers cancelled together (a rebalance while Redis was slow) held every
        replica back for as long as they reached ahead. Once it has run, it is given back."""
        try:
            async with asyncio.timeout(_GIVE_BACK_TIMEOUT_S):
                wait_ms = int(await reservation)
        except (redis_errors.RedisError, OSError, TimeoutError):
            return  # not reserved, or not known in time: at worst later calls wait for it
        await self._give_back_shared(self._until(wait_ms))

    async def give_back(self, until: float) -> None:
        """Best effort, bounded: a slot Redis does not take back only delays later calls."""
        if self._local_since_failure:  # the slot was the local bucket's
            await self._local.give_back(until)
            return
        await self._give_back_shared(until)

    async def _give_back_shared(self, until: float) -> None:
        if until <= time.monotonic():
            return
        with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_GIVE_BACK_TIMEOUT_S):
                await self._give_back_script(keys=[self._key], args=[self._interval_ms])

    async def close(self) -> None:
        await self._client.aclose()


class AdaptiveConcurrency:
    """AIMD limit on concurrent API calls: halve on 429, creep back up on success."""

    def __init__(self, maximum: int, metrics: Metrics) -> None:
        self._max = float(maximum)
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_halved = 0.0
        self._metrics = metrics
        self._waited = metrics.rate_limited.labels(limit="concurrency")  # looked up once: per call
        self._set_limit(self._max)

    @property
    def limit(self) -> int:
        return self._slots

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot now."""
        return len(self._waiters)

    def _set_limit(self, limit: float) -> None:
        self._limit = limit
        self._slots = max(1, int(limit))  # as whole slots, asked for on every call
        self._metrics.api_concurrency_limit.set(limit)

    def release(self) -> None:
        self._in_use -= 1
        self._wake()

    async def acquire(self) -> None:
        """Take a slot; pair with ``release()`` in a ``finally`` (no context manager: its cost
        was measurable on the hot path)."""
        if self._in_use < self._slots and not self._waiters:
            self._in_use += 1
            return
        self._waited.inc()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot is counted for us by _wake
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._in_use -= 1  # woken and cancelled at once: give the slot back
                self._wake()
            elif waiter in self._waiters:  # _wake may have dropped it already, being cancelled
                self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._slots:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use += 1
                waiter.set_result(None)

    def throttled(self) -> None:
        now = time.monotonic()
        if now - self._last_halved < _HALVE_AT_MOST_EVERY_S:
            return
        self._last_halved = now
        self._set_limit(max(1.0, self._limit / 2))
        log.warning("api_throttled_slowing_down", concurrency_limit=self.limit)

    def succeeded(self) -> None:
        if self._limit < self._max:
            self._set_limit(min(self._max, self._limit + 1.0 / self._limit))
            self._wake()


def build_rate_limit(settings: WorkerSettings, metrics: Metrics) -> RateLimit | None:
    """One limit for the whole consumer group when its pods share a Redis (the dedup store's), else
    this process's own. Deployments that share one Redis, told apart by the URL's ``?prefix=``,
    keep apart buckets even with the same group id (staging and production, say)."""
    rate = settings.api_rate_limit_per_s
    if rate is None:
        return None
    burst = max(1, int(rate))
    if is_redis_url(settings.dedup_url):
        prefix = key_prefix(settings.dedup_url)
        # The default prefix keeps the key of earlier releases (pods of a rolling update share it).
        # Under another prefix the key is in the dedup store's key space, where "@" keeps it apart
        # from every event_id ("ratelimit:<group>" is a valid one, and its claim met this key).
        key = (
            f"coc:ratelimit:{settings.group_id}"
            if prefix == DEFAULT_PREFIX
            else f"{prefix}@ratelimit:{settings.group_id}"
        )
        return RedisTokenBucket(dedup_target(settings), key, rate, burst, metrics)
    return TokenBucket(rate, burst, metrics)
