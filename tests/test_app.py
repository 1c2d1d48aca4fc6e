"""``Worker`` and ``Consumer`` without a broker: rebalances, pausing, fetching, draining (aiokafka faked)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import Fetcher, FetchResult, PartitionRecords
from aiokafka.consumer.subscription_state import Assignment
from aiokafka.errors import KafkaError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from services import OwnRedis
from structlog.testing import capture_logs
from waiting import until

import worker.app as app_module
import worker.consumer as consumer_module
import worker.retry as retry_module
from worker.app import Worker
from worker.cancel import cancel_and_wait
from worker.consumer import Consumer, Message
from worker.dedup import SqliteStore
from worker.errors import ApiUnreachable, BrokerUnavailable, DedupUnavailable, JobCrashed, KafkaClientStopped
from worker.offsets import PartitionKey
from worker.pipeline import Job
from worker.ratelimit import RedisTokenBucket
from worker.sandbox import free_port
from worker.settings import WorkerSettings


class GroupMember:
    """What ``Consumer`` asks of aiokafka's consumer for pausing: its assignment and paused set."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.paused_now: set[TopicPartition] = set()
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_now |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_now -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_now)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))


class Polled(GroupMember):
    """A member whose fetches find nothing; counts them. Stops at once."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        super().__init__(assigned)
        self.polls = 0

    async def getmany(
        self, *partitions: TopicPartition, **kwargs: object
    ) -> dict[TopicPartition, list[object]]:
        self.polls += 1
        return {}

    async def stop(self) -> None:
        return None


class CoordinationEnded(Polled):
    """aiokafka's consumer once its group coordination task has ended: every fetch raises."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        super().__init__(assigned)

        async def ended() -> None:
            raise KafkaError("the coordinator's routine failed")

        self._coordinator = SimpleNamespace(_coordination_task=asyncio.ensure_future(ended()))

    async def ended(self) -> None:
        await asyncio.gather(self._coordinator._coordination_task, return_exceptions=True)

    async def getmany(
        self, *partitions: TopicPartition, **kwargs: object
    ) -> dict[TopicPartition, list[object]]:
        await super().getmany(*partitions, **kwargs)
        self._coordinator._coordination_task.result()  # as check_errors does
        return {}


@contextlib.asynccontextmanager
async def member_in_place(worker: Worker, member: GroupMember) -> AsyncIterator[list[dict[Any, int]]]:
    """``member`` in place of aiokafka's consumer for the block; yields the commits the worker
    sends (recorded, not sent), and closes what the unstarted worker holds afterwards."""
    real, worker._consumer._consumer = worker._consumer._consumer, member  # type: ignore[assignment]
    commits: list[dict[Any, int]] = []

    async def commit(positions: dict[Any, int]) -> None:
        commits.append(positions)

    worker._consumer.commit = commit  # type: ignore[method-assign]
    try:
        yield commits
    finally:
        worker._consumer._consumer = real
        await close_unstarted(worker, real)


def worker_settings(tmp_path: Path | None = None, **overrides: Any) -> WorkerSettings:
    """Settings of a worker that is never started against a real API; with ``tmp_path``, its
    sqlite dedup file there."""
    if tmp_path is not None:
        overrides.setdefault("dedup_url", f"sqlite:///{tmp_path}/d.sqlite3")
    return WorkerSettings(api_endpoint="http://127.0.0.1:1", api_ak="a", api_sk="sk-0123456789", **overrides)


def listed_topics(worker: Worker) -> set[str]:
    """What a broker's metadata lists when the worker's three topics are there."""
    s = worker.settings
    return {s.input_topic, s.results_topic, s.dlq_topic, "someone-elses"}


def make_worker(tmp_path: Path, **overrides: Any) -> Worker:
    return Worker(worker_settings(tmp_path, **overrides))


async def close_unstarted(worker: Worker, real_consumer: AIOKafkaConsumer | None = None) -> None:
    """What a worker that was never started still holds: its lanes and its clients' objects
    (``real_consumer``: aiokafka's consumer, when the test put a fake in its place)."""
    await worker._lanes.close(timeout_s=1.0)
    if real_consumer is not None:
        await real_consumer.stop()
    else:
        await worker._consumer.stop()
    await worker._publisher.stop()
    await worker._store.close()


async def nothing_to_hand_on() -> None:
    """A stand-in pipeline's ``handed_on``: none of its jobs holds a claim."""


class Holds:
    """A pipeline whose jobs wait until ``release`` is set, so that they stay in hand."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[Job] = []
        self.handed_on = nothing_to_hand_on

    async def process(self, job: Job) -> None:
        self.started.append(job)
        await self.release.wait()


def processing_with(worker: Worker, process: Callable[[Job], Awaitable[None]]) -> SimpleNamespace:
    """A stand-in pipeline whose jobs run ``process``: none waits on another job, none holds a claim."""
    pipeline = SimpleNamespace(process=process, waiting_on_other_jobs=0, handed_on=nothing_to_hand_on)
    worker._pipeline = pipeline  # type: ignore[assignment]
    return pipeline


def holding_jobs(worker: Worker) -> Holds:
    pipeline = Holds()
    worker._pipeline = pipeline  # type: ignore[assignment]
    return pipeline


async def test_a_revoked_partition_stops_being_reported_in_the_lag_metric(tmp_path: Path) -> None:
    """After a rebalance another member owns the partition and reports its lag: the value this pod
    measured before it lost the partition must not stay exported (summed across pods it counted
    twice, and a lag from a backlog kept an alert firing)."""
    settings = worker_settings(tmp_path)
    worker = Worker(settings)
    topic = settings.input_topic
    try:
        await worker.on_assigned({(topic, 0), (topic, 1)})
        worker.metrics.lag.labels(partition="0").set(16)
        worker.metrics.lag.labels(partition="1").set(11)

        await worker.on_revoked({(topic, 0)})
    finally:  # never started: only the clients' objects to close
        await close_unstarted(worker)

    registry = worker.metrics.registry
    assert registry.get_sample_value("coc_worker_consumer_lag", {"partition": "0"}) is None
    assert registry.get_sample_value("coc_worker_consumer_lag", {"partition": "1"}) == 11


async def test_a_held_partition_assigned_back_at_once_is_fetched_again(tmp_path: Path) -> None:
    """An eager rebalance revokes every partition, then assigns them again. A partition held at
    ``max_uncommitted`` loses its tail with its offsets on the revocation: held on, no job of it
    would ever finish to release it, and it would never be fetched again."""
    worker = make_worker(tmp_path)
    key = (worker.settings.input_topic, 0)
    real, group = worker._consumer._consumer, GroupMember({TopicPartition(*key)})
    worker._consumer._consumer = group  # the library's side of pause/resume, without a broker
    try:
        await worker.on_assigned({key})
        worker._consumer.hold(key, "share")
        assert group.paused_now == {TopicPartition(*key)}

        await worker.on_revoked({key})
        group.paused_now.clear()  # as aiokafka does: a new assignment starts unpaused
        await worker.on_assigned({key})

        assert worker.status()["held"] == []
        assert group.paused_now == set()
    finally:  # never started: only the clients' objects to close
        await close_unstarted(worker, real)


async def test_a_stop_interrupts_a_fetch_that_waits_for_a_rebalance(tmp_path: Path) -> None:
    """While a rebalance is under way aiokafka's fetch ignores its timeout and waits for the new
    assignment (for ever, if the broker is gone): a stop waited with it instead of beginning."""
    worker = make_worker(tmp_path)
    never = asyncio.Event()

    async def waits_for_the_assignment(max_records: int, timeout_s: float) -> list[object]:
        await never.wait()
        return []

    worker._consumer.fetch = waits_for_the_assignment  # type: ignore[method-assign]
    try:
        polling = asyncio.create_task(worker._poll(10, 0.1))
        worker._stopping.set()
        assert await asyncio.wait_for(polling, 2) == []
    finally:
        await close_unstarted(worker)


async def test_a_commit_the_broker_never_answers_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka retries a commit while the broker is away; a revoke (or a stop) awaiting it never
    ended. It is bounded now, and reported as the broker being unavailable."""
    monkeypatch.setattr(consumer_module, "COMMIT_TIMEOUT_S", 0.1)
    settings = worker_settings()
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]

    class Hangs:
        async def commit(self, offsets: object) -> None:
            await asyncio.Event().wait()

    real, consumer._consumer = consumer._consumer, Hangs()  # type: ignore[assignment]
    try:
        with pytest.raises(BrokerUnavailable, match="not answered"):
            await asyncio.wait_for(consumer.commit({(settings.input_topic, 0): 5}), 2)
    finally:
        await real.stop()


async def test_a_message_fetched_just_before_its_partition_was_revoked_is_left_to_its_new_owner(
    tmp_path: Path,
) -> None:
    """The fetch runs as a task of its own: records it returned may reach the dispatcher a loop step
    after a revocation. Taken then, the revoked partition came back into the offsets, every later
    commit named it, and the broker refused each whole commit (nothing was committed again)."""
    worker = make_worker(tmp_path)
    topic = worker.settings.input_topic
    ours, gone = (topic, 1), (topic, 0)
    try:
        await worker.on_assigned({ours, gone})

        async def revoked_meanwhile(max_records: int, timeout_s: float) -> list[Message]:
            async def rebalance() -> None:  # eager: all revoked, only one assigned back
                await worker.on_revoked({ours, gone})
                await worker.on_assigned({ours})

            asyncio.get_running_loop().create_task(rebalance())
            return [Message(topic, 0, 5, None, b"{}", [], 0)]

        worker._consumer.fetch = revoked_meanwhile  # type: ignore[method-assign]
        for message in await worker._poll(10, 0.1):
            worker._dispatch(message)

        assert worker._offsets.keys() == {ours}
        assert len(worker._lanes) == 0  # not processed here either
    finally:  # never started: only the clients' objects to close
        await close_unstarted(worker)


async def test_a_message_dispatched_while_its_partitions_revoke_commits_is_not_taken(tmp_path: Path) -> None:
    """A fetch handed over just as a rebalance began: the revoke was awaiting its commit, the
    partition was still tracked, and the message was taken; its job then ran after the revoke had
    returned (and dropped the partition's offsets), for a partition already another member's."""
    worker = make_worker(tmp_path)
    key = (worker.settings.input_topic, 0)
    pipeline = holding_jobs(worker)
    answer = asyncio.Event()
    committing = asyncio.Event()

    async def slow_commit(positions: dict[tuple[str, int], int]) -> None:
        committing.set()
        await answer.wait()

    worker._consumer.commit = slow_commit  # type: ignore[method-assign]
    try:
        await worker.on_assigned({key})
        taken_in = worker._offsets.take(key, 4)
        worker._offsets.finish(key, 4, taken_in)  # something for the revoke to commit
        revoking = asyncio.create_task(worker.on_revoked({key}))
        await asyncio.wait_for(committing.wait(), 5)

        worker._dispatch(Message(key[0], 0, 5, None, b"{}", [], 0))

        assert len(worker._lanes) == 0
        answer.set()
        await asyncio.wait_for(revoking, 5)
        assert pipeline.started == []
        assert worker._offsets.keys() == set()
    finally:
        await close_unstarted(worker)


def abandoned(worker: Worker, kind: str) -> float | None:
    return worker.metrics.registry.get_sample_value("coc_worker_messages_abandoned_total", {"kind": kind})


async def test_a_job_left_behind_by_a_revoke_does_not_finish_its_offset_for_the_next_assignment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job the revoke gave up on (past its grace and the wait for cancelled jobs) that ends later
    marked its offset finished in the tracker of the partition assigned back, where a copy of its
    message was running: the commit went past that copy, which was then never committed for."""
    monkeypatch.setattr(app_module, "REVOKE_CANCEL_WAIT_S", 0.05)
    worker = make_worker(tmp_path)
    worker.settings.revoke_grace_s = 0.05
    key = (worker.settings.input_topic, 0)
    release = asyncio.Event()
    started: list[Job] = []

    class Stubborn:
        """A job that outlives its cancellation (as one stuck in a shielded call would)."""

        async def process(self, job: Job) -> None:
            started.append(job)
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()

    worker._pipeline = Stubborn()  # type: ignore[assignment]
    try:
        await worker.on_assigned({key})
        worker._dispatch(Message(key[0], 0, 6, None, b"{}", [], 0))
        await until(lambda: len(started) == 1)
        with capture_logs() as logs:
            await worker.on_revoked({key})  # gives up on it
        # consumed without an outcome here: counted, and named by its position
        assert abandoned(worker, "revoked") == 1
        [given_up] = [e for e in logs if e["event"] == "revoke_grace_exceeded"]
        assert (given_up["abandoned"], given_up["offsets"]) == (1, {f"{key[0]}/0": "6-6 (1)"})
        await worker.on_assigned({key})  # an eager rebalance: assigned back at once
        worker._dispatch(Message(key[0], 0, 6, None, b"{}", [], 0))  # read again from the commit
        await until(lambda: len(started) == 2)

        release.set()  # both end; the first belongs to the earlier assignment
        first = started[0]
        await until(lambda: worker._lanes.running == 0)
        assert first.taken_in is not worker._offsets._parts[key]
        assert worker._offsets.to_commit() == {key: 7}
        assert worker._offsets._parts[key].finished == set()
    finally:
        await close_unstarted(worker)


async def test_an_invalid_message_naming_a_busy_ticket_waits_for_that_tickets_earlier_events(
    tmp_path: Path,
) -> None:
    """An invalid message's outcome is keyed by the ticket its value still names; it ran in no lane
    and its outcome could come out before that ticket's earlier events' outcomes."""
    worker = make_worker(tmp_path)
    key = (worker.settings.input_topic, 0)
    pipeline = holding_jobs(worker)
    valid = b'{"event_id": "ev-1", "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": "s-1"}'
    no_sub_ticket = b'{"event_id": "ev-2", "type": "change.started", "ticket_id": "CM1"}'
    try:
        await worker.on_assigned({key})
        worker._dispatch(Message(key[0], 0, 0, b"CM1", valid, [], 0))
        worker._dispatch(Message(key[0], 0, 1, b"CM1", no_sub_ticket, [], 0))
        await until(lambda: len(pipeline.started) == 1)
        assert (len(worker._lanes), worker._lanes.running) == (2, 1)  # the invalid one waits its turn
        pipeline.release.set()
        assert await worker._lanes.wait_idle(5)
        assert [job.message.offset for job in pipeline.started] == [0, 1]
    finally:
        await close_unstarted(worker)


async def test_an_event_not_keyed_by_its_ticket_is_counted_and_said_once_a_minute(tmp_path: Path) -> None:
    """An event produced without its ticket_id as key (a plug-in that forgot it) may run before
    its ticket's earlier step, on another partition, and be refused: nothing said why. It is
    still processed, but counted by kind and warned about, at most once a minute."""
    worker = make_worker(tmp_path)
    key = (worker.settings.input_topic, 0)
    pipeline = holding_jobs(worker)
    event = b'{"event_id": "ev-%d", "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": "s-%d"}'
    counts = worker.metrics.key_mismatches
    try:
        await worker.on_assigned({key})
        with capture_logs() as logs:
            worker._dispatch(Message(key[0], 0, 0, b"CM1", event % (0, 0), [], 0))  # keyed right
            worker._dispatch(Message(key[0], 0, 1, None, event % (1, 1), [], 0))
            worker._dispatch(Message(key[0], 0, 2, b"deploy-42", event % (2, 2), [], 0))
            worker._dispatch(Message(key[0], 0, 3, None, b"{not json", [], 0))  # invalid: its own outcome
        said = [line for line in logs if line["event"] == "message_key_not_ticket_id"]
        assert [(line["offset"], line["key"], line["since_last_said"]) for line in said] == [(1, None, 1)]
        assert counts.labels(kind="missing")._value.get() == 1
        assert counts.labels(kind="other")._value.get() == 1
        assert len(worker._lanes) == 4  # every one is processed all the same
        worker._keys._next_at = 0.0  # a minute later
        with capture_logs() as logs:
            worker._dispatch(Message(key[0], 0, 4, b"CM2", event % (4, 4), [], 0))
        [line] = [line for line in logs if line["event"] == "message_key_not_ticket_id"]
        assert (line["key"], line["ticket_id"], line["since_last_said"]) == ("CM2", "CM1", 2)
        pipeline.release.set()
    finally:
        await close_unstarted(worker)


def held_gauges(worker: Worker) -> dict[str, float | None]:
    """``coc_worker_partitions_held`` by reason."""
    return {
        reason: worker.metrics.registry.get_sample_value("coc_worker_partitions_held", {"reason": reason})
        for reason in ("uncommitted", "share", "bytes", "rewinding")
    }


async def test_a_partition_held_for_its_share_then_only_by_its_oldest_message_says_so(
    tmp_path: Path,
) -> None:
    """Held at its share of the buffer (flow control), a partition whose later messages finish
    while its oldest does not stays held by that one message (it cannot be committed past, and
    nothing more is fetched): the gauge kept saying ``share`` for as long as the message was
    stuck, and an alert on ``uncommitted`` never saw it."""
    worker = make_worker(tmp_path, max_in_flight=8, max_buffered=32, max_uncommitted=24)
    topic = worker.settings.input_topic
    hot, other = (topic, 0), (topic, 1)
    real, group = worker._consumer._consumer, GroupMember({TopicPartition(*hot), TopicPartition(*other)})
    worker._consumer._consumer = group
    stuck = asyncio.Event()
    finish = asyncio.Event()

    class HeadStuck:
        async def process(self, job: Job) -> None:
            await (stuck if job.message.offset == 0 else finish).wait()

    worker._pipeline = HeadStuck()  # type: ignore[assignment]
    try:
        await worker.on_assigned({hot, other})
        for n in range(16):  # sixteen tickets: half the buffer, under max_uncommitted (24)
            ticket = f"T{n}"
            worker._dispatch(
                Message(
                    topic,
                    0,
                    n,
                    ticket.encode(),
                    f'{{"event_id": "e{n}", "ticket_id": "{ticket}"}}'.encode(),
                    [],
                    0,
                )
            )
        assert worker._consumer.held == {hot}
        assert held_gauges(worker)["share"] == 1
        with capture_logs() as logs:
            finish.set()  # all but the oldest finish: 15 of 16 still uncommitted behind it
            await until(lambda: worker._offsets.unfinished_of(hot) == 1)
        assert worker._consumer.held == {hot}
        assert held_gauges(worker) == {"uncommitted": 1, "share": 0, "bytes": 0, "rewinding": 0}
        held = [(e["log_level"], e["reason"]) for e in logs if e["event"] == "partition_held"]
        assert held == [("warning", "uncommitted")]  # said once, not per finished message
        stuck.set()
        await until(lambda: worker._consumer.held == set())
    finally:
        stuck.set()
        await close_unstarted(worker, real)


async def test_a_ticket_stuck_in_one_partition_does_not_fill_the_buffer_for_the_others(
    tmp_path: Path,
) -> None:
    """A ticket whose event retries for minutes keeps its later events in the buffer. They filled
    it, fetching paused for every partition, and the others' tickets got no slot while most
    slots were free (the per-partition hold at ``max_uncommitted``, 10,000, came far later). Now a
    partition is held once its unfinished messages reach half the buffer, and released at a
    quarter."""
    worker = make_worker(tmp_path, max_in_flight=8, max_buffered=32)
    topic = worker.settings.input_topic
    hot, other = (topic, 0), (topic, 1)
    real, group = worker._consumer._consumer, GroupMember({TopicPartition(*hot), TopicPartition(*other)})
    worker._consumer._consumer = group
    stuck = asyncio.Event()

    class HeadStuck:
        async def process(self, job: Job) -> None:
            if job.message.partition_key == hot and job.message.offset == 0:
                await stuck.wait()

    def event(n: int, ticket: str) -> bytes:
        return (
            f'{{"event_id": "ev-{ticket}-{n}", "type": "change.started", "ticket_id": "{ticket}",'
            f' "sub_ticket_id": "s-{n}"}}'
        ).encode()

    worker._pipeline = HeadStuck()  # type: ignore[assignment]
    try:
        await worker.on_assigned({hot, other})
        with capture_logs() as logs:
            for n in range(16):
                worker._dispatch(Message(topic, 0, n, b"HOT", event(n, "HOT"), [], 0))
        assert worker._consumer.held == {hot}  # 16 unfinished: half the buffer of 32
        # flow control, not a fault: a plain backlog with one partition per pod meets it all along
        held = [(e["log_level"], e["reason"]) for e in logs if e["event"] == "partition_held"]
        assert held == [("info", "share")]
        # its lag is frozen while held (no fetch updates the high watermark): the gauge says why
        assert held_gauges(worker) == {"uncommitted": 0, "share": 1, "bytes": 0, "rewinding": 0}
        assert group.paused_now == {TopicPartition(*hot)}
        assert len(worker._lanes) == 16 < worker._buffer_limit  # room for the other partition
        for n in range(40):  # its tickets come and go
            worker._dispatch(Message(topic, 1, n, f"T{n}".encode(), event(n, f"T{n}"), [], 0))
        await until(lambda: len(worker._lanes) == 16)
        assert worker._consumer.held == {hot}

        stuck.set()  # the head gives up at last: the ticket's queue drains, the partition is fetched again
        await until(lambda: worker._consumer.held == set())
        assert group.paused_now == set()
        assert set(held_gauges(worker).values()) == {0}
    finally:
        await close_unstarted(worker, real)


async def test_a_worker_with_one_partition_and_a_small_buffer_keeps_every_slot_busy(tmp_path: Path) -> None:
    """The partition's share of the buffer is never below max_in_flight: with a buffer of
    max_in_flight (allowed), half of it held the only partition at half the slots."""
    worker = make_worker(tmp_path, max_in_flight=8, max_buffered=8)
    key = (worker.settings.input_topic, 0)
    pipeline = holding_jobs(worker)
    try:
        await worker.on_assigned({key})
        for n in range(8):
            value = f'{{"event_id": "ev-{n}", "type": "change.started", "ticket_id": "T{n}", "sub_ticket_id": "s"}}'
            worker._dispatch(Message(key[0], 0, n, f"T{n}".encode(), value.encode(), [], 0))
        await until(lambda: len(pipeline.started) == 8)
        assert worker._lanes.running == 8
        assert worker._consumer.held == set()
    finally:
        pipeline.release.set()
        await close_unstarted(worker)


class Prefetched(GroupMember):
    """aiokafka's side of ``getmany``, as its fetcher behaves: records prefetched per partition,
    handed out one partition after another, and dropped for a paused partition a poll touches
    (one it names, or any when it names none). ``fail`` partitions raise once, as a fetch error
    does (aiokafka forgets the error once it has raised it)."""

    def __init__(self, records: dict[TopicPartition, int]) -> None:
        super().__init__(set(records))
        self.buffered = {tp: list(range(count)) for tp, count in records.items()}
        self.handed_out: list[tuple[int, int]] = []
        self.asked: list[tuple[TopicPartition, ...]] = []
        self.fail: set[TopicPartition] = set()
        self.dropped: list[TopicPartition] = []  # paused partitions whose prefetch a poll touched

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        self.asked.append(partitions)
        left = max_records if max_records is not None else 500
        taken: dict[TopicPartition, list[SimpleNamespace]] = {}
        for tp in list(self.buffered):
            if partitions and tp not in partitions:
                continue
            if tp in self.paused_now:
                if self.buffered[tp]:
                    self.dropped.append(tp)
                self.buffered[tp] = []  # what aiokafka's FetchResult.check_assignment does
                continue
            if tp in self.fail:
                self.fail.discard(tp)
                if taken:  # aiokafka returns what it took and raises on the next call
                    self.fail.add(tp)
                    break
                raise KafkaError(f"fetch error of {tp}")
            offsets, self.buffered[tp] = self.buffered[tp][:left], self.buffered[tp][left:]
            if offsets:
                taken[tp] = [_record(tp, offset) for offset in offsets]
                self.handed_out += [(tp.partition, offset) for offset in offsets]
                left -= len(offsets)
            if not left:
                break
        return taken


def _record(tp: TopicPartition, offset: int) -> SimpleNamespace:
    """What ``messages_from`` reads of aiokafka's ``ConsumerRecord``."""
    return SimpleNamespace(
        topic=tp.topic, partition=tp.partition, offset=offset, key=None, value=b"{}", headers=(), timestamp=0
    )


@contextlib.asynccontextmanager
async def consuming_from(worker: Worker, member: GroupMember) -> AsyncIterator[asyncio.Task[None]]:
    """``worker``'s consume loop over ``member`` (aiokafka's side), every partition of it assigned;
    the loop's task is yielded. Leaving, a stop must end the loop within 2 s (its own error, if it
    ended on one, is raised); the worker is closed whatever happened."""
    real, worker._consumer._consumer = worker._consumer._consumer, member
    task: asyncio.Task[None] | None = None
    try:
        await worker.on_assigned({(tp.topic, tp.partition) for tp in member.assigned})
        task = asyncio.create_task(worker._consume())
        yield task
        worker._stopping.set()
        await asyncio.wait_for(task, 2)
    finally:
        worker._stopping.set()
        if task is not None and not task.done():
            await cancel_and_wait([task])
        await close_unstarted(worker, real)


async def test_a_full_buffer_pauses_fetching_and_keeps_polling_without_touching_the_prefetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polled while a partition is paused, aiokafka drops the records it has prefetched for it and
    fetches them again on resume. The worker polled with no partition named at every wake-up of a
    pause (the buffer full, about ten times a second at full load): it read ~10x the input's bytes
    and the broker spent 2.5x the CPU per event. A paused worker still polls (the group sees it
    alive by its polls), naming no partition of its own."""
    monkeypatch.setattr(app_module, "_FETCH_TIMEOUT_S", 0.01)  # wake-ups 50 times as often
    settings = worker_settings(tmp_path, max_in_flight=2, max_buffered=4)
    worker = Worker(settings)
    tp = TopicPartition(settings.input_topic, 0)
    member = Prefetched({tp: 100})
    release = holding_jobs(worker).release
    async with consuming_from(worker, member):
        await until(lambda: bool(member.paused_now), what="the buffer to fill")
        polls = len(member.asked)
        await until(lambda: len(member.asked) >= polls + 5, what="polls while paused")
        assert len(worker._lanes) == 4  # the buffer limit
        assert not member.dropped
        assert len(member.buffered[tp]) == 96  # still prefetched

        release.set()  # room again: fetching resumes where the prefetch is
        await until(lambda: len(member.handed_out) > 4, what="fetching to resume")
        assert member.handed_out[:8] == [(0, offset) for offset in range(8)]


class Trickle(Prefetched):
    """Records of ``size`` bytes, at most ``per_call`` a call: aiokafka hands out what one fetch
    of a partition brought (at most ``max_partition_fetch_bytes``), however many were asked for."""

    def __init__(self, records: dict[TopicPartition, int], size: int, per_call: int) -> None:
        super().__init__(records)
        self.size, self.per_call = size, per_call

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        got = await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=self.per_call)
        for records in got.values():
            for record in records:
                record.value = b"x" * self.size
        return got


async def test_large_records_pause_fetching_at_the_byte_limit_long_before_the_message_limit(
    tmp_path: Path,
) -> None:
    """The buffer was bounded in messages only: 1,024 records of up to ``max_event_bytes`` (1 MiB;
    invalid ones, waiting behind their ticket's earlier events) could hold ~1 GiB against the
    chart's 512 MiB limit. Fetching now pauses at ``max_buffered_bytes`` too (the fetch that
    reaches it may go past it), and resumes once a quarter of those bytes are free."""
    settings = worker_settings(tmp_path, max_in_flight=2, max_buffered=64, max_buffered_bytes=8192)
    worker = Worker(settings)
    parts = [TopicPartition(settings.input_topic, p) for p in range(4)]
    member = Trickle(dict.fromkeys(parts, 25), size=1000, per_call=1)
    release = holding_jobs(worker).release
    async with consuming_from(worker, member):
        await until(lambda: bool(member.paused_now), what="the byte limit to pause fetching")
        polls = len(member.asked)
        await until(lambda: len(member.asked) >= polls + 3, what="polls while paused")
        # 4,000 and 8,000 bytes were under the limit; the third fetch went past it, the last one
        assert len(worker._lanes) == 12 < worker._buffer_limit
        assert worker.status()["buffered_bytes"] == 12_000
        assert worker.metrics.registry.get_sample_value("coc_worker_buffered_bytes") == 12_000
        assert worker._consumer.held == set()  # 3,000 bytes each: under a partition's share
        assert not member.dropped

        release.set()  # every job finishes: the bytes are free again, and fetching goes on to the end
        await until(lambda: len(member.handed_out) == 100, what="the rest to be fetched")
        await until(lambda: len(worker._lanes) == 0, what="the jobs to finish")
        assert worker.status()["buffered_bytes"] == 0


async def test_large_records_stuck_in_one_partition_hold_that_partition_not_every_one(
    tmp_path: Path,
) -> None:
    """Bytes were bounded for the whole buffer only: large records stuck behind one ticket of one
    partition paused the fetching of every partition, and the others' small events, finished
    long since, were not fetched again until that ticket moved. A partition is now held at half
    of ``max_buffered_bytes`` of its own unfinished messages, released at a quarter."""
    settings = worker_settings(tmp_path, max_in_flight=8, max_buffered=64, max_buffered_bytes=4096)
    worker = Worker(settings)
    stuck, other = TopicPartition(settings.input_topic, 0), TopicPartition(settings.input_topic, 1)
    member = Trickle({stuck: 100, other: 200}, size=1000, per_call=1)
    release = asyncio.Event()

    async def process(job: Job) -> None:
        if job.message.partition == 0:
            await release.wait()

    def other_done() -> bool:
        """The other partition's 200 messages fetched and their jobs gone. Not ``handed_out >= 200``:
        that counts the stuck partition's 3 too, and came while the other's last messages were still
        being fetched or their jobs had not left yet (its bytes still counted)."""
        fetched = sum(partition == other.partition for partition, _ in member.handed_out)
        return fetched == 200 and not worker._lanes.matching(
            lambda job: job.message.partition == other.partition
        )

    processing_with(worker, process)
    with capture_logs() as logs:
        async with consuming_from(worker, member):
            await until(other_done, what="the other partition fetched to its end, its jobs finished")
            assert worker._consumer.held == {(stuck.topic, 0)}
            assert worker._partition_bytes == {(stuck.topic, 0): 3000}  # 2,000 under its share, then 3,000
            held = [(e["reason"], e["unfinished_bytes"]) for e in logs if e["event"] == "partition_held"]
            assert held == [("bytes", 3000)]
            assert not worker._consumer.paused

            release.set()  # the ticket moves: its partition is released and read to the end
            await until(lambda: len(member.handed_out) == 300, what="the stuck partition fetched again")
            await until(lambda: len(worker._lanes) == 0, what="the jobs to finish")
            assert worker._partition_bytes == {}


class Waiting(Trickle):
    """As aiokafka's ``getmany``: with nothing to hand out, it waits out its timeout."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        got = await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        if not got and timeout_ms:
            await asyncio.sleep(timeout_ms / 1000)
        return got


async def test_a_release_wakes_a_worker_whose_every_partition_is_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every assigned partition held (each stuck on its head, its uncommitted tail at
    ``max_uncommitted``), the worker polled naming no partition for the whole fetch timeout, and a
    partition released meanwhile waited for it to end. A release now wakes it at once."""
    monkeypatch.setattr(app_module, "_FETCH_TIMEOUT_S", 60.0)  # a wait the test would notice
    settings = worker_settings(tmp_path, max_in_flight=4, max_buffered=64, max_uncommitted=4)
    worker = Worker(settings)
    parts = [TopicPartition(settings.input_topic, p) for p in range(2)]
    member = Waiting(dict.fromkeys(parts, 20), size=10, per_call=1)
    heads = {p: asyncio.Event() for p in range(2)}

    async def process(job: Job) -> None:
        if job.message.offset == 0:  # each partition's first message is stuck; the rest finish
            await heads[job.message.partition].wait()

    processing_with(worker, process)
    async with consuming_from(worker, member):
        both = {(tp.topic, tp.partition) for tp in parts}
        await until(lambda: worker._consumer.held == both, what="both partitions held")
        await until(lambda: len(worker._lanes) == 2, what="the tails to finish")
        fetched = len(member.handed_out)

        heads[0].set()  # one head moves: its partition is released and read to the end
        await until(lambda: len(member.handed_out) == fetched + (20 - 4), what="the released one fetched")
        assert worker._consumer.held == {(parts[1].topic, 1)}
        heads[1].set()


async def test_a_job_ending_without_an_outcome_stops_the_worker(tmp_path: Path) -> None:
    """A job that raised (a bug in the outcome's own path) never finished its offset: its partition
    was committed up to it and no further, and, held once ``max_uncommitted`` later messages were
    done, stopped for good with no other sign than one logged error. The worker now stops (exit 1)
    with what it finished committed, and a fresh process reads the message again."""
    settings = worker_settings(tmp_path, max_in_flight=4, max_buffered=64)
    worker = Worker(settings)
    tp = TopicPartition(settings.input_topic, 0)
    member = Prefetched({tp: 10})

    async def process(job: Job) -> None:
        if job.message.offset == 3:
            raise RuntimeError("a bug with a secret-looking text")

    processing_with(worker, process)

    async def consume_until_stopped() -> None:  # leaving ``consuming_from`` raises the loop's error
        async with consuming_from(worker, member) as consume:
            await until(consume.done, timeout_s=5, what="the consume loop to stop")
            assert await worker._lanes.wait_idle(2.0)
            assert worker._offsets.to_commit() == {(tp.topic, 0): 3}  # up to the crashed one, not past it

    with capture_logs() as logs, pytest.raises(JobCrashed) as crashed:
        await consume_until_stopped()
    assert (
        str(crashed.value)
        == f"a job ended without an outcome (RuntimeError) at {tp.topic}/0 offset 3: restart"
    )
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["job_crashed"]
    # Named as the job's own lines are (README: "on every line about a message"): the callback
    # that logs it runs outside the job's log context.
    assert {k: errors[0][k] for k in ("topic", "partition", "offset")} == {
        "topic": tp.topic,
        "partition": 0,
        "offset": 3,
    }


async def test_a_single_partition_is_not_held_at_half_the_bytes(tmp_path: Path) -> None:
    """With nothing else to fetch, holding the only partition at half of ``max_buffered_bytes``
    would halve the limit: the buffer's own pause comes at the limit instead."""
    settings = worker_settings(tmp_path, max_in_flight=2, max_buffered=64, max_buffered_bytes=4096)
    worker = Worker(settings)
    tp = TopicPartition(settings.input_topic, 0)
    member = Trickle({tp: 100}, size=1000, per_call=2)
    holding_jobs(worker)
    async with consuming_from(worker, member):
        await until(lambda: bool(member.paused_now), what="the byte limit to pause fetching")
        assert (len(worker._lanes), worker.status()["buffered_bytes"]) == (6, 6000)
        assert worker._consumer.held == set()


async def test_messages_of_no_bytes_leave_their_partition_to_be_committed(tmp_path: Path) -> None:
    """An unreadable record (and a tombstone without a key) holds no bytes: the first of two to
    leave dropped its partition's byte sum at 0, and the second's leaving raised ``KeyError``
    inside the lanes' callback, its offset never finished: the partition was never committed past
    it, and after a restart the same records did it again."""
    worker = Worker(worker_settings(tmp_path))
    topic = worker.settings.input_topic
    done: list[int] = []

    async def process(job: Job) -> None:
        done.append(job.message.offset)

    processing_with(worker, process)
    try:
        await worker.on_assigned({(topic, 0)})
        for offset in (0, 1):
            worker._dispatch(Message(topic, 0, offset, None, b"", [], 0, "unreadable"))
        await until(lambda: len(done) == 2, what="both jobs run")
        assert await worker._lanes.wait_idle(2.0)
        assert worker._offsets.to_commit() == {(topic, 0): 2}
        assert worker._partition_bytes == {}
    finally:
        await close_unstarted(worker)


async def test_a_fetch_takes_a_share_of_every_partition_that_has_messages() -> None:
    """aiokafka hands out one partition's prefetched records before the next's: a fetch filled the
    buffer from one partition, whose messages name few tickets, and each ticket's events run one at
    a time, so at 20 ms API latency ~110 of the 256 slots were busy. What a partition cannot fill
    goes to the others."""
    settings = worker_settings()
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]
    parts = [TopicPartition(settings.input_topic, p) for p in range(4)]
    member = Prefetched({parts[0]: 100, parts[1]: 1, parts[2]: 1, parts[3]: 100})
    real, consumer._consumer = consumer._consumer, member  # type: ignore[assignment]
    try:
        taken = Counter(m.partition for m in await consumer.fetch(12, 0.1))
        assert taken == {0: 5, 1: 1, 2: 1, 3: 5}

        member.pause(parts[3])  # held: never touched, so its prefetched records stay
        for _ in range(30):
            await consumer.fetch(12, 0.01)
        member.pause(*parts)  # every partition held: a fetch still polls, touching none
        assert await consumer.fetch(12, 0.01) == []
        assert await consumer.fetch(0, 0.0) == []  # the keep-alive poll of a paused worker
        assert not member.dropped
        assert len(member.buffered[parts[3]]) == 95
    finally:
        await real.stop()


async def test_a_fetch_error_met_after_other_partitions_gave_their_share_loses_none_of_theirs() -> None:
    """A partition moves past the records it hands out: an error raised over the records earlier
    partitions had given lost them, and the commit later passed them by. The error comes with the
    next fetch, as aiokafka's own ``getmany`` does."""
    settings = worker_settings()
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]
    parts = [TopicPartition(settings.input_topic, p) for p in range(3)]
    member = Prefetched(dict.fromkeys(parts, 20))
    real, consumer._consumer = consumer._consumer, member  # type: ignore[assignment]
    received: list[tuple[int, int]] = []
    errors = 0
    try:
        for turn in range(30):
            if turn in (1, 2):
                member.fail.add(parts[1])  # met first in one fetch, after others in another
            try:
                received += [(m.partition, m.offset) for m in await consumer.fetch(6, 0.01)]
            except BrokerUnavailable:
                errors += 1
        assert errors == 2
        assert sorted(received) == sorted(member.handed_out)
        assert len(received) == 60
    finally:
        await real.stop()


def _record_batch(base: int, count: int, *, corrupt: bool = False) -> bytes:
    """A real v2 record batch of ``count`` records from offset ``base``; ``corrupt``: its CRC broken."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i in range(count):
        builder.append(i, timestamp=None, key=b"CM1", value=b"{}", headers=[])
    raw = builder.build()
    raw[0:8] = base.to_bytes(8, "big")
    if corrupt:
        raw[-1] ^= 0xFF
    return bytes(raw)


class RealFetcher(GroupMember):
    """aiokafka's own ``Fetcher.fetched_records`` over records this stand-in buffers as a fetch
    response would (a batch of five per partition from its position, one ``corrupt`` batch first):
    the positions move, and the errors come out, exactly as in the client."""

    def __init__(self, partitions: list[TopicPartition], corrupt: TopicPartition) -> None:
        super().__init__(set(partitions))
        self.partitions = partitions
        self.corrupt = {corrupt}
        self.state = Assignment(set(partitions))
        for tp in partitions:
            self.state.state_value(tp).seek(0)
        self.records: dict[TopicPartition, FetchResult] = {}
        self.fetcher = SimpleNamespace(
            _subscriptions=SimpleNamespace(reassignment_in_progress=False, is_assigned=lambda tp: True),
            _records=self.records,
            _notify=lambda future: None,
            _wait_consume_future=None,
        )

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.state.state_value(tp).seek(offset)
        self.records.pop(tp, None)

    async def committed(self, tp: TopicPartition) -> int | None:
        return None

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 0)

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int | None = None
    ) -> Any:
        if timeout_ms:  # the waiting getmany: a fetch response came in meanwhile
            for tp in self.partitions:
                if tp not in self.records:
                    position = self.state.state_value(tp).position
                    raw = _record_batch(position, 5, corrupt=tp in self.corrupt)
                    self.corrupt.discard(tp)
                    records = PartitionRecords(tp, MemoryRecords(raw), None, position, None, None, True, 0)
                    self.records[tp] = FetchResult(
                        tp, assignment=self.state, partition_records=records, backoff=0
                    )
        return await Fetcher.fetched_records(self.fetcher, partitions, 0, max_records=max_records)  # type: ignore[arg-type]


async def test_a_batch_the_client_cannot_decode_loses_none_of_the_records_drained_before_it() -> None:
    """A CRC mismatch, or a compressed batch whose codec the client lacks, raises out of aiokafka's
    getmany after it drained other partitions (and earlier batches of its own), moving their
    positions past records it never returned: those got no job and no outcome, and the commit
    passed them by. Each partition is now read again from the message after the last handed up."""
    settings = worker_settings()
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]
    parts = [TopicPartition(settings.input_topic, p) for p in range(2)]
    member = RealFetcher(parts, corrupt=parts[1])
    real, consumer._consumer = consumer._consumer, member  # type: ignore[assignment]
    received: list[tuple[int, int]] = []
    errors = 0
    try:
        for _ in range(6):
            try:
                received += [(m.partition, m.offset) for m in await consumer.fetch(100, 0.1)]
            except BrokerUnavailable:
                errors += 1
    finally:
        await real.stop()
    assert errors == 1
    for tp in parts:
        offsets = [offset for partition, offset in received if partition == tp.partition]
        assert offsets == list(range(len(offsets))), offsets  # every one, once, in order
        assert len(offsets) >= 10


async def test_a_stopping_worker_keeps_polling_while_it_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka leaves the group of a member that has not polled for ``kafka_max_poll_interval_ms``
    (10 s at least), and the shutdown's drain (25 s by default) polled nothing: a long drain lost
    the group, and the broker refused the final commit. The drain polls as a paused worker does,
    touching none of the prefetched records."""
    monkeypatch.setattr(app_module, "_FETCH_TIMEOUT_S", 0.01)
    worker = make_worker(tmp_path)
    tp = TopicPartition(worker.settings.input_topic, 0)
    member = Prefetched({tp: 10})
    real, worker._consumer._consumer = worker._consumer._consumer, member
    release = holding_jobs(worker).release
    try:
        await worker.on_assigned({(tp.topic, tp.partition)})
        worker._dispatch(Message(tp.topic, 0, 0, None, b"{}", [], 0))
        worker._consumer.pause()
        assert not await worker._drain(0.2)  # the job holds on: the grace runs out
        assert len(member.asked) >= 5
        assert all(asked and tp not in asked for asked in member.asked)
        assert not member.dropped

        release.set()
        assert await worker._drain(2)
    finally:
        release.set()
        await close_unstarted(worker, real)


async def test_a_partition_whose_offsets_went_back_starts_over_after_its_jobs(tmp_path: Path) -> None:
    """The log was truncated (an unclean leader election; the topic recreated) and aiokafka went
    back to its start: the messages at the lower offsets are new ones. They were dropped as "seen
    twice": no outcome, and the commit of a later offset went past them."""
    worker = make_worker(tmp_path)
    key = (worker.settings.input_topic, 0)
    tp = TopicPartition(*key)
    real, group = worker._consumer._consumer, GroupMember({tp})
    worker._consumer._consumer = group
    pipeline = holding_jobs(worker)
    try:
        await worker.on_assigned({key})
        for offset in (5, 6, 0, 1):  # 0 and 1: the new log's
            worker._dispatch(Message(key[0], 0, offset, None, b"{}", [], 0))
        await until(lambda: len(pipeline.started) == 2)
        assert [job.message.offset for job in pipeline.started] == [5, 6]
        assert group.paused_now == {tp}  # nothing more of it until the old log's jobs are done
        assert group.seeks == []

        pipeline.release.set()
        await until(lambda: group.seeks == [(tp, 0)])
        assert group.paused_now == set()
        assert worker._offsets.to_commit() == {key: 0}  # tracked afresh: the new log's start
        worker._dispatch(Message(key[0], 0, 0, None, b"{}", [], 0))  # read again, and taken now
        await until(lambda: [job.message.offset for job in pipeline.started] == [5, 6, 0])
    finally:  # never started: only the clients' objects to close
        await close_unstarted(worker, real)


class EachOwnRelease:
    """A pipeline whose jobs each wait for their own offset's release."""

    def __init__(self) -> None:
        self.go: dict[int, asyncio.Event] = {}
        self.handed_on = nothing_to_hand_on

    async def process(self, job: Job) -> None:
        await self.go.setdefault(job.message.offset, asyncio.Event()).wait()


async def old_log_still_running(worker: Worker, key: PartitionKey) -> EachOwnRelease:
    """The partition's jobs at 5 and 6 running when its log goes back (0, the new log's)."""
    pipeline = EachOwnRelease()
    worker._pipeline = pipeline  # type: ignore[assignment]
    await worker.on_assigned({key})
    for offset in (5, 6, 0):
        worker._dispatch(Message(key[0], 0, offset, b"t%d" % offset, b"{}", [], 0))
    await until(lambda: {5, 6} <= set(pipeline.go), what="the old log's jobs")
    return pipeline


async def test_what_is_committed_while_a_partition_starts_over_is_the_new_logs_start(tmp_path: Path) -> None:
    """Jobs of the old log still ran when the log went back: a periodic commit sent the old log's
    watermark (6), a position the new log had not reached; the next owner, or the worker
    restarted, began there, and the new log's first messages never had an outcome."""
    worker = make_worker(tmp_path)
    key = (worker.settings.input_topic, 0)
    async with member_in_place(worker, GroupMember({TopicPartition(*key)})) as commits:
        pipeline = await old_log_still_running(worker, key)
        pipeline.go[5].set()
        await worker._commit()
        assert commits == [{key: 0}]
        pipeline.go[6].set()
        await until(lambda: key not in worker._rewinding, what="the start over")
        await worker._commit()
        assert commits == [{key: 0}]  # nothing of the old log, and nothing new yet


async def test_a_revoke_while_a_partition_starts_over_commits_the_new_logs_start(tmp_path: Path) -> None:
    """The revoke waits for the old log's jobs, then commits: it committed their watermark (7),
    and the next owner skipped the new log's messages below it."""
    worker = make_worker(tmp_path, revoke_grace_s=5.0)
    key = (worker.settings.input_topic, 0)
    async with member_in_place(worker, GroupMember({TopicPartition(*key)})) as commits:
        pipeline = await old_log_still_running(worker, key)
        revoking = asyncio.create_task(worker.on_revoked({key}))
        pipeline.go[5].set()
        pipeline.go[6].set()
        await revoking
    assert commits == [{key: 0}]


async def test_records_read_before_a_rebalance_during_the_same_fetch_are_not_handed_up() -> None:
    """A fetch asks each partition in turn, and a call waits while a rebalance runs. What earlier
    calls had read belongs to the old assignment: the new one reads it again from the last commit.
    Handed up, it was taken by the new assignment's offsets, and when it came again the partition
    looked as if its offsets had gone back (a start-over, and each message answered twice)."""
    settings = worker_settings()
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]
    parts = [TopicPartition(settings.input_topic, p) for p in range(3)]

    class RebalancedDuringSecondCall(Prefetched):
        before: list[tuple[int, int]] = []

        async def getmany(
            self, *partitions: TopicPartition, timeout_ms: int, max_records: int | None = None
        ) -> dict[TopicPartition, list[SimpleNamespace]]:
            if len(self.asked) == 1:
                self.before = list(self.handed_out)
                consumer._rebalanced()  # as the listener does, while this call waits
            return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)

    member = RebalancedDuringSecondCall(dict.fromkeys(parts, 10))
    real, consumer._consumer = consumer._consumer, member  # type: ignore[assignment]
    try:
        fetched = [(m.partition, m.offset) for m in await consumer.fetch(12, 0.1)]
        assert member.before  # the first call read some
        assert fetched  # and later calls some more
        assert not set(fetched) & set(member.before)
        assert sorted(fetched) == sorted(set(member.handed_out) - set(member.before))
        assert consumer._next == {(settings.input_topic, p): o + 1 for p, o in sorted(fetched)}
    finally:
        await real.stop()


def ready_gauge(worker: Worker) -> float | None:
    return worker.metrics.registry.get_sample_value("coc_worker_ready")


async def test_readiness_stays_off_while_every_fetch_fails_though_the_broker_answers(tmp_path: Path) -> None:
    """The health watcher's metadata request is answered while every fetch fails (a topic's ACL
    revoked, the client's coordination gone): it set the worker ready again every 2 s."""
    worker = make_worker(tmp_path)
    pings = 0

    async def answers(timeout_s: float = 3.0) -> set[str]:
        nonlocal pings
        pings += 1
        return listed_topics(worker)

    async def fails(max_records: int, timeout_s: float) -> list[Message]:
        raise BrokerUnavailable("fetch failed: TopicAuthorizationFailedError")

    worker._consumer.ping = answers  # type: ignore[method-assign]
    worker._consumer.fetch = fails  # type: ignore[method-assign]
    worker._consumer.highwater = lambda key: None  # type: ignore[method-assign]  # never started
    monitor = asyncio.create_task(worker._watch_health())
    try:
        await worker.on_assigned({(worker.settings.input_topic, 0)})
        await until(lambda: pings >= 1)
        assert worker.ready  # the broker answers, nothing fetched yet
        stopping = asyncio.get_running_loop().call_later(0.05, worker._stopping.set)  # ends the 1 s wait
        await worker._poll(10, 0.1)
        stopping.cancel()
        worker._stopping.clear()
        seen = pings
        await until(lambda: pings >= seen + 1, timeout_s=5)
        assert not worker.ready
        # Not paused, no topic missing: only a gauge of readiness shows it in the metrics.
        assert ready_gauge(worker) == 0.0
        assert worker.metrics.registry.get_sample_value("coc_worker_paused") == 0.0

        async def works(max_records: int, timeout_s: float) -> list[Message]:
            return []

        worker._consumer.fetch = works  # type: ignore[method-assign]
        await worker._poll(10, 0.1)
        assert worker.ready  # at once, not at the next health tick
        assert ready_gauge(worker) == 1.0
    finally:
        await cancel_and_wait([monitor])
        await close_unstarted(worker)


async def test_a_broker_gone_while_the_worker_is_idle_pauses_it(tmp_path: Path) -> None:
    """An idle worker writes nothing, so no outcome's write trips the gate: with the broker away
    only /readyz said so, ``coc_worker_paused`` stayed 0 and the README's pause alert never fired.
    Two failed health checks in a row pause it (one slow answer is no outage); the first answered
    one probes at once, not after the probe's backoff (up to 30 s)."""
    worker = make_worker(tmp_path)
    worker._broker_answered = True  # as after the start
    worker._gate._probe_base_s = 60.0  # the prober's own next try is far off
    away = True

    async def ping(timeout_s: float = 3.0) -> set[str]:
        if away:
            raise BrokerUnavailable("metadata not answered within 3 s")
        return listed_topics(worker)

    worker._consumer.ping = ping  # type: ignore[method-assign]
    worker._consumer.highwater = lambda key: None  # type: ignore[method-assign]  # never started
    try:
        await worker._check_health()
        assert not worker._broker_ok  # not ready at once
        assert worker._gate.is_open
        await worker._check_health()
        assert not worker._gate.is_open
        assert worker.metrics.paused._value.get() == 1
        assert worker.metrics.pauses.labels(kind="broker_unavailable")._value.get() == 1
        away = False
        await worker._check_health()
        await asyncio.wait_for(worker._gate.wait_open(), 5)
        assert worker.metrics.paused._value.get() == 0
        assert worker._broker_ok
    finally:
        await close_unstarted(worker)


async def test_a_topic_the_broker_lists_no_more_makes_the_worker_not_ready(tmp_path: Path) -> None:
    """A broker that lost its data answered with no topics: the worker stayed ready with
    partitions of a topic that was gone, and nothing was logged (operator review)."""
    worker = make_worker(tmp_path)
    worker._assigned = {(worker.settings.input_topic, 0)}
    listed = listed_topics(worker)

    async def ping(timeout_s: float = 3.0) -> set[str]:
        return set(listed)

    worker._consumer.ping = ping  # type: ignore[method-assign]
    worker._consumer.highwater = lambda key: None  # type: ignore[method-assign]
    try:
        await worker._check_health()
        assert worker.ready
        listed.discard(worker.settings.input_topic)
        with capture_logs() as logs:
            await worker._check_health()
            await worker._check_health()  # said once, not every check
        assert not worker.ready
        assert worker.metrics.topics_missing._value.get() == 1  # an alert can see it, not only a probe
        assert worker.status()["topics_missing"] == [worker.settings.input_topic]
        assert [(e["event"], e["topics"]) for e in logs] == [
            ("topics_missing", {"COC_WORKER_INPUT_TOPIC": worker.settings.input_topic})
        ]
        listed.add(worker.settings.input_topic)
        await worker._check_health()
        assert worker.ready
        assert worker.metrics.topics_missing._value.get() == 0
    finally:
        await close_unstarted(worker)


async def test_with_create_topics_a_topic_the_broker_lost_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker restarted without its data: the worker started with --create-topics stayed not
    ready for good (on-call review); it makes the topics again, as at start."""
    worker = make_worker(tmp_path, create_topics=True)
    worker._assigned = {(worker.settings.input_topic, 0)}
    listed = listed_topics(worker) - {worker.settings.results_topic}
    made: list[list[str]] = []

    async def ping(timeout_s: float = 3.0) -> set[str]:
        return set(listed)

    async def ensure_topics(settings: Any, topics: Any = None) -> list[str]:
        wanted = sorted({settings.input_topic, settings.results_topic, settings.dlq_topic} - listed)
        made.append(wanted)
        listed.update(wanted)
        return wanted

    worker._consumer.ping = ping  # type: ignore[method-assign]
    worker._consumer.highwater = lambda key: None  # type: ignore[method-assign]
    monkeypatch.setattr("worker.app.ensure_topics", ensure_topics)
    try:
        with capture_logs() as logs:
            await worker._check_health()
            await worker._check_health()
        assert made == [[worker.settings.results_topic]]
        assert [e["event"] for e in logs] == ["topics_missing", "topics_created", "topics_listed_again"]
        assert worker.ready
    finally:
        await close_unstarted(worker)


async def test_a_fetch_after_the_clients_coordination_ended_stops_the_worker() -> None:
    """aiokafka's coordination task, once done, raises its error from every later fetch and is
    never started again: the worker retried for ever, with no heartbeat and no commit, while
    ``/healthz`` said alive. Now that fetch ends the worker (exit 1, to be started afresh)."""
    settings = worker_settings()
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]
    member = CoordinationEnded({TopicPartition(settings.input_topic, 0)})
    real, consumer._consumer = consumer._consumer, member  # type: ignore[assignment]
    try:
        await member.ended()
        with pytest.raises(KafkaClientStopped, match="restart"):
            await consumer.fetch(10, 0.1)
    finally:
        await real.stop()


async def test_a_stop_after_the_group_coordination_ended_still_drains_and_commits(tmp_path: Path) -> None:
    """The shutdown that follows the end of aiokafka's coordination (exit 1) polled while its jobs
    finished, met the same error and stopped at that first step: the jobs in hand lost their
    grace, nothing was committed and no client was stopped. Polling stops; the rest runs."""
    worker = make_worker(tmp_path, shutdown_grace_s=3.0)
    key = (worker.settings.input_topic, 0)
    member = CoordinationEnded({TopicPartition(*key)})
    pipeline = holding_jobs(worker)
    async with member_in_place(worker, member) as commits:
        try:
            await member.ended()
            await worker.on_assigned({key})
            worker._dispatch(Message(key[0], 0, 7, None, b"{}", [], 0))
            await until(lambda: len(pipeline.started) == 1)
            stopping = asyncio.ensure_future(worker._shutdown())
            await until(lambda: member.polls >= 1 or stopping.done())  # the drain's poll has failed
            pipeline.release.set()  # the job in hand ends within its grace
            await asyncio.wait_for(stopping, 10)  # raised KafkaClientStopped at that poll
            assert commits == [{key: 8}]
        finally:
            pipeline.release.set()


async def test_a_second_stop_request_does_not_wait_out_the_grace(tmp_path: Path) -> None:
    """A worker paused on an outage has jobs that cannot finish: its stop waited the whole grace
    (25 s by default), and a second Ctrl-C or SIGTERM changed nothing. The second request stops
    the waiting; the jobs are cancelled as after the grace, and what finished is committed."""
    worker = make_worker(tmp_path, shutdown_grace_s=60.0)
    key = (worker.settings.input_topic, 0)
    member = Polled({TopicPartition(*key)})
    pipeline = holding_jobs(worker)
    async with member_in_place(worker, member) as commits:
        try:
            await worker.on_assigned({key})
            worker._dispatch(Message(key[0], 0, 7, None, b"{}", [], 0))
            # another whose outcome is written and whose dead letter is owed (its topic away)
            worker._dispatch(Message(key[0], 0, 8, b"T8", b"{}", [], 0))
            await until(lambda: len(pipeline.started) == 2)
            pipeline.started[1].outcome_written = True
            worker.stop()
            stopping = asyncio.ensure_future(worker._shutdown())
            await until(lambda: member.polls >= 1)  # draining: waiting for the job in hand
            assert not stopping.done()
            with capture_logs() as logs:
                worker.stop()  # asked again
                await asyncio.wait_for(stopping, 10)  # not the 60 s grace
            assert not pipeline.release.is_set()  # the job never finished: cancelled
            # The one without an outcome is counted and named; the other is counted as an outcome.
            assert (abandoned(worker, "stopped"), abandoned(worker, "revoked")) == (1, 0)
            [given_up] = [e for e in logs if e["event"] == "shutdown_grace_exceeded"]
            assert given_up["offsets"] == {f"{key[0]}/0": "7-7 (1)"}
            assert commits == [{key: 7}]  # up to the job, not past it: the next owner reads it again
        finally:
            pipeline.release.set()


async def test_a_stop_while_the_jobs_in_hand_wait_at_the_closed_gate_does_not_wait_out_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker paused on an outage (here the API unreachable) has jobs that cannot finish before
    it ends: a stop (a rolling update, a drained node) waited out the whole grace (25 s by
    default). Now the stop waits for the jobs still at work, then a short while (5 s, 0.2 s here)
    for the pause to end; then the jobs waiting at the gate, or for a job of their event that
    does, are cancelled, what finished is committed, and the rest is read again by the next owner."""
    monkeypatch.setattr(app_module, "_PAUSED_STOP_WAIT_S", 0.2)
    worker = make_worker(tmp_path, shutdown_grace_s=60.0)
    key = (worker.settings.input_topic, 0)
    member = Polled({TopicPartition(*key)})
    at_work = asyncio.Event()  # set: the job at offset 8 finishes
    started: list[int] = []

    async def process(job: Job) -> None:
        started.append(job.message.offset)
        if job.message.offset == 8:
            await at_work.wait()
        elif job.message.offset == 9:  # its event is in hand at 7, which waits at the gate
            pipeline.waiting_on_other_jobs += 1
            try:
                await asyncio.Event().wait()
            finally:
                pipeline.waiting_on_other_jobs -= 1
        else:
            await worker._gate.wait_open()

    async def still_down() -> None:
        raise ApiUnreachable("still down")

    pipeline = processing_with(worker, process)
    async with member_in_place(worker, member) as commits:
        try:
            await worker.on_assigned({key})
            worker._gate.trip(ApiUnreachable("connect refused"), still_down)
            for offset in (7, 8, 9):  # keyless: in lanes of their own
                worker._dispatch(Message(key[0], 0, offset, None, b"{}", [], 0))
            await until(lambda: sorted(started) == [7, 8, 9])
            worker.stop()
            with capture_logs() as logs:
                stopping = asyncio.ensure_future(worker._shutdown())
                await until(lambda: member.polls >= 1)  # draining: the job at 8 is still at work
                assert not stopping.done()
                at_work.set()
                await asyncio.wait_for(stopping, 10)  # not the 60 s grace
            assert commits == [{key: 7}]  # 8 finished, 7 did not: read again by the next owner
            assert [e["paused_by"] for e in logs if e["event"] == "shutdown_while_paused"] == [
                ["api_unreachable"]
            ]
            assert not any(e["event"] == "shutdown_grace_exceeded" for e in logs)
        finally:
            at_work.set()


@pytest.mark.parametrize("probe_backoff_s", [None, 30.0], ids=["default backoff", "next probe 15-30 s away"])
async def test_a_pause_that_ends_soon_after_a_stop_lets_the_jobs_waiting_for_it_finish(
    tmp_path: Path, probe_backoff_s: float | None
) -> None:
    """A stop during a short outage (a Redis failover, a leader election) does not cancel the jobs
    waiting at the gate at once: the pause ends within the stop's wait for it, and they finish.
    Whatever the probes' backoff (up to ``COC_WORKER_PROBE_MAX_DELAY_S``, 30 s): an outage that
    ended 1 s into the stop's 5 s wait was seen only at the next probe, after the jobs it held had
    been cancelled; a stop now probes every cause each turn of that wait."""
    worker = make_worker(tmp_path, shutdown_grace_s=60.0)
    if probe_backoff_s is not None:
        worker._gate._probe_base_s = worker._gate._probe_max_s = probe_backoff_s
    key = (worker.settings.input_topic, 0)
    member = Polled({TopicPartition(*key)})
    back = asyncio.Event()  # set: the store answers again
    finished: list[int] = []

    async def process(job: Job) -> None:
        await worker._gate.wait_open()
        finished.append(job.message.offset)

    async def store_probe() -> None:
        if not back.is_set():
            raise DedupUnavailable("failing over")

    processing_with(worker, process)
    async with member_in_place(worker, member) as commits:
        await worker.on_assigned({key})
        worker._gate.trip(DedupUnavailable("failing over"), store_probe)
        worker._dispatch(Message(key[0], 0, 7, None, b"{}", [], 0))
        await until(lambda: worker._gate.waiting == 1)
        worker.stop()
        with capture_logs() as logs:
            stopping = asyncio.ensure_future(worker._shutdown())
            await until(lambda: member.polls >= 3)  # 1 s into the wait
            back.set()
            await asyncio.wait_for(stopping, 10)
        assert finished == [7]
        assert commits == [{key: 8}]
        assert not any(e["event"] == "shutdown_while_paused" for e in logs)


async def test_a_stop_closes_the_dedup_store_only_once_the_cancelled_jobs_claims_are_handed_on(
    tmp_path: Path,
) -> None:
    """A job cancelled twice (a revoke's cancellation, then the stop's) ends at once while its
    claim is still being handed on (``Pipeline._let_go``): the stop must not close the store under
    that call, or the claim is kept for its whole lease after all."""
    worker = make_worker(tmp_path)
    member = Polled({TopicPartition(worker.settings.input_topic, 0)})
    pipeline = holding_jobs(worker)
    asked, handed_on = asyncio.Event(), asyncio.Event()

    async def still_handing_on() -> None:
        asked.set()
        await handed_on.wait()

    pipeline.handed_on = still_handing_on
    store = worker._store
    assert isinstance(store, SqliteStore)
    async with member_in_place(worker, member):
        stopping = asyncio.ensure_future(worker._shutdown())
        await asyncio.wait_for(asked.wait(), 10)
        assert not store._closed
        handed_on.set()
        await asyncio.wait_for(stopping, 10)
        assert store._closed


async def test_a_stop_does_not_probe_a_flapping_pause_each_turn(tmp_path: Path) -> None:
    """A cause whose probe passes while the work fails (metadata answers, the writes are refused)
    flaps: woken each turn of the stop's wait, the gate reopened, every held job retried and failed
    again 0.7 s later, and the wait began afresh each time until the whole grace ran out. A cause
    back within the flap window is left to its backoff: the stop ends after the 5 s wait."""
    worker = make_worker(tmp_path, shutdown_grace_s=20.0)
    worker._gate._probe_base_s = worker._gate._probe_max_s = 30.0  # the next probe 15-30 s away
    key = (worker.settings.input_topic, 0)
    member = Polled({TopicPartition(*key)})
    tries: list[int] = []  # the job's offset, once per try

    async def passes() -> None:
        return None

    async def process(job: Job) -> None:
        while True:
            await worker._gate.wait_open()
            tries.append(job.message.offset)
            await asyncio.sleep(0.7)  # the write that is refused again, after a while
            worker._gate.trip(BrokerUnavailable("writes refused"), passes)

    processing_with(worker, process)
    async with member_in_place(worker, member):
        await worker.on_assigned({key})
        worker._gate.trip(BrokerUnavailable("writes refused"), passes)
        worker._dispatch(Message(key[0], 0, 7, None, b"{}", [], 0))
        await until(lambda: worker._gate.waiting == 1)
        worker.stop()
        with capture_logs() as logs:
            await asyncio.wait_for(worker._shutdown(), 15)  # not the 20 s grace
        assert [e["event"] for e in logs if e["event"].startswith("shutdown_")] == ["shutdown_while_paused"]
        assert len(tries) <= 2  # woken once, then left to its backoff


async def test_a_producer_whose_sender_ended_stops_the_worker(tmp_path: Path) -> None:
    """aiokafka's producer fails every send with a copy of its sender task's error once that task
    has ended (a refused InitProducerId, an unrecoverable sequence error), and never starts it
    again, while metadata requests (the gate's probe) pass: the worker paused for ever with
    ``/healthz`` alive. Now the consume loop stops it (exit 1, to be started afresh)."""
    worker = make_worker(tmp_path)
    assert worker._publisher.ended() is None

    async def refused() -> None:
        raise KafkaError("ClusterAuthorizationFailedError: InitProducerId refused")

    sender = worker._publisher._producer._sender
    sender._sender_task = asyncio.ensure_future(refused())
    try:
        await asyncio.gather(sender._sender_task, return_exceptions=True)
        assert "InitProducerId refused" in (worker._publisher.ended() or "")
        with pytest.raises(KafkaClientStopped, match=r"producer's sender ended .*restart"):
            await asyncio.wait_for(worker._consume(), 5)
    finally:
        sender._sender_task = None
        await close_unstarted(worker)


async def test_a_stop_during_the_start_ends_it_at_once(tmp_path: Path) -> None:
    """A stop was ignored until the start finished: against a broker that takes connections and
    never answers, each broker step of the start waited 40 s per bootstrap server (past the pod's
    termination grace), then the stop ended as a start failure (exit 1)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    worker = make_worker(tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{port}", http_port=0)
    try:
        running = asyncio.create_task(worker.run())
        await until(lambda: worker.http_port is not None)  # the start is under way
        worker.stop()
        await asyncio.wait_for(running, 10)  # returned, and without an error
        assert not worker.started.is_set()
    finally:
        server.close()


async def test_a_start_without_a_broker_gives_up_after_the_startup_wait(tmp_path: Path) -> None:
    """Nothing listens at the bootstrap address: the start tries again, says what it waits for,
    and ends with the broker's error (exit 1) once ``startup_wait_s`` has passed, not before."""
    dead = free_port()
    worker = make_worker(
        tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{dead}", http_port=0, startup_wait_s=1.5
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    with capture_logs() as logs:
        running = asyncio.create_task(worker.run())
        await until(lambda: worker.status()["waiting_for"] == "broker", timeout_s=10)
        assert not worker.status()["ready"]
        with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{dead}"):
            await asyncio.wait_for(running, 20)
    assert loop.time() - began >= 1.5
    waits = [line for line in logs if line["event"] == "waiting_for_dependency"]
    assert len(waits) >= 2  # tried again, with the setting named
    assert {line["dependency"] for line in waits} == {"broker"}
    assert waits[0]["setting"] == "COC_WORKER_STARTUP_WAIT_S"


async def test_an_ingress_tried_again_at_start_says_its_settings_once(tmp_path: Path) -> None:
    """The ingress's start is tried again while the broker is away: its warning about running
    without tokens is said once, not at every try."""
    worker = make_worker(
        tmp_path,
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
        http_port=0,
        ingest_enabled=True,
        ingest_allow_anonymous=True,
        startup_wait_s=1.0,
    )
    with capture_logs() as logs, pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(worker.run(), 20)
    assert len([line for line in logs if line["event"] == "waiting_for_dependency"]) >= 2
    assert len([line for line in logs if line["event"] == "ingest_auth_disabled"]) == 1


async def test_a_start_with_no_startup_wait_gives_up_at_once(tmp_path: Path) -> None:
    worker = make_worker(
        tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", http_port=0, startup_wait_s=0
    )
    with capture_logs() as logs, pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(worker.run(), 20)
    assert not [line for line in logs if line["event"] == "waiting_for_dependency"]


async def test_a_start_gives_up_on_a_broker_that_never_answers_when_the_wait_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One try against a broker that takes connections and never answers lasted 40 s per
    bootstrap server, past the startup wait (and the startup probe's allowance): each try is
    bounded by what is left of the wait (review)."""
    monkeypatch.setattr(retry_module, "_STARTUP_LAST_TRY_S", 0.2)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    worker = make_worker(
        tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{port}", http_port=0, startup_wait_s=0.5
    )
    try:
        with pytest.raises(BrokerUnavailable, match=r"no answer within COC_WORKER_STARTUP_WAIT_S=0\.5 s"):
            await asyncio.wait_for(worker.run(), 20)
    finally:
        server.close()


async def test_a_local_dedup_store_that_fails_at_start_is_not_waited_for(tmp_path: Path) -> None:
    """A sqlite file that cannot be opened will not open by waiting: the start ends at once."""
    (tmp_path / "not-a-dir").write_text("a file where the store's directory should be")
    worker = make_worker(
        tmp_path,
        dedup_url=f"sqlite:///{tmp_path}/not-a-dir/d.sqlite3",
        http_port=0,
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
    )
    with capture_logs() as logs, pytest.raises(DedupUnavailable):
        await asyncio.wait_for(worker.run(), 20)
    assert not [line for line in logs if line["event"] == "waiting_for_dependency"]


async def test_a_start_waits_for_the_dedup_store_and_goes_on_when_it_answers(tmp_path: Path) -> None:
    """A Redis dedup store is tried again as the broker is; once it answers, the start goes on to
    the next step (here the broker, which is not there either)."""
    worker = make_worker(
        tmp_path,
        dedup_url=f"redis://127.0.0.1:{free_port()}/0",
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
        http_port=0,
    )
    pings = 0

    async def away_twice() -> None:
        nonlocal pings
        pings += 1
        if pings <= 2:
            raise DedupUnavailable("redis dedup store: Error 111 connecting to 127.0.0.1:6390")

    worker._store.ping = away_twice  # type: ignore[method-assign]
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.status()["waiting_for"] == "dedup_store", timeout_s=10)
        await until(lambda: worker.status()["waiting_for"] == "broker", timeout_s=10)
        assert pings == 3
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10)
    assert not worker.started.is_set()


async def test_the_workers_redis_clients_log_in_with_the_password_setting(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """The dedup store and the shared rate limit, the worker's two Redis clients, both log in with
    COC_WORKER_DEDUP_REDIS_PASSWORD to a Redis that wants a password; a wrong one ends the start
    with the login refused, and no line, field or error holds either password."""
    password = own_redis.require_password()
    worker = make_worker(
        tmp_path, dedup_url=own_redis.url, dedup_redis_password=password, api_rate_limit_per_s=50
    )
    assert isinstance(worker._rate_limit, RedisTokenBucket)
    try:
        await worker._store.ping()
        with capture_logs() as logs:
            await asyncio.wait_for(worker._rate_limit.acquire(), 5)
        assert logs == []  # no "rate_limit_local": Redis took the reservation
    finally:
        await worker._rate_limit.close()
        await close_unstarted(worker)
    wrong = f"wrong-{password}"
    worker = make_worker(
        tmp_path,
        dedup_url=own_redis.url,
        dedup_redis_password=wrong,
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
        http_port=0,
        startup_wait_s=0.5,
    )
    with capture_logs() as logs, pytest.raises(DedupUnavailable) as failed:
        await asyncio.wait_for(worker.run(), 20)
    waited = [line for line in logs if line["event"] == "waiting_for_dependency"]
    assert waited
    assert "refused the login: AuthenticationError" in waited[0]["detail"]
    said = repr(logs) + str(failed.value) + repr(worker.settings)
    assert password not in said  # the wrong one holds the right one: both checked


async def test_the_health_watcher_survives_an_unexpected_error(tmp_path: Path) -> None:
    """An unexpected exception ended the watcher's task without a word, and readiness and the lag
    metric froze at their last values for the life of the process."""
    worker = make_worker(tmp_path)
    pings = 0

    async def answers(timeout_s: float = 3.0) -> set[str]:
        nonlocal pings
        pings += 1
        return listed_topics(worker)

    def broken(key: tuple[str, int]) -> int | None:
        raise AssertionError("not assigned")  # as aiokafka's highwater does for a stale partition

    worker._consumer.ping = answers  # type: ignore[method-assign]
    worker._consumer.highwater = broken  # type: ignore[method-assign]
    monitor = asyncio.create_task(worker._watch_health())
    try:
        await worker.on_assigned({(worker.settings.input_topic, 0)})
        await until(lambda: pings >= 2, timeout_s=5)  # still checking after the first failure
        assert not monitor.done()
    finally:
        await cancel_and_wait([monitor])
        await close_unstarted(worker)


async def test_the_adaptive_api_limit_starts_at_the_clients_connection_limit(tmp_path: Path) -> None:
    """It started at max_in_flight whatever COC_WORKER_API_MAX_CONNECTIONS said: with fewer
    connections, calls queued inside the HTTP client with their timeout running."""
    worker = make_worker(tmp_path, max_in_flight=64, api_max_connections=8)
    try:
        assert worker._pipeline._caller._concurrency.limit == 8
    finally:
        await close_unstarted(worker)
    worker = make_worker(tmp_path, max_in_flight=64)
    try:
        assert worker._pipeline._caller._concurrency.limit == 64
    finally:
        await close_unstarted(worker)
