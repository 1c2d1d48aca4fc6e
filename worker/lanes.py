"""Per-ticket ordering: jobs with the same key run one at a time, in the order they were submitted.

Different keys run concurrently, each job in its own tracked task, at most ``max_running`` at a
time: a job whose turn has come waits for a free slot in a first-come queue (``_ready``). A ticket
whose job is retrying holds back only its own later jobs. Keyless jobs (messages too broken to
name a ticket) need only a slot. Nothing here knows about Kafka; the caller bounds how many jobs
exist at a time, which may be more than may run: later events of busy tickets wait here while
other tickets' events take the free slots.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Generic, TypeVar

from worker.logs import get_logger

log = get_logger(__name__)

#: How long a dropped job is given before it is cancelled again (``Lanes._cancel_again``): longer
#: than a job's bounded clean-up after its cancellation (a claim's hand-on, 2 s; a rate-limit
#: reservation given back, 1 s), which a second cancellation would cut short; shorter than the
#: revoke's and the stop's waits for the jobs they cancel (5 s).
CANCEL_AGAIN_S = 2.5

J = TypeVar("J")


class Lanes(Generic[J]):
    """Per-ticket order with tickets in parallel: a ticket's messages run one after another, at
    most ``max_in_flight`` tickets at once; the rest wait in the buffer, not in a slot."""

    def __init__(
        self,
        run: Callable[[J], Coroutine[object, object, None]],
        on_done: Callable[[J, bool], None],
        max_running: int = sys.maxsize,
        on_crash: Callable[[J, BaseException], None] | None = None,
    ) -> None:
        """``run(job)`` does the work; ``on_done(job, finished)`` is told when a job leaves, with
        ``finished=False`` when it was cancelled or dropped before it could finish, or raised;
        ``on_crash(job, error)`` too, after it, when it raised; it logs the crash, as only it knows
        what names the job (this callback runs outside the job's own log context)."""
        self._run = run
        self._on_done = on_done
        self._on_crash = on_crash
        self._max_running = max_running
        self._queued: dict[str, deque[J]] = {}  # behind the key's job that is running or ready
        self._ready: deque[tuple[str | None, J]] = deque()  # its turn has come; waits for a slot
        self._running: dict[asyncio.Task[None], tuple[str | None, J]] = {}
        self._busy: set[str] = set()  # keys with a job running or ready
        #: Keys whose job raised: their later jobs never run (``_halt``).
        self._halted: set[str] = set()
        #: Running jobs ``drop`` cancelled, with when it last did (``_cancel_again``).
        self._cancelled: dict[asyncio.Task[None], float] = {}
        self._closed = False
        self._count = 0  # jobs queued, ready or running, kept as a number: asked for on every message
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        """Jobs queued, ready or running."""
        return self._count

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, key: str | None, job: J) -> None:
        if self._closed:
            raise RuntimeError("lanes are closed")
        if key is not None and key in self._halted:
            self._on_done(job, False)
            return
        self._idle.clear()
        self._count += 1
        if key is not None:
            if key in self._busy:
                self._queued.setdefault(key, deque()).append(job)
                return
            self._busy.add(key)
        self._ready.append((key, job))
        self._fill_slots()

    def _start(self, key: str | None, job: J) -> None:
        task = asyncio.create_task(self._run(job))
        self._running[task] = (key, job)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        key, job = self._running.pop(task)
        self._cancelled.pop(task, None)
        self._count -= 1
        error = None if task.cancelled() else task.exception()
        if error is not None and self._on_crash is None:  # a job must end as an outcome: a bug, said loudly
            log.error("job_crashed", error=type(error).__name__, exc_info=error)
        ok = not task.cancelled() and error is None
        self._on_done(job, ok)
        if error is not None and self._on_crash is not None:
            self._on_crash(job, error)
        if key is not None:
            if error is None:
                self._next_in_lane(key)
            else:
                self._halt(key)
        self._fill_slots()
        self._check_idle()

    def _halt(self, key: str) -> None:
        """The key's job raised (a bug; the caller stops the process): its later jobs are dropped,
        now and as they come. Run, they were applied ahead of the one that failed, which the next
        process reads again, against the key's order."""
        self._halted.add(key)
        for job in self._queued.pop(key, ()):
            self._count -= 1
            self._on_done(job, False)

    def _next_in_lane(self, key: str) -> None:
        """The key's job has left: its next job waits for a slot, or the key is free."""
        queue = self._queued.get(key)
        if queue and not self._closed:
            job = queue.popleft()
            if not queue:
                del self._queued[key]
            self._ready.append((key, job))
        else:
            self._busy.discard(key)

    def _fill_slots(self) -> None:
        while self._ready and not self._closed and len(self._running) < self._max_running:
            self._start(*self._ready.popleft())

    def _check_idle(self) -> None:
        if not self._running and not self._queued and not self._ready:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every job has left; ``False`` when the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def wait_for(self, predicate: Callable[[J], bool], timeout_s: float) -> bool:
        """Wait until no job matching ``predicate`` is queued, ready or running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.matching(predicate):
            tasks = {t for t, (_, job) in self._running.items() if predicate(job)} or set(self._running)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            timeout = min(remaining, CANCEL_AGAIN_S) if self._cancelled else remaining
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            self._cancel_again(loop.time())
        return True

    def _cancel_again(self, now: float) -> None:
        """Cancel again the dropped jobs still running ``CANCEL_AGAIN_S`` after their last
        cancellation: on Python 3.11 one can be lost (``worker.cancel``; seen while redis-py read a
        claim's reply), and the job went on, past the revoke or stop that was waiting for it."""
        for task, cancelled_at in list(self._cancelled.items()):
            if now - cancelled_at >= CANCEL_AGAIN_S and not task.done():
                task.cancel()
                self._cancelled[task] = now

    def matching(self, predicate: Callable[[J], bool]) -> int:
        return len(self.select(predicate))

    def select(self, predicate: Callable[[J], bool], *, cancelled: bool = True) -> list[J]:
        """The jobs in hand (running, ready or queued) matching ``predicate``; with
        ``cancelled=False`` not those already cancelled and still unwinding (``drop``)."""
        jobs = [
            job
            for task, (_, job) in self._running.items()
            if predicate(job) and (cancelled or task not in self._cancelled)
        ]
        jobs += (job for _, job in self._ready if predicate(job))
        jobs += (job for q in self._queued.values() for job in q if predicate(job))
        return jobs

    def drop(self, predicate: Callable[[J], bool]) -> None:
        """Remove waiting jobs matching ``predicate`` and cancel running ones (they do not finish)."""
        for key in list(self._queued):
            keep: deque[J] = deque()
            for job in self._queued[key]:
                if predicate(job):
                    self._count -= 1
                    self._on_done(job, False)
                else:
                    keep.append(job)
            if keep:
                self._queued[key] = keep
            else:
                del self._queued[key]
        ready, self._ready = self._ready, deque()
        for lane, job in ready:
            if predicate(job):
                self._count -= 1
                self._on_done(job, False)
                if lane is not None:
                    self._next_in_lane(lane)  # a kept job behind it takes its turn
            else:
                self._ready.append((lane, job))
        self._fill_slots()  # slots are taken in order: a kept job that was behind may start now
        now = asyncio.get_running_loop().time()
        for task, (_, job) in list(self._running.items()):
            if predicate(job):
                task.cancel()
                self._cancelled[task] = now
        self._check_idle()

    async def close(self, timeout_s: float) -> None:
        """Drop everything waiting, cancel everything running, and wait for them to unwind."""
        self._closed = True
        self.drop(lambda _: True)
        await self.wait_for(lambda _: True, timeout_s)
