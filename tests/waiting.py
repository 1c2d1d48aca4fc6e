"""Waiting on a condition in a test: poll it with a deadline, never sleep a guessed time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 3.0,
    every_s: float = 0.002,
    *,
    what: str = "the condition",
) -> None:
    """Wait for a condition nothing signals (gate state, metrics, counters, a broker's committed
    offsets), polling with a deadline. The predicate may be a coroutine function; ``every_s`` spaces
    out polls that are requests of their own; ``what`` names the condition in the failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        met = predicate()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if loop.time() >= deadline:  # not an assert: the wait must end under python -O too
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(every_s)
