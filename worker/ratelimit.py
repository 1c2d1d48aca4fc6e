"""Client-side rate limit on API calls, so a large backlog never floods the API.

A token bucket in its GCRA form (one "theoretical arrival time" instead of a token count): each
call reserves the next slot and waits for it. ``COC_WORKER_API_RATE_LIMIT_PER_S`` unset means no
limit.
"""

from __future__ import annotations

import asyncio
import time

from worker.metrics import Metrics
from worker.settings import WorkerSettings


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, metrics: Metrics) -> None:
        self._interval_s = 1.0 / rate_per_s
        self._tolerance_s = (max(1, burst) - 1) * self._interval_s
        self._tat = 0.0
        self._metrics = metrics

    async def acquire(self) -> None:
        now = time.monotonic()
        tat = max(self._tat, now)
        wait_s = tat - self._tolerance_s - now
        self._tat = tat + self._interval_s
        if wait_s > 0:
            self._metrics.rate_limited.inc()
            await asyncio.sleep(wait_s)


def build_throttle(settings: WorkerSettings, metrics: Metrics) -> TokenBucket | None:
    rate = settings.api_rate_limit_per_s
    if rate is None:
        return None
    return TokenBucket(rate, burst=max(1, int(rate)), metrics=metrics)
