"""Waiting on a condition in a test: poll it with a deadline, never sleep a guessed time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Wait for a condition nothing signals (gate state, metrics, counters), polling with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(0.002)
