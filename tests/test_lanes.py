"""Jobs of one ticket run one at a time in order; different tickets run concurrently."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from waiting import until

import worker.lanes as lanes_module
import worker.pipeline as pipeline_module
import worker.ratelimit as ratelimit_module
from worker.lanes import Lanes
from worker.settings import REVOKE_CANCEL_WAIT_S


async def test_same_key_in_order_different_keys_concurrently() -> None:
    started: list[str] = []
    release: dict[str, asyncio.Event] = {}
    left: list[tuple[str, bool]] = []

    async def run(job: str) -> None:
        started.append(job)
        release.setdefault(job, asyncio.Event())
        await release[job].wait()

    lanes: Lanes[str] = Lanes(run, lambda job, ok: left.append((job, ok)))
    for job in ("a1", "a2", "b1", "a3"):
        release[job] = asyncio.Event()
        lanes.submit(job[0], job)
    await until(lambda: len(started) == 2)
    assert started == ["a1", "b1"]  # a2 waits behind a1; b1 runs beside it
    assert len(lanes) == 4
    release["a1"].set()
    await until(lambda: "a2" in started)
    assert started == ["a1", "b1", "a2"]
    release["a2"].set()
    release["a3"].set()
    release["b1"].set()
    assert await lanes.wait_idle(2)
    assert [j for j, _ in left if j.startswith("a")] == ["a1", "a2", "a3"]
    assert all(ok for _, ok in left)


async def test_keyless_jobs_run_at_once() -> None:
    gate = asyncio.Event()
    running = 0

    async def run(_: int) -> None:
        nonlocal running
        running += 1
        await gate.wait()

    lanes: Lanes[int] = Lanes(run, lambda *_: None)
    for i in range(5):
        lanes.submit(None, i)
    await until(lambda: running == 5)
    gate.set()
    assert await lanes.wait_idle(2)


async def test_a_job_that_raised_halts_its_lane_and_no_other() -> None:
    """A job that raised (a bug: the worker stops, and a fresh process reads it again) let its
    key's later jobs run, and those were applied ahead of it, against the key's order. They are
    dropped now, those waiting and those submitted later; other keys go on."""
    left: list[tuple[str, bool]] = []
    ran: list[str] = []

    async def run(job: str) -> None:
        ran.append(job)
        if job == "k-bad":
            raise RuntimeError("boom")

    crashed: list[str] = []
    lanes: Lanes[str] = Lanes(
        run, lambda job, ok: left.append((job, ok)), on_crash=lambda job, _: crashed.append(job)
    )
    lanes.submit("k", "k-bad")
    lanes.submit("k", "k-next")
    lanes.submit("j", "j-1")
    assert await lanes.wait_idle(2)
    lanes.submit("k", "k-later")
    lanes.submit("j", "j-2")
    assert await lanes.wait_idle(2)
    assert crashed == ["k-bad"]
    assert ran == ["k-bad", "j-1", "j-2"]
    assert sorted(left) == sorted(
        [("k-bad", False), ("k-next", False), ("j-1", True), ("k-later", False), ("j-2", True)]
    )
    assert len(lanes) == 0


async def test_drop_cancels_matching_and_keeps_others() -> None:
    forever = asyncio.Event()
    left: list[tuple[str, bool]] = []

    async def run(job: str) -> None:
        if job.startswith("x"):
            await forever.wait()

    lanes: Lanes[str] = Lanes(run, lambda job, ok: left.append((job, ok)))
    lanes.submit("t", "x1")
    lanes.submit("t", "x2")
    lanes.submit("t", "y1")  # another partition's job behind x1 in the same lane
    assert not await lanes.wait_for(lambda j: j.startswith("x"), 0.05)
    lanes.drop(lambda j: j.startswith("x"))
    assert await lanes.wait_idle(2)
    assert ("x1", False) in left
    assert ("x2", False) in left
    assert ("y1", True) in left


async def test_a_dropped_job_that_lost_its_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Python 3.11 a cancellation can be lost (``asyncio.wait_for`` returning the inner result
    that came in the same loop step; redis-py reading a claim's reply): the dropped job went on,
    past the revoke or the stop that waited for it. It is cancelled again while they wait."""
    monkeypatch.setattr(lanes_module, "CANCEL_AGAIN_S", 0.05)
    forever = asyncio.Event()
    cancels = 0
    started: list[str] = []

    async def run(job: str) -> None:
        nonlocal cancels
        started.append(job)
        try:
            await forever.wait()
        except asyncio.CancelledError:
            cancels += 1  # lost: the job goes on
        await forever.wait()

    left: list[tuple[str, bool]] = []
    lanes: Lanes[str] = Lanes(run, lambda job, ok: left.append((job, ok)))
    lanes.submit("a", "1")
    await until(lambda: started == ["1"])
    lanes.drop(lambda _: True)
    assert await lanes.wait_for(lambda _: True, 5.0)
    assert (cancels, left) == (1, [("1", False)])

    lanes.submit("a", "2")  # and as a stop's close does
    await until(lambda: started == ["1", "2"])
    await lanes.close(5.0)
    assert (cancels, left) == (2, [("1", False), ("2", False)])


async def test_a_dropped_job_still_unwinding_is_selected_only_when_asked_for() -> None:
    """A job cancelled by a revoke that outlives its cancellation is still in hand (a revoke waits
    for it), but a later stop must not count it abandoned a second time."""
    release = asyncio.Event()
    started: list[str] = []

    async def run(job: str) -> None:
        started.append(job)
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    lanes: Lanes[str] = Lanes(run, lambda *_: None)
    lanes.submit("a", "1")
    lanes.submit("b", "2")
    await until(lambda: started == ["1", "2"])
    lanes.drop(lambda job: job == "1")
    assert sorted(lanes.select(lambda _: True)) == ["1", "2"]
    assert lanes.select(lambda _: True, cancelled=False) == ["2"]
    release.set()
    assert await lanes.wait_idle(5.0)


def test_a_job_is_cancelled_again_only_after_its_bounded_clean_up() -> None:
    """A second cancellation cuts a job's clean-up short: a rate-limit reservation given back
    stayed taken in Redis, a claim not handed on made the next owner wait. It comes after both,
    and within the revoke's wait for the jobs it cancelled."""
    clean_ups = (pipeline_module._LET_GO_TIMEOUT_S, ratelimit_module._GIVE_BACK_TIMEOUT_S)
    assert max(clean_ups) < lanes_module.CANCEL_AGAIN_S < REVOKE_CANCEL_WAIT_S


async def test_close_cancels_everything() -> None:
    forever = asyncio.Event()

    async def run(_: str) -> None:
        await forever.wait()

    left: list[tuple[str, bool]] = []
    lanes: Lanes[str] = Lanes(run, lambda job, ok: left.append((job, ok)))
    lanes.submit("a", "1")
    lanes.submit("a", "2")
    assert not await lanes.wait_idle(0.01)
    await lanes.close(1)
    assert sorted(left) == [("1", False), ("2", False)]
    assert len(lanes) == 0


async def test_at_most_max_running_and_free_slots_go_first_come() -> None:
    started: list[str] = []
    release = {job: asyncio.Event() for job in ("a1", "b1", "c1", "a2", "d1")}
    peak = 0

    async def run(job: str) -> None:
        nonlocal peak
        started.append(job)
        peak = max(peak, lanes.running)
        await release[job].wait()

    lanes: Lanes[str] = Lanes(run, lambda *_: None, max_running=2)
    for job in ("a1", "b1", "c1", "a2", "d1"):
        lanes.submit(job[0], job)
    await until(lambda: len(started) == 2)
    assert started == ["a1", "b1"]
    assert len(lanes) == 5
    release["a1"].set()  # a2's turn comes, but c1 and d1 were waiting for a slot before it
    await until(lambda: len(started) == 3)
    assert started[2] == "c1"
    release["b1"].set()
    await until(lambda: len(started) == 4)
    assert started[3] == "d1"
    release["c1"].set()
    await until(lambda: len(started) == 5)
    assert started[4] == "a2"
    for event in release.values():
        event.set()
    assert await lanes.wait_idle(2)
    assert peak == 2


async def test_drop_removes_jobs_waiting_for_a_slot_and_keeps_their_lane_going() -> None:
    started: list[str] = []
    hold = asyncio.Event()
    left: list[tuple[str, bool]] = []

    async def run(job: str) -> None:
        started.append(job)
        if job == "p1":
            await hold.wait()

    lanes: Lanes[str] = Lanes(run, lambda job, ok: left.append((job, ok)), max_running=1)
    lanes.submit("k", "p1")  # runs, and holds the only slot
    lanes.submit("m", "x1")  # waits for a slot
    lanes.submit("m", "q2")  # waits behind x1 in its lane
    await until(lambda: started == ["p1"])
    assert lanes.matching(lambda j: j.startswith("x")) == 1
    lanes.drop(lambda j: j.startswith("x"))
    assert left == [("x1", False)]
    assert len(lanes) == 2
    hold.set()
    assert await lanes.wait_idle(2)
    assert started == ["p1", "q2"]
    assert left == [("x1", False), ("p1", True), ("q2", True)]
