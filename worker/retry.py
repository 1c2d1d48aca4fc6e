"""The one retry policy: which failures retry, how long to wait, and when to give up.

* ``ApiTransientError`` retries with exponential backoff and *full jitter* (a uniform draw in
  ``[0, min(cap, base * 2**(attempt-1))]``), never shorter than the server's ``Retry-After``
  (capped), bounded by ``max_attempts`` *and* ``max_elapsed_s``.
* ``ApiRejected`` and ``InvalidEvent`` never retry.
* ``SystemicError`` is not the message's fault: it pauses the worker (see ``worker.gate``) and
  does not consume the message's budget.

``backoff_delay`` and ``RetryPolicy.next_delay`` are pure (the random draw is injected), so the
bounds are tested directly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from worker.errors import ApiTransientError, BrokerUnavailable, DedupUnavailable
from worker.logs import get_logger
from worker.settings import WorkerSettings, env_var

log = get_logger(__name__)
T = TypeVar("T")

_STARTUP_RETRY_MAX_S = 15.0  # the longest wait between a start's tries of the broker or dedup store
_STARTUP_LAST_TRY_S = 5.0  # a try of the broker or dedup store gets at least this long


def backoff_delay(
    attempt: int, base_s: float, cap_s: float, draw: Callable[[], float] = random.random
) -> float:
    """Full-jitter exponential backoff for the wait *after* attempt number ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    ceiling = min(cap_s, base_s * (2.0 ** min(attempt - 1, 62)))
    return ceiling * draw()


def half_to_full() -> float:
    """Jitter in [0.5, 1) for ``backoff_delay``: waits that back off steadily, yet apart, instead
    of firing at once (a probe) or in lockstep with other workers' (a poll)."""
    return 0.5 + random.random() / 2


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 20
    max_elapsed_s: float = 120.0
    base_delay_s: float = 0.2
    max_delay_s: float = 20.0
    retry_after_max_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> RetryPolicy:
        return cls(
            max_attempts=settings.retry_max_attempts,
            max_elapsed_s=settings.retry_max_elapsed_s,
            base_delay_s=settings.retry_base_delay_s,
            max_delay_s=settings.retry_max_delay_s,
            retry_after_max_s=settings.retry_after_max_s,
        )

    def next_delay(
        self,
        attempt: int,
        elapsed_s: float,
        error: ApiTransientError,
        draw: Callable[[], float] = random.random,
        *,
        limit_attempts: bool = True,
        at_least_s: float = 0.0,
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` when the budget is spent.

        ``attempt`` is the number of attempts made so far, ``elapsed_s`` the time spent on them
        (time paused for systemic failures excluded). ``limit_attempts=False`` bounds the retries
        by time only: for reads that change nothing (settling a lost answer). ``at_least_s`` is a
        floor the caller's own reason sets (a timed-out request left to settle): like a
        ``Retry-After``, the wait must fit the budget with it.
        """
        if limit_attempts and attempt >= self.max_attempts:
            return None
        delay = max(backoff_delay(attempt, self.base_delay_s, self.max_delay_s, draw), at_least_s)
        if error.retry_after_s is not None:
            delay = max(delay, min(error.retry_after_s, self.retry_after_max_s))
        if elapsed_s + delay > self.max_elapsed_s:
            return None
        return delay


class StartupWait:
    """A start's steps that need the broker or the dedup store (the worker's, and the standalone
    ingress's), each tried again with backoff while they do not answer, for up to
    ``startup_wait_s`` from ``begin`` in all; then its error ends the start (exit 1). Exiting at
    once left a process started during an outage to the kubelet's growing back-off: it came back up
    to 5 minutes after the broker did. Meanwhile ``/healthz`` answers and ``/readyz`` says what it
    waits for (``waiting_for``)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._began = 0.0
        self.waiting_for: str | None = None  # "broker" or "dedup_store" while a step is retried

    def begin(self) -> None:
        self._began = asyncio.get_running_loop().time()

    async def once_reachable(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        wait_s = self._settings.startup_wait_s
        deadline = self._began + wait_s
        attempt = 0
        while True:
            # Each try bounded by what is left of the wait: a broker that takes connections and
            # never answers holds one try 40 s per bootstrap server.
            bound = asyncio.timeout(max(deadline - loop.time(), _STARTUP_LAST_TRY_S) if wait_s else None)
            try:
                async with bound:
                    result = await step()
            except TimeoutError:
                if not bound.expired():
                    raise
                raise self._not_reached(what) from None
            except (BrokerUnavailable, DedupUnavailable) as exc:
                left = deadline - loop.time()
                if left <= 0:
                    raise
                attempt += 1
                delay = min(left, backoff_delay(attempt, 0.5, _STARTUP_RETRY_MAX_S, half_to_full))
                self.waiting_for = what
                log.warning(
                    "waiting_for_dependency",
                    dependency=what,
                    detail=str(exc),
                    retry_in_s=round(delay, 1),
                    gives_up_in_s=round(left, 1),
                    setting=env_var("startup_wait_s"),
                )
                await asyncio.sleep(delay)
                continue
            if attempt:
                log.info("dependency_reached", dependency=what, attempts=attempt + 1)
            self.waiting_for = None
            return result

    def _not_reached(self, what: str) -> BrokerUnavailable | DedupUnavailable:
        """The error a start ends with when a try of ``what`` outlasted the startup wait."""
        s = self._settings
        waited = f"no answer within {env_var('startup_wait_s')}={s.startup_wait_s:g} s"
        if what == "broker":
            return BrokerUnavailable(
                f"the broker: {waited} ({env_var('kafka_bootstrap_servers')}={s.kafka_bootstrap_servers})"
            )
        return DedupUnavailable(f"the dedup store: {waited} ({env_var('dedup_url')}={s.dedup_url_shown})")
