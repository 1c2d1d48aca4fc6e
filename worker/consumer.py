"""Read the input topic as a member of the consumer group, with manual commits.

The only module that drives ``AIOKafkaConsumer``. It hands plain ``Message`` values upward,
forwards rebalances to a handler (awaited inside the group protocol, so revoked partitions can be
drained and committed before another member takes them), and turns Kafka errors into
``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from worker.errors import BrokerUnavailable, KafkaClientStopped
from worker.kafka_config import broker_answers, cannot_connect, connection_kwargs, record_limit_bytes
from worker.logs import get_logger
from worker.offsets import PartitionKey
from worker.settings import COMMIT_TIMEOUT_S, WorkerSettings

log = get_logger(__name__)

#: aiokafka's own default for a request's answer.
_AIOKAFKA_REQUEST_TIMEOUT_MS = 40_000

Headers = list[tuple[str, bytes]]
_Batches = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

#: How long a partition read again after an unreadable record is waited for, one record at a time.
_STEP_WAIT_MS = 200
#: How long a partition's committed or earliest offset is waited for before reading it again.
_LOOKUP_S = 3.0
_UNREADABLE = (
    "the Kafka client cannot read this record, or one before it in its record batch (a header key"
    " that is not UTF-8, which the Kafka protocol requires): its key, value and headers are only in"
    " the input topic, at this offset"
)

#: Named to ``getmany`` by a poll that must take nothing: no member is ever assigned it, so aiokafka
#: touches none of the records it has prefetched.
_NO_PARTITION = TopicPartition("", -1)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    #: Why the client could not read this record (then its key, value and headers are unknown).
    unreadable: str | None = None

    @property
    def partition_key(self) -> PartitionKey:
        return (self.topic, self.partition)


def messages_from(batches: Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]) -> list[Message]:
    """aiokafka's ``getmany`` result as our messages (the library type stays at this edge)."""
    return [
        Message(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or ()), r.timestamp or 0)
        for records in batches.values()
        for r in records
    ]


class RebalanceHandler(Protocol):
    async def on_revoked(self, partitions: set[PartitionKey]) -> None: ...
    async def on_assigned(self, partitions: set[PartitionKey]) -> None: ...


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, handler: RebalanceHandler, rebalanced: Callable[[], None]) -> None:
        self._handler = handler
        self._rebalanced = rebalanced

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._rebalanced()
        await self._handler.on_revoked({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._rebalanced()
        await self._handler.on_assigned({(tp.topic, tp.partition) for tp in assigned})


class Consumer:
    """aiokafka's consumer behind the worker's own terms (``Message``, ``BrokerUnavailable``): a
    group member with manual commits, fetches shared out over the partitions, pauses that keep what
    was prefetched, and unreadable records turned into messages instead of errors."""

    def __init__(self, settings: WorkerSettings, handler: RebalanceHandler) -> None:
        self._settings = settings
        self._handler = handler
        self._consumer = AIOKafkaConsumer(
            **connection_kwargs(settings),
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            rebalance_timeout_ms=settings.kafka_rebalance_timeout_ms,
            # A JoinGroup may wait for the slowest member's revoke: at most the rebalance timeout.
            # aiokafka gives every request 40 s, and timed out such a join (the member then took
            # the coordinator for dead and joined again).
            request_timeout_ms=max(_AIOKAFKA_REQUEST_TIMEOUT_MS, settings.kafka_rebalance_timeout_ms + 5_000),
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            max_partition_fetch_bytes=record_limit_bytes(settings),
        )
        self._paused = False
        #: Paused on their own, whatever ``_paused`` says, and why (``hold``).
        self._held: dict[PartitionKey, str] = {}
        self._turn = 0  # the partition a fetch asks first (``_shares``)
        self._deferred: Exception | None = None  # raised by the next fetch (``_shares``)
        #: Per partition, the offset after the last message handed up (``_read_past_unreadable``).
        self._next: dict[PartitionKey, int] = {}
        #: Partitions a failed fetch may have moved past records it never handed up (``fetch``).
        self._read_again: set[TopicPartition] = set()
        #: Bumped by every rebalance: a fetch that spans one drops what it read before it.
        self._generation = 0

    async def start(self) -> None:
        try:
            await self._consumer.start()
        except KafkaError as exc:
            raise BrokerUnavailable(
                cannot_connect("consumer", self._settings.kafka_bootstrap_servers, exc)
            ) from exc
        self._consumer.subscribe(
            [self._settings.input_topic], listener=_Listener(self._handler, self._rebalanced)
        )

    def _rebalanced(self) -> None:
        self._generation += 1

    async def stop(self) -> None:
        await self._consumer.stop()

    async def fetch(self, max_records: int, timeout_s: float) -> list[Message]:
        """Up to ``max_records`` messages, shared out over the partitions that have some; with
        ``max_records=0`` a poll that takes none (the group sees a member alive by its polls, and
        aiokafka reports its coordinator's errors through them).

        A paused partition is never named to ``getmany``, and neither is "every partition": aiokafka
        drops the records it has prefetched for a paused partition a poll touches. Polled that way
        at each wake-up of a pause (the buffer full, about ten times a second at full load), the
        worker read ~10 times the input's bytes.
        """
        try:
            if self._read_again:
                await self._seek_to_next(self._read_again)
                self._read_again = set()
            try:
                batches = await self._take(max_records, int(timeout_s * 1000))
            except UnicodeDecodeError:
                return await self._read_past_unreadable(max_records)
            except KafkaError:
                # Raised while aiokafka handed out records: a batch it cannot decode (a CRC
                # mismatch, a codec it lacks) after other partitions' records, or earlier ones of
                # its own, were drained and their positions moved past. Raised over them, they were
                # lost, and the commit later passed them by: each is read again from the message
                # after the last one handed up.
                self._read_again = set(self._fetchable()[1])
                raise
        except KafkaError as exc:
            if self._coordination_ended():
                raise KafkaClientStopped(
                    f"the Kafka client's group coordination ended ({type(exc).__name__}): restart"
                ) from exc
            raise BrokerUnavailable(f"fetch failed: {type(exc).__name__}") from exc
        # What one getmany returns is of the assignment it ended in, and _shares drops what its
        # earlier calls read when a rebalance ran since.
        for tp, records in batches.items():
            if records:
                self._next[tp.topic, tp.partition] = records[-1].offset + 1
        return messages_from(batches)

    def _coordination_ended(self) -> bool:
        """aiokafka's coordination task is done: its error comes back from every later fetch
        (``GroupCoordinator.check_errors``), and nothing starts it again."""
        task = getattr(getattr(self._consumer, "_coordinator", None), "_coordination_task", None)
        return isinstance(task, asyncio.Future) and task.done()

    def _fetchable(self) -> tuple[set[TopicPartition], list[TopicPartition]]:
        """The assigned partitions, and those of them not paused, in order."""
        assigned = self._consumer.assignment()
        paused = self._consumer.paused()
        return assigned, sorted(tp for tp in assigned if tp not in paused)

    async def _take(self, max_records: int, wait_ms: int) -> _Batches:
        assigned, partitions = self._fetchable()
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        if max_records <= 0 or (assigned and not partitions):
            await self._consumer.getmany(_NO_PARTITION, timeout_ms=wait_ms)
            return {}
        if len(partitions) > 1:
            shared = await self._shares(partitions, max_records)
            if shared:
                return shared
        # Nothing buffered (or a single partition, or no assignment yet): wait for whichever
        # partition answers first.
        batches: _Batches = await self._consumer.getmany(
            *partitions, timeout_ms=wait_ms, max_records=max_records
        )
        return batches

    async def _read_past_unreadable(self, max_records: int) -> list[Message]:
        """A fetch met a record the client cannot read: aiokafka decodes header keys as UTF-8 and
        raises on any other bytes, which a producer not bound to the protocol may write. Raised, the
        error stopped the worker, and every restart (or member the partition went to) met it again.

        aiokafka has moved past what that fetch had read before the record, without handing it
        over. So every partition is read again from the message after the last one handed up, one
        record at a time, up to the unreadable one: that one becomes a message that says so (an
        ``unreadable`` outcome and dead letter), and reading goes on after it. aiokafka decodes a
        whole record batch to reach any record of it, so the records after it in its batch are
        unreadable to it too, and each becomes such a message in turn. Each partition reads at
        most its share of ``max_records`` (a backlog elsewhere must not keep the one with the record
        from moving), and an error after some records were read is kept for the next fetch, so that
        those are handed up first.

        Not told apart: a transaction marker or a compaction gap just before the record. aiokafka's
        position stops there, and each such offset is reported ``unreadable`` too."""
        if max_records <= 0:  # a poll that takes nothing: the next fetch meets the record again
            return []
        _, partitions = self._fetchable()
        # Marked first: a lookup that fails (the broker away) leaves the rest where the failed
        # fetch put them, past records it drained, and the next fetch puts them back.
        self._read_again = set(partitions)
        await self._seek_to_next(partitions)
        self._read_again = set()
        read: list[tuple[int, Message]] = []  # (the rebalance count it was read under, the message)
        share = max(1, max_records // max(1, len(partitions)))
        for tp in partitions:
            try:
                read += await self._step(tp, share)
            except KafkaError as exc:
                if not read:
                    raise
                self._deferred = exc
            if self._deferred is not None:
                break
        # What was read before a rebalance that ran meanwhile (these calls wait for one) is read
        # again by the new assignment from the last commit. Handed up, it would be taken by its
        # offsets, and read again it would look like offsets gone back.
        messages = [message for generation, message in read if generation == self._generation]
        for m in messages:
            self._next[m.topic, m.partition] = m.offset + 1
        return messages

    async def _seek_to_next(self, partitions: Iterable[TopicPartition]) -> None:
        """Each partition (still assigned) read again from the message after the last one handed
        up; one with none handed up since it was assigned, from the group's commit (the earliest
        offset without one, as ``auto_offset_reset`` says)."""
        for tp in partitions:
            start = self._next.get((tp.topic, tp.partition))
            if start is None and tp in self._consumer.assignment():
                start = await self.group_committed((tp.topic, tp.partition), _LOOKUP_S)
                if start is None:
                    start = (await broker_answers(self._consumer.beginning_offsets([tp]), _LOOKUP_S))[tp]
            # Asked again after the lookups: revoked meanwhile, its next owner reads it from the
            # commit (a seek of a partition no longer assigned raises).
            if start is not None and tp in self._consumer.assignment():
                self._consumer.seek(tp, start)

    async def _step(self, tp: TopicPartition, most: int) -> list[tuple[int, Message]]:
        """Up to ``most`` messages of one partition, one record at a time, ending at an unreadable
        record (which becomes a message that says so) or when nothing more comes, each with the
        rebalance count it was read under. A Kafka error after some were read is kept for the next
        fetch (``_deferred``), and those are returned."""
        messages: list[tuple[int, Message]] = []
        while len(messages) < most:
            try:
                got = await self._consumer.getmany(tp, timeout_ms=_STEP_WAIT_MS, max_records=1)
            except KafkaError as exc:
                if not messages:
                    raise
                self._deferred = exc
                break
            except UnicodeDecodeError:
                # The failed read left the position where it started; the next one moves it to
                # the record that failed.
                await self._consumer.getmany(tp, timeout_ms=0, max_records=1)
                offset = await self._consumer.position(tp)
                log.error("record_unreadable", topic=tp.topic, partition=tp.partition, offset=offset)
                unreadable = Message(tp.topic, tp.partition, offset, None, b"", [], 0, _UNREADABLE)
                messages.append((self._generation, unreadable))
                self._consumer.seek(tp, offset + 1)
                break
            if not got.get(tp):
                break
            messages += [(self._generation, message) for message in messages_from(got)]
        return messages

    async def _shares(self, partitions: list[TopicPartition], max_records: int) -> _Batches:
        """What the partitions have buffered, each up to its share of ``max_records``, without
        waiting; what a partition cannot fill goes to those that filled theirs.

        aiokafka hands out one partition's buffered records after another's: the worker's buffer
        filled from a single partition, whose messages name few tickets (its tickets take turns),
        and with each ticket's events one at a time most ``max_in_flight`` slots stayed idle (at
        20 ms API latency ~110 of 256 were busy). A partition moves past what it hands out, so an
        error met after others gave theirs is kept for the next fetch, not raised over their
        messages (aiokafka's own ``getmany`` does the same).
        """
        taken: _Batches = {}
        left = max_records
        generation = self._generation
        self._turn = (self._turn + 1) % len(partitions)  # who goes first when the shares run out
        asking = partitions[self._turn :] + partitions[: self._turn]
        while asking and left > 0:
            share = -(-left // len(asking))
            filled = []
            for tp in asking:
                want = min(share, left)
                try:
                    got = (await self._consumer.getmany(tp, timeout_ms=0, max_records=want)).get(tp, [])
                except (KafkaError, UnicodeDecodeError) as exc:
                    if not taken:
                        raise
                    self._deferred = exc
                    return taken
                if self._generation != generation:  # a rebalance ran during the call (see fetch)
                    taken, left, generation = {}, max_records, self._generation
                if got:
                    taken.setdefault(tp, []).extend(got)
                    left -= len(got)
                if len(got) == want:
                    filled.append(tp)
                if left <= 0:
                    break
            asking = filled
        return taken

    def seek(self, key: PartitionKey, offset: int) -> None:
        """Read one partition again from ``offset`` (what was fetched of it is dropped)."""
        tp = TopicPartition(*key)
        if tp in self._consumer.assignment():
            self._consumer.seek(tp, offset)
            self._next[key] = offset

    def assignment(self) -> set[PartitionKey]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop fetching every assigned partition (the group membership stays alive)."""
        parts = self._consumer.assignment()
        if parts:
            self._consumer.pause(*parts)
        self._paused = True

    def resume(self) -> None:
        parts = [tp for tp in self._consumer.assignment() if (tp.topic, tp.partition) not in self._held]
        if parts:
            self._consumer.resume(*parts)
        self._paused = False

    @property
    def held(self) -> AbstractSet[PartitionKey]:
        """Partitions paused on their own (``hold``); read on every finished job, so a view."""
        return self._held.keys()

    def hold_reason(self, key: PartitionKey) -> str | None:
        """Why the partition is held (``hold``), or ``None`` when it is not."""
        return self._held.get(key)

    def held_count(self, reason: str) -> int:
        """How many partitions are held for this reason (a gauge, read at scrape time)."""
        return sum(1 for why in self._held.values() if why == reason)

    @property
    def all_held(self) -> bool:
        """Every assigned partition is held: a fetch could take nothing until one is released, and
        only a finished job releases one (``Worker._consume`` then waits for that, not a timeout).
        Asked once per fetch: none held, the usual case, answers without building the assignment."""
        if not self._held:
            return False
        assigned = self.assignment()
        return bool(assigned) and assigned <= self._held.keys()

    def hold(self, key: PartitionKey, reason: str) -> None:
        """Stop fetching one partition while the others go on; a hold already in place takes the
        new reason."""
        self._held[key] = reason
        tp = TopicPartition(*key)
        if tp in self._consumer.assignment():
            self._consumer.pause(tp)

    def forget_held(self, keys: set[PartitionKey]) -> None:
        """Partitions being revoked: whoever gets them next starts fetching them afresh, from the
        last commit."""
        for key in keys:
            self._held.pop(key, None)
            self._next.pop(key, None)

    def release(self, key: PartitionKey) -> None:
        self._held.pop(key, None)
        tp = TopicPartition(*key)
        if not self._paused and tp in self._consumer.assignment():
            self._consumer.resume(tp)

    def reapply_pause(self) -> None:
        """After a rebalance, newly assigned partitions start unpaused: keep our state."""
        assigned = self.assignment()
        self._held = {key: why for key, why in self._held.items() if key in assigned}
        if self._paused:
            self.pause()
        elif self._held:
            self._consumer.pause(*(TopicPartition(*key) for key in self._held))

    async def commit(self, positions: dict[PartitionKey, int]) -> None:
        """Bounded: aiokafka retries a commit for as long as the broker is away, and a revoke or a
        stop that waits on it would never end. Given up, the offsets are committed with the next
        commit; after a revoke or a stop there is none, and whoever reads the partition next starts
        from the last commit: those messages come back, their outcomes repeated as ``redelivered``."""
        offsets = {TopicPartition(t, p): o for (t, p), o in positions.items()}
        try:
            await asyncio.wait_for(self._consumer.commit(offsets), COMMIT_TIMEOUT_S)
        except KafkaError as exc:
            raise BrokerUnavailable(f"commit failed: {type(exc).__name__}") from exc
        except TimeoutError:
            raise BrokerUnavailable(f"commit not answered within {COMMIT_TIMEOUT_S:g} s") from None

    def highwater(self, key: PartitionKey) -> int | None:
        value = self._consumer.highwater(TopicPartition(*key))
        return int(value) if value is not None else None

    async def group_committed(self, key: PartitionKey, timeout_s: float = 3.0) -> int | None:
        """The offset the group last committed for a partition (by this member's predecessor), or
        ``None`` when it has none. Bounded, since aiokafka retries the lookup for as long as the
        broker is away; raises ``BrokerUnavailable`` then."""
        offset = await broker_answers(self._consumer.committed(TopicPartition(*key)), timeout_s)
        return int(offset) if offset is not None and offset >= 0 else None

    async def log_start(self, key: PartitionKey, timeout_s: float = 3.0) -> int:
        """The partition's first offset: where a group that never committed it starts reading
        (the consumer resets to the earliest offset). Bounded as ``group_committed``."""
        tp = TopicPartition(*key)
        offsets = await broker_answers(self._consumer.beginning_offsets([tp]), timeout_s)
        return int(offsets[tp])

    async def ping(self, timeout_s: float = 3.0) -> set[str]:
        """A metadata round trip: proves the broker answers; the topics it lists."""
        return set(await broker_answers(self._consumer.topics(), timeout_s))
