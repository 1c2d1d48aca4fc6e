"""The systemic-failure gate: pause everything while the worker (not a message) is unhealthy.

When a stage meets a ``SystemicError`` (credentials refused, API unreachable, dedup store or broker
away) it trips the gate with a *probe*: a cheap call that succeeds once the cause is gone. While
any cause is open the consumer stops fetching, ``/readyz`` says not ready, and jobs wait at the
gate instead of failing. One prober task per cause retries its probe with capped exponential
backoff; when every cause has cleared, the gate opens and the waiting jobs retry.

A probe can pass while the work still fails (metadata answers but writes to a topic are refused; a
full Redis answers PING but refuses writes). Such a cause is back the moment the gate opens: it
then goes on from the backoff it had reached instead of starting over, so the worker waits longer
and longer (up to the cap) instead of flapping several times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worker.cancel import cancel_and_wait
from worker.errors import CocWorkerError, SystemicError
from worker.logs import get_logger, redact_cut
from worker.metrics import Metrics
from worker.retry import backoff_delay, half_to_full

log = get_logger(__name__)

#: A call that succeeds once the cause is gone; what it returns is not looked at.
Probe = Callable[[], Awaitable[object]]


@dataclass(slots=True)
class _Cause:
    error: SystemicError
    task: asyncio.Task[None]
    probe: Probe
    #: Set to end the prober's backoff wait early (``probe_now``).
    wake: asyncio.Event
    #: Back within ``flap_window_s`` of clearing: its probe passes while the work fails (metadata
    #: answers, the topic's writes are refused), so only its backoff spaces the flaps out.
    flapping: bool = False


class Gate:
    """The pause every stage waits at while the worker as a whole cannot progress: one cause per
    kind, each with a prober that clears it; open again only when every cause has cleared."""

    def __init__(
        self,
        metrics: Metrics,
        probe_base_s: float = 0.25,
        probe_max_s: float = 30.0,
        flap_window_s: float = 1.0,
    ) -> None:
        self._metrics = metrics
        self._probe_base_s = probe_base_s
        self._probe_max_s = probe_max_s
        self._flap_window_s = flap_window_s
        self._causes: dict[str, _Cause] = {}
        #: kind -> (probes its last pause took, when it cleared): a cause back within the window
        #: goes on from there
        self._cleared: dict[str, tuple[int, float]] = {}
        self._open = asyncio.Event()
        self._open.set()
        #: Callers of ``wait_open`` waiting now.
        self._waiting = 0

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @property
    def causes(self) -> list[str]:
        return sorted(self._causes)

    @property
    def waiting(self) -> int:
        """How many callers wait for the gate to open: a stop compares it with the jobs running."""
        return self._waiting

    def trip(self, error: SystemicError, probe: Probe) -> None:
        """Close the gate for ``error.kind`` (idempotent while that cause is already open)."""
        if error.kind in self._causes:
            return
        log.warning("worker_paused", cause=error.kind, detail=str(error))
        self._metrics.pauses.labels(kind=error.kind).inc()
        self._metrics.paused.set(1)
        self._open.clear()
        attempts, cleared_at = self._cleared.pop(error.kind, (0, float("-inf")))
        if asyncio.get_running_loop().time() - cleared_at > self._flap_window_s:
            attempts = 0
        wake = asyncio.Event()
        # Its own context: the probe's lines are about the outage, not the job that hit it first.
        task = asyncio.create_task(
            self._probe(error.kind, probe, attempts, wake),
            name=f"probe-{error.kind}",
            context=contextvars.Context(),
        )
        self._causes[error.kind] = _Cause(error, task, probe, wake, flapping=attempts > 0)

    def probe_now(self, kind: str, probe: Probe) -> None:
        """Probe ``kind`` at once instead of after its backoff, when it is paused on ``probe``
        and the caller has just seen that probe pass (the broker answered the health check). A
        cause paused on another probe keeps its backoff: one whose probe passes while the work
        fails (metadata answers, the topic's writes are refused) was woken every health check and
        flapped on a fixed 2 s cycle."""
        cause = self._causes.get(kind)
        if cause is not None and cause.probe == probe:
            cause.wake.set()

    def probe_every_cause_now(self) -> None:
        """Probe every cause at once, whatever its backoff: a stop is about to cancel the jobs this
        pause holds, and an outage that ended during a long backoff (up to ``probe_max_s``) would
        have cost them all the same. A probe already running is followed by another at once. Not
        a flapping cause: woken each turn of the stop's wait, it reopened the gate onto work that
        failed again, every job retried ~10 times, and the wait began afresh until the grace ran out."""
        for cause in self._causes.values():
            if not cause.flapping:
                cause.wake.set()

    async def wait_open(self) -> float:
        """Wait until no cause is open; returns the seconds spent waiting."""
        if self._open.is_set():
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._waiting += 1
        try:
            await self._open.wait()
        finally:
            self._waiting -= 1
        return loop.time() - started

    async def _probe(self, kind: str, probe: Probe, attempt: int, wake: asyncio.Event) -> None:
        while True:
            attempt += 1
            delay = backoff_delay(attempt, self._probe_base_s, self._probe_max_s, half_to_full)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            wake.clear()
            try:
                await probe()
            except CocWorkerError as exc:
                log.info("probe_failed", cause=kind, attempt=attempt, detail=str(exc))
                continue
            except Exception as exc:  # a probe must never kill its prober: log, classify, retry
                # Its cause, and its traceback the first time: a bug to find, not an outage to wait out.
                log.error(
                    "probe_crashed",
                    cause=kind,
                    attempt=attempt,
                    error=type(exc).__name__,
                    detail=redact_cut(str(exc), 300),
                    exc_info=attempt == 1,
                )
                continue
            break
        self._causes.pop(kind, None)
        self._cleared[kind] = (attempt, asyncio.get_running_loop().time())
        log.info("worker_resumed", cause=kind, probes=attempt)
        if not self._causes:
            self._metrics.paused.set(0)
            self._open.set()

    async def close(self) -> None:
        await cancel_and_wait([c.task for c in self._causes.values()])
        self._causes.clear()
        self._metrics.paused.set(0)
        self._open.set()  # nothing is probing any more: let waiters through to see the shutdown
