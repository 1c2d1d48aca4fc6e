"""Jobs of one ticket run one at a time in order; different tickets run concurrently."""

from __future__ import annotations

import asyncio

from worker.lanes import Lanes


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
    await asyncio.sleep(0)
    assert started == ["a1", "b1"]  # a2 waits behind a1; b1 runs beside it
    assert len(lanes) == 4
    release["a1"].set()
    await _until(lambda: "a2" in started)
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
    await asyncio.sleep(0)
    assert running == 5
    gate.set()
    assert await lanes.wait_idle(2)


async def test_a_failing_job_does_not_block_its_lane() -> None:
    left: list[tuple[str, bool]] = []

    async def run(job: str) -> None:
        if job == "bad":
            raise RuntimeError("boom")

    lanes: Lanes[str] = Lanes(run, lambda job, ok: left.append((job, ok)))
    lanes.submit("k", "bad")
    lanes.submit("k", "good")
    assert await lanes.wait_idle(2)
    assert left == [("bad", False), ("good", True)]


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
    await asyncio.sleep(0)
    assert not await lanes.wait_for(lambda j: j.startswith("x"), 0.05)
    lanes.drop(lambda j: j.startswith("x"))
    assert await lanes.wait_idle(2)
    assert ("x1", False) in left
    assert ("x2", False) in left
    assert ("y1", True) in left


async def test_close_cancels_everything() -> None:
    forever = asyncio.Event()

    async def run(_: str) -> None:
        await forever.wait()

    left: list[tuple[str, bool]] = []
    lanes: Lanes[str] = Lanes(run, lambda job, ok: left.append((job, ok)))
    lanes.submit("a", "1")
    lanes.submit("a", "2")
    await asyncio.sleep(0)
    assert not await lanes.wait_idle(0.01)
    await lanes.close(1)
    assert sorted(left) == [("1", False), ("2", False)]
    assert len(lanes) == 0


async def _until(predicate, timeout_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0)
