"""The tools' Kafka edge: produce with the broker's ack, read a topic up to a snapshot, follow a topic.

The only module of the tools (and of the HTTP ingress) that drives aiokafka, as ``consumer.py``
and ``publisher.py`` are for the worker. Readers never join a consumer group: they assign every
partition themselves, so a tool can never steal partitions from the worker nor commit its offsets.
Kafka errors surface as ``BrokerUnavailable``; a topic that does not exist is a ``ConfigError``.

A reader that gets nothing for ``STALL_S`` asks the broker for metadata (the request the worker's
health check makes), bounded by the reader's request timeout: aiokafka's fetches only come back
empty while the broker is gone, and a tool waited forever without a word. No answer is a
``BrokerUnavailable`` naming the servers; an answer (an idle topic: ``outcomes tail`` waiting for
outcomes) goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Self, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.structs import RecordMetadata

from worker.consumer import Message, messages_from
from worker.errors import BrokerUnavailable, ConfigError
from worker.kafka_config import (
    broker_answers,
    connection_kwargs,
    kafka_error_text,
    producer_kwargs,
    record_limit_bytes,
)
from worker.settings import WorkerSettings, env_var

Headers = list[tuple[str, bytes]]
C = TypeVar("C", AIOKafkaProducer, AIOKafkaConsumer)

_FETCH_TIMEOUT_S = 0.2
_PROBE_TIMEOUT_S = 2.0
#: A read that gets no record (and moves no position) for this long asks the broker whether it
#: still answers: a metadata request, bounded by the reader's request timeout. Not by a few seconds
#: as the worker's health check (``Consumer.ping``): aiokafka sends it on the fetcher's connection,
#: and the broker answers one request of a connection at a time, so the ping waits behind a fetch
#: in flight (up to ``max_partition_fetch_bytes`` per partition: seconds over a slow link), and a
#: slow broker was reported lost. aiokafka itself gives up on a request after the request timeout.
#: Worst case, a lost broker is reported STALL_S + the request timeout after the last record (a
#: refused connection at once). Read at each check: tests shorten it.
STALL_S = 5.0
#: A reader's request timeout when none is given (aiokafka's default). Read when a reader is made:
#: tests shorten it.
REQUEST_TIMEOUT_S = 40.0


@dataclass(frozen=True, slots=True)
class OutRecord:
    """One record to produce."""

    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where the broker stored a record it acknowledged."""

    topic: str
    partition: int
    offset: int


class PartialWrite(BrokerUnavailable):
    """A batch write failed; ``acked[i]`` is where record ``i`` was stored, or None if it was not
    acknowledged. The first ``handed`` records went to the client: one of those without an
    acknowledgement may still have been written (a timeout); the rest were not sent at all."""

    def __init__(self, detail: str, acked: list[Delivered | None], handed: int) -> None:
        super().__init__(detail)
        self.acked = acked
        self.handed = handed


class _Client(Generic[C]):
    """Start/stop and ``async with`` for a tool's Kafka client (``_client`` is set by ``start``)."""

    _client: C | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            await client.stop()
        except asyncio.CancelledError:
            # Ours (Ctrl-C, a bounded wait: ``stop_within``) or not: aiokafka's fetcher cancels its
            # fetches and awaits them, and one sleeping out its retry backoff (the broker gone)
            # raises CancelledError out of ``stop``, which replaced the tool's error with a
            # traceback. Either way the connections are closed: an interrupted stop left them open.
            await _finish_stop(client)
            if task is None or task.cancelling() > cancels:
                raise  # this task is being cancelled: let it

    async def stop_within(self, timeout_s: float) -> None:
        """``stop``, bounded: past ``timeout_s`` the fetches are cancelled and the connections
        closed without waiting for the rest (``_finish_stop``)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.stop()
        except TimeoutError:
            pass  # ``stop`` finished the close when it was cancelled

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _finish_stop(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """What a consumer's ``stop`` left undone when its fetcher raised: the other fetches, the
    connections."""
    fetcher = getattr(client, "_fetcher", None)
    pending = list(getattr(fetcher, "_pending_tasks", ()))
    for fetch in pending:
        fetch.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    connections = getattr(client, "_client", None)
    if connections is not None:
        await connections.close()


class EventProducer(_Client[AIOKafkaProducer]):
    """A producer whose sends return only once the broker acknowledged them (``acks=all``)."""

    def __init__(self, settings: WorkerSettings, *, request_timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._request_timeout_ms = int(request_timeout_s * 1000)

    async def start(self) -> None:
        s = self._settings
        producer = AIOKafkaProducer(**producer_kwargs(s), request_timeout_ms=self._request_timeout_ms)
        try:
            await producer.start()
        except BaseException as exc:  # cancelled too (a stop, a bounded try at start): none left behind
            await producer.stop()
            if isinstance(exc, KafkaError):
                raise BrokerUnavailable(f"cannot connect to the broker: {kafka_error_text(exc)}") from exc
            raise
        self._client = producer

    async def ping(self, timeout_s: float = 3.0) -> None:
        """A metadata request: proves the broker answers now."""
        if self._client is None:
            raise RuntimeError("EventProducer.start() was not awaited")
        await broker_answers(self._client.client.fetch_all_metadata(), timeout_s)

    async def send(self, topic: str, record: OutRecord) -> Delivered:
        return (await self.send_many(topic, [record]))[0]

    async def send_many(self, topic: str, records: Sequence[OutRecord]) -> list[Delivered]:
        """Send in order (pipelined) and wait until the broker acknowledged every one.

        On a failure it still waits for every record already handed to the client (they may be
        written), then raises ``PartialWrite`` saying which were acknowledged: a caller reports
        exactly what was written.
        """
        if self._client is None:
            raise RuntimeError("EventProducer.start() was not awaited")
        pending: list[asyncio.Future[RecordMetadata]] = []
        failure: BaseException | None = None
        try:
            for r in records:
                pending.append(await self._client.send(topic, key=r.key, value=r.value, headers=r.headers))
        except KafkaError as exc:  # refused before sending (e.g. too large): the rest is not sent
            failure = exc
        results = await asyncio.gather(*pending, return_exceptions=True)
        acked: list[Delivered | None] = [None] * len(records)
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                acked[i] = Delivered(result.topic, result.partition, result.offset)
        if failure is None:
            return [d for d in acked if d is not None]
        if isinstance(failure, KafkaTimeoutError):
            detail = f"the broker did not acknowledge the write to {topic!r} in time (is the topic there?)"
        else:
            detail = f"write to {topic!r} failed: {type(failure).__name__}"
        raise PartialWrite(detail, acked, len(pending)) from failure


class TopicReader(_Client[AIOKafkaConsumer]):
    """Reads every partition of one topic from chosen positions, outside any consumer group."""

    def __init__(
        self,
        settings: WorkerSettings,
        topic: str,
        *,
        metadata_timeout_s: float = 10.0,
        request_timeout_s: float | None = None,
    ) -> None:
        self._settings = settings
        self.topic = topic
        self._metadata_timeout_s = metadata_timeout_s
        self._request_timeout_s = REQUEST_TIMEOUT_S if request_timeout_s is None else request_timeout_s
        self._request_timeout_ms = int(self._request_timeout_s * 1000)
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        s = self._settings
        consumer = AIOKafkaConsumer(
            **connection_kwargs(s),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
            max_partition_fetch_bytes=record_limit_bytes(s),
            request_timeout_ms=self._request_timeout_ms,
        )
        self._client = consumer  # before its start: one that fails to start is stopped too
        try:
            await consumer.start()
            self._partitions = await self._discover()
            consumer.assign(self._partitions)
        except KafkaError as exc:
            await self.stop()
            raise BrokerUnavailable(f"cannot read {self.topic!r}: {kafka_error_text(exc)}") from exc
        except BaseException:
            await self.stop()
            raise

    async def _discover(self) -> list[TopicPartition]:
        assert self._client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._metadata_timeout_s
        while True:
            ids = self._client.partitions_for_topic(self.topic)
            if ids:
                return [TopicPartition(self.topic, p) for p in sorted(ids)]
            if loop.time() > deadline:
                raise ConfigError(f"topic {self.topic!r} does not exist on the broker")
            await self._client.topics()  # refreshes the metadata
            await asyncio.sleep(0.05)

    def _require(self) -> AIOKafkaConsumer:
        if self._client is None:
            raise RuntimeError("TopicReader.start() was not awaited")
        return self._client

    async def end_offsets(self) -> dict[int, int]:
        """The offset the next record of each partition will get (a snapshot of "now").

        ListOffsets is checked against the high watermark of a fetch of the last record: some
        Kafka-protocol brokers (Tansu) answer ListOffsets with the last *batch's* base offset + 1,
        which would hide the rest of that batch.
        """
        try:
            listed = await self._require().end_offsets(self._partitions)
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot read offsets of {self.topic!r}: {type(exc).__name__}") from exc
        ends = {tp.partition: int(offset) for tp, offset in listed.items()}
        probed = await self._high_watermarks({p: o - 1 for p, o in ends.items() if o > 0})
        return {p: max(o, probed.get(p, o)) for p, o in ends.items()}

    async def _high_watermarks(self, offsets: dict[int, int]) -> dict[int, int]:
        """Fetch at ``offsets`` and read each partition's high watermark from the answer."""
        consumer = self._require()
        pending = {TopicPartition(self.topic, p): o for p, o in offsets.items()}
        found: dict[int, int] = {}
        if not pending:
            return found
        consumer.resume(*pending)
        for tp, offset in pending.items():
            consumer.seek(tp, offset)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PROBE_TIMEOUT_S
        while pending and loop.time() < deadline:
            try:
                batches = await consumer.getmany(*pending, timeout_ms=int(_FETCH_TIMEOUT_S * 1000))
            except KafkaError as exc:
                raise BrokerUnavailable(f"reading {self.topic!r} failed: {type(exc).__name__}") from exc
            for tp in batches:
                high = consumer.highwater(tp)
                if high is not None:
                    found[tp.partition] = int(high)
                    pending.pop(tp, None)
        return found

    async def beginning_offsets(self) -> dict[int, int]:
        try:
            found = await self._require().beginning_offsets(self._partitions)
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot read offsets of {self.topic!r}: {type(exc).__name__}") from exc
        return {tp.partition: int(offset) for tp, offset in found.items()}

    def seek(self, positions: dict[int, int]) -> None:
        consumer = self._require()
        for partition, offset in positions.items():
            consumer.seek(TopicPartition(self.topic, partition), offset)

    async def fetch(self, timeout_s: float = _FETCH_TIMEOUT_S) -> list[Message]:
        try:
            batches = await self._require().getmany(timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            raise BrokerUnavailable(f"reading {self.topic!r} failed: {type(exc).__name__}") from exc
        messages = messages_from(batches)
        messages.sort(key=lambda m: (m.partition, m.offset))
        return messages

    async def read_range(self, start: dict[int, int], end: dict[int, int]) -> AsyncGenerator[Message, None]:
        """Every record with ``start[p] <= offset < end[p]``, then stop (partitions missing from
        ``start`` are not read). Raises ``BrokerUnavailable`` when the broker is lost meanwhile."""
        consumer = self._require()
        remaining = {p for p in start if start[p] < end.get(p, 0)}
        consumer.pause(*self._partitions)
        consumer.resume(*(TopicPartition(self.topic, p) for p in remaining))
        self.seek({p: start[p] for p in remaining})
        positions = {p: start[p] for p in remaining}
        quiet_since = asyncio.get_running_loop().time()
        while remaining:
            messages = await self.fetch()
            for message in messages:
                p = message.partition
                if p in remaining and start[p] <= message.offset < end[p]:
                    yield message
            progressed = bool(messages)
            for partition in list(remaining):
                position = await consumer.position(TopicPartition(self.topic, partition))
                if position != positions[partition]:  # records skipped count too (control batches)
                    positions[partition] = position
                    progressed = True
                if position >= end[partition]:
                    remaining.discard(partition)
                    consumer.pause(TopicPartition(self.topic, partition))
            if remaining:
                quiet_since = await self._still_answering(quiet_since, progressed)

    async def follow(self, start: dict[int, int]) -> AsyncGenerator[Message, None]:
        """Every record from ``start`` on, waiting for new ones forever (the caller stops
        iterating). Raises ``BrokerUnavailable`` when the broker is lost: an idle topic is waited
        for as long as the broker answers."""
        self._require().resume(*self._partitions)
        self.seek(start)
        quiet_since = asyncio.get_running_loop().time()
        while True:
            messages = await self.fetch()
            for message in messages:
                yield message
            quiet_since = await self._still_answering(quiet_since, bool(messages))

    async def _still_answering(self, quiet_since: float, progressed: bool) -> float:
        """Since when nothing came: now after progress; else ``quiet_since`` until ``STALL_S``
        passed, then the broker is asked (``ping``), and now again if it answered. The time the
        caller spends on what was yielded is not counted: progress is noted after it."""
        now = asyncio.get_running_loop().time()
        if progressed:
            return now
        if now - quiet_since < STALL_S:
            return quiet_since
        await self.ping()
        return asyncio.get_running_loop().time()

    async def ping(self) -> None:
        """A metadata request, bounded by the request timeout (it may wait behind a fetch in
        flight: see ``STALL_S``): raises ``BrokerUnavailable`` naming the broker when it does not
        answer."""
        try:
            await broker_answers(self._require().topics(), self._request_timeout_s)
        except BrokerUnavailable as exc:
            servers = f"{env_var('kafka_bootstrap_servers')}={self._settings.kafka_bootstrap_servers}"
            raise BrokerUnavailable(
                f"lost the broker while reading {self.topic!r}: nothing came for {STALL_S:g} s, and"
                f" {servers} does not answer a metadata request ({exc})"
            ) from exc
