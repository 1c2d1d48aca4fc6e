"""Cancel the worker's own background tasks and wait until they have ended.

One ``task.cancel()`` is not always enough on Python 3.11: ``asyncio.wait_for`` returns the inner
result when it arrives in the same loop step as the cancellation, and the cancellation is lost
(fixed in 3.12). A task that loops around such a call (the health probe, the committer, the gate's
probes, the ingest's broker check) then goes on for ever, and a shutdown waiting for it never
ends: seen once in the test suite, a stop that hung until the test's timeout. So the tasks are
asked again until they are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

from worker.logs import get_logger, redact_cut

T = TypeVar("T")
log = get_logger(__name__)

#: Each broker step of a shutdown (final commit, leaving the group, a producer's stop): aiokafka
#: waits for a broker that is gone until its own timeouts (30-40 s), past a pod's grace.
SHUTDOWN_STEP_S = 5.0

#: How long a cancelled task is given before it is cancelled again.
CANCEL_AGAIN_S = 0.5


async def cancel_and_wait(
    tasks: Collection[asyncio.Task[Any]], again_after_s: float = CANCEL_AGAIN_S
) -> None:
    """Cancel ``tasks`` until every one has ended; their exceptions are retrieved, not raised."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=again_after_s)
    await asyncio.gather(*tasks, return_exceptions=True)


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> asyncio.Future[T] | None:
    """``work``, finished; or None, ``work`` cancelled (not waited for), when ``stop`` came first.
    A stop must begin at once, whatever a step of a start or a fetch is waiting for."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
    return task if task.done() and not task.cancelled() else None


async def bounded_step(step: Awaitable[None], name: str) -> None:
    """One step of a shutdown, given at most ``SHUTDOWN_STEP_S``; a failure is logged, not raised."""
    try:
        await asyncio.wait_for(step, SHUTDOWN_STEP_S)
    except TimeoutError:
        log.warning("shutdown_step_timed_out", step=name, timeout_s=SHUTDOWN_STEP_S)
    except Exception as exc:  # the rest of the shutdown must still run
        log.warning(
            "shutdown_step_failed", step=name, error=type(exc).__name__, detail=redact_cut(str(exc), 300)
        )
