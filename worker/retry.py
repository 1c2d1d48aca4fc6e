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

import random
from collections.abc import Callable
from dataclasses import dataclass

from worker.errors import ApiTransientError
from worker.settings import WorkerSettings


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
