"""Cancelling the worker's own tasks ends them, also when a cancellation is lost on the way."""

from __future__ import annotations

import asyncio
import sys

import pytest

from worker.cancel import cancel_and_wait


def _probe_loop(current: list[asyncio.Future[None]], rounds: list[int]) -> asyncio.Task[None]:
    """A task shaped like the health probe: a loop around ``wait_for`` on a reply."""

    async def loop() -> None:
        while True:
            current[0] = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(current[0], 10.0)
            rounds[0] += 1

    return asyncio.create_task(loop())


async def _reply(current: list[asyncio.Future[None]]) -> None:
    """The reply, in the loop step the caller cancels in (the task is waiting for it)."""
    await asyncio.sleep(0)
    current[0].set_result(None)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12's wait_for keeps the cancellation")
async def test_on_this_python_one_cancel_can_be_lost_by_wait_for() -> None:
    """Why ``cancel_and_wait`` asks again: the lost cancellation, reproduced."""
    current: list[asyncio.Future[None]] = [asyncio.get_running_loop().create_future()]
    rounds = [0]
    task = _probe_loop(current, rounds)
    await _reply(current)
    task.cancel()  # in the same loop step as the reply
    for _ in range(5):  # loop steps, not wall time: the task runs once per step
        await asyncio.sleep(0)
    assert not task.done()  # still looping: the cancellation was swallowed
    assert rounds[0] == 1
    assert not current[0].done()  # and waiting for its next reply
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_task_whose_cancellation_is_lost_still_ends() -> None:
    current: list[asyncio.Future[None]] = [asyncio.get_running_loop().create_future()]
    rounds = [0]
    task = _probe_loop(current, rounds)
    await _reply(current)
    await asyncio.wait_for(cancel_and_wait([task], again_after_s=0.05), 5.0)  # cancels in this step
    assert task.cancelled()


async def test_ended_and_failed_tasks_are_waited_for_and_their_errors_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def sleeps() -> None:
        await asyncio.sleep(60)

    failed, sleeping = asyncio.create_task(fails()), asyncio.create_task(sleeps())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([failed, sleeping]), 5.0)
    assert isinstance(failed.exception(), RuntimeError)
    assert sleeping.cancelled()
    await cancel_and_wait([])  # nothing to do
