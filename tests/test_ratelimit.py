"""Flow control in front of the API: token bucket (local and shared in Redis) and AIMD concurrency."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
import structlog
from services import OwnRedis
from waiting import until

from worker.metrics import Metrics
from worker.ratelimit import AdaptiveConcurrency, RedisTokenBucket, TokenBucket, build_rate_limit
from worker.settings import load_settings


async def _rate(bucket: TokenBucket | RedisTokenBucket, calls: int) -> float:
    started = time.monotonic()
    await asyncio.gather(*(bucket.acquire() for _ in range(calls)))
    return calls / (time.monotonic() - started)


async def test_token_bucket_caps_the_rate() -> None:
    metrics = Metrics()
    bucket = TokenBucket(rate_per_s=50, burst=5, metrics=metrics)
    started = time.monotonic()
    await asyncio.gather(*(bucket.acquire() for _ in range(30)))
    elapsed = time.monotonic() - started
    # 5 pass at once (burst), the other 25 are spaced 20 ms apart
    assert elapsed >= 25 * 0.02 * 0.95
    assert metrics.rate_limited.labels(limit="rate")._value.get() >= 25


async def test_redis_bucket_is_shared_between_replicas(redis_url: str) -> None:
    base = redis_url.split("?", 1)[0]
    key = f"{redis_url.rsplit('prefix=', 1)[-1]}ratelimit"
    one = RedisTokenBucket(base, key, rate_per_s=40, burst=1, metrics=Metrics())
    two = RedisTokenBucket(base, key, rate_per_s=40, burst=1, metrics=Metrics())
    try:
        started = time.monotonic()
        await asyncio.gather(*(b.acquire() for b in (one, two) for _ in range(10)))
        elapsed = time.monotonic() - started
    finally:
        await one.close()
        await two.close()
    # 20 calls between the two replicas at 40/s together take ~0.5 s, not ~0.25 s
    assert elapsed >= 19 / 40 * 0.9


async def test_redis_bucket_survives_the_redis_clock_stepping_back(redis_url: str) -> None:
    """The schedule is an absolute time on Redis' clock. After that clock steps back 60 s (the state
    written as it is then: the schedule and the clock last seen both 60 s ahead of TIME), a call
    must not wait out the step: every replica would make no API call for a minute."""
    base = redis_url.split("?", 1)[0]
    key = f"{redis_url.rsplit('prefix=', 1)[-1]}ratelimit"
    bucket = RedisTokenBucket(base, key, rate_per_s=10, burst=1, metrics=Metrics())
    client = aioredis.from_url(base)
    try:
        seconds, micros = await client.time()
        ahead = str(seconds * 1000 + micros // 1000 + 60_000)
        await client.set(key, ahead, px=120_000)
        await client.set(f"{key}:clock", ahead, px=120_000)
        await asyncio.wait_for(bucket.acquire(), 5)
    finally:
        await client.delete(key, f"{key}:clock")
        await client.aclose()
        await bucket.close()


async def test_redis_bucket_falls_back_to_local_when_redis_is_away() -> None:
    """And says so, once: each replica then allows the whole rate (before, nothing was logged)."""
    bucket = RedisTokenBucket("redis://127.0.0.1:1/0", "k", rate_per_s=1000, burst=10, metrics=Metrics())
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(bucket.acquire(), 5)
            await asyncio.wait_for(bucket.acquire(), 5)
    finally:
        await bucket.close()
    assert [entry["event"] for entry in logs] == ["rate_limit_local"]


async def _cancel_sleepers(bucket: TokenBucket | RedisTokenBucket, metrics: Metrics, count: int) -> None:
    """``count`` callers that reserved a slot and sleep until it, cancelled (as a rebalance does)."""
    sleepers = [asyncio.create_task(bucket.acquire()) for _ in range(count)]
    await until(
        lambda: metrics.rate_limited.labels(limit="rate")._value.get() >= count - 1,
        what="every caller asleep on its slot",
    )
    for task in sleepers:
        task.cancel()
    await asyncio.gather(*sleepers, return_exceptions=True)


async def test_cancelled_callers_give_their_slots_back() -> None:
    """50 callers at 10/s reserved 5 s of slots; cancelled, they kept them, and the next call
    waited ~5 s for slots no call would use."""
    metrics = Metrics()
    bucket = TokenBucket(rate_per_s=10, burst=1, metrics=metrics)
    await _cancel_sleepers(bucket, metrics, 50)
    await asyncio.wait_for(bucket.acquire(), 1.0)


async def test_cancelled_callers_give_their_slots_back_in_redis(redis_url: str) -> None:
    """The same for the shared bucket, whose schedule outlives the process: the next owner of the
    partitions waited out the slots of another replica's cancelled calls."""
    base = redis_url.split("?", 1)[0]
    key = f"{redis_url.rsplit('prefix=', 1)[-1]}ratelimit-give-back"
    metrics = Metrics()
    one = RedisTokenBucket(base, key, rate_per_s=10, burst=1, metrics=metrics)
    two = RedisTokenBucket(base, key, rate_per_s=10, burst=1, metrics=Metrics())
    try:
        await _cancel_sleepers(one, metrics, 50)
        await asyncio.wait_for(two.acquire(), 1.0)
    finally:
        await one.close()
        await two.close()


async def test_callers_cancelled_while_redis_runs_their_reservation_give_their_slots_back(
    redis_url: str,
) -> None:
    """Redis slow to answer (busy, a failover) when a rebalance cancels the callers: each
    reservation still ran in Redis, none was given back, and every replica waited for slots no
    call would use (30 callers at 10/s: 3 s)."""
    base = redis_url.split("?", 1)[0]
    key = f"{redis_url.rsplit('prefix=', 1)[-1]}ratelimit-cancelled-reserving"
    one = RedisTokenBucket(base, key, rate_per_s=10, burst=1, metrics=Metrics())
    two = RedisTokenBucket(base, key, rate_per_s=10, burst=1, metrics=Metrics())
    reserve, answer, reserved = one._script, asyncio.Event(), []

    async def slow_to_answer(**kwargs: object) -> object:
        result = await reserve(**kwargs)  # reserved in Redis
        reserved.append(result)
        await answer.wait()  # its answer slow to arrive
        return result

    one._script = slow_to_answer  # type: ignore[assignment]
    try:
        callers = [asyncio.create_task(one.acquire()) for _ in range(30)]
        await until(lambda: len(reserved) == 30, what="every reservation made in Redis")
        for task in callers:
            task.cancel()
        answer.set()
        await asyncio.gather(*callers, return_exceptions=True)
        await asyncio.wait_for(two.acquire(), 1.0)
    finally:
        await one.close()
        await two.close()


def test_backend_follows_the_dedup_store(redis_url: str) -> None:
    assert build_rate_limit(load_settings(), Metrics()) is None
    assert isinstance(build_rate_limit(load_settings(api_rate_limit_per_s=5), Metrics()), TokenBucket)
    shared = build_rate_limit(load_settings(api_rate_limit_per_s=5, dedup_url=redis_url), Metrics())
    assert isinstance(shared, RedisTokenBucket)
    asyncio.run(shared.close())


def test_deployments_told_apart_by_the_redis_prefix_keep_apart_buckets(redis_url: str) -> None:
    """Staging and production on one Redis with the default group id: one bucket each."""
    base = redis_url.split("?", 1)[0]  # no prefix: the default keys (only built here, never used)
    buckets = [
        build_rate_limit(load_settings(api_rate_limit_per_s=5, dedup_url=url), Metrics())
        for url in (base, f"{base}?prefix=staging:", f"{base}?prefix=prod:")
    ]
    assert all(isinstance(b, RedisTokenBucket) for b in buckets)
    keys = [b._key for b in buckets if isinstance(b, RedisTokenBucket)]
    assert keys[0] == "coc:ratelimit:coc-change-worker"  # as before for the default prefix
    # in the dedup store's key space, apart from every event_id by "@" (the claim of an event
    # "ratelimit:coc-change-worker" met the bucket's key)
    assert keys[1:] == ["staging:@ratelimit:coc-change-worker", "prod:@ratelimit:coc-change-worker"]
    # the prefix the store uses: the default spelled out is the default, the last of two wins
    for url, key in [
        (f"{base}?prefix=coc:dedup:", "coc:ratelimit:coc-change-worker"),
        (f"{base}?prefix=a:&prefix=b:", "b:@ratelimit:coc-change-worker"),
    ]:
        bucket = build_rate_limit(load_settings(api_rate_limit_per_s=5, dedup_url=url), Metrics())
        assert isinstance(bucket, RedisTokenBucket)
        assert bucket._key == key
        asyncio.run(bucket.close())
    for bucket in buckets:
        assert bucket is not None
        asyncio.run(bucket.close())


async def test_the_shared_bucket_logs_in_with_the_redis_password_setting(own_redis: OwnRedis) -> None:
    """The bucket shares the dedup store's Redis, so its password too: without it, a Redis that
    wants one refused every reservation, and each replica limited alone to the whole rate."""
    password = own_redis.require_password()
    settings = load_settings(api_rate_limit_per_s=5, dedup_url=own_redis.url, dedup_redis_password=password)
    bucket = build_rate_limit(settings, Metrics())
    assert isinstance(bucket, RedisTokenBucket)
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(bucket.acquire(), 5)
        assert logs == []  # no "rate_limit_local": the reservation was Redis'
        async with aioredis.Redis(port=own_redis.port, password=password) as admin:
            assert await admin.exists(bucket._key) == 1
    finally:
        await bucket.close()


async def test_concurrency_limit_bounds_calls_in_flight() -> None:
    limit = AdaptiveConcurrency(3, Metrics())
    running = peak = 0
    release = asyncio.Event()

    async def call() -> None:
        nonlocal running, peak
        await limit.acquire()
        try:
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
        finally:
            limit.release()

    tasks = [asyncio.create_task(call()) for _ in range(10)]
    await until(lambda: running == 3)
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 3  # all ten were started before the release: a broken limit lets more in


async def test_429_halves_and_success_recovers() -> None:
    metrics = Metrics()
    limit = AdaptiveConcurrency(64, metrics)
    limit.throttled()
    assert limit.limit == 32
    limit.throttled()  # twice within a second counts once
    assert limit.limit == 32
    for _ in range(200):
        limit.succeeded()
    assert 32 < limit.limit <= 64
    assert metrics.api_concurrency_limit._value.get() == pytest.approx(limit._limit)


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    metrics = Metrics()
    limit = AdaptiveConcurrency(1, metrics)
    hold, held = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        await limit.acquire()
        try:
            held.set()
            await hold.wait()
        finally:
            limit.release()

    first = asyncio.create_task(holder())
    await asyncio.wait_for(held.wait(), 1)
    waiter = asyncio.create_task(holder())
    waits = "coc_worker_rate_limit_waits_total"
    await until(lambda: metrics.registry.get_sample_value(waits, {"limit": "concurrency"}) == 1)  # queued
    waiter.cancel()
    hold.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(limit.acquire(), 1)  # the slot is free again
    limit.release()


async def test_a_holder_and_its_waiter_cancelled_together_are_both_cancelled() -> None:
    """As a revocation past its grace cancels a partition's running jobs: the holder's release
    wakes the queue, which drops the cancelled waiter; the waiter must still end cancelled (a
    ValueError there became a ``failed`` outcome and a committed offset)."""
    limit = AdaptiveConcurrency(1, Metrics())
    hold = asyncio.Event()

    async def job() -> None:
        await limit.acquire()
        try:
            await hold.wait()  # the HTTP call
        finally:
            limit.release()

    first = asyncio.create_task(job())
    await until(lambda: limit._in_use == 1)
    second = asyncio.create_task(job())
    await until(lambda: len(limit._waiters) == 1)
    first.cancel()
    second.cancel()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert [type(r) for r in results] == [asyncio.CancelledError, asyncio.CancelledError]
    await asyncio.wait_for(limit.acquire(), 1)  # and no slot leaked
    limit.release()


async def test_the_shared_bucket_leaves_a_redis_demoted_by_a_failover(own_redis: OwnRedis) -> None:
    """On READONLY the bucket limits locally, as when Redis is away, and drops its pooled
    connections, which would otherwise reach the demoted node for ever (per-replica limits for
    good); new ones find the new primary."""
    bucket = RedisTokenBucket(own_redis.url, "k", rate_per_s=100, burst=1, metrics=Metrics())
    try:
        await bucket.acquire()
        before = await own_redis.connections()
        assert before
        await own_redis.demote()
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(bucket.acquire(), 5)
        assert [entry["event"] for entry in logs] == ["rate_limit_local"]
        assert not before & await own_redis.connections()
    finally:
        await own_redis.promote()
        await bucket.close()


async def test_a_slot_whose_time_has_passed_is_not_given_back() -> None:
    """A job that waited at the concurrency limit past its slot's time, then was cancelled: the
    slot was made up by time already, and giving it back let an extra call through."""
    metrics = Metrics()
    bucket = TokenBucket(rate_per_s=4, burst=2, metrics=metrics)
    old = [await bucket.acquire() for _ in range(2)]  # a full burst; its slots count for 0.5 s
    await until(lambda: time.monotonic() > max(old), what="the first burst's slots to pass")
    for _ in range(2):  # a new burst fills the bucket again
        await bucket.acquire()
    for slot in old:  # the first burst's jobs never sent (cancelled late)
        await bucket.give_back(slot)
    waits = metrics.rate_limited.labels(limit="rate")._value.get()
    await asyncio.wait_for(bucket.acquire(), 1.0)
    assert (
        metrics.rate_limited.labels(limit="rate")._value.get() == waits + 1
    )  # the fifth call in 0.5 s at 4/s waits
