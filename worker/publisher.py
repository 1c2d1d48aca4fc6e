"""Publish outcome events and dead-letter records, and confirm both before a message counts as done.

Writes use ``acks=all``; ``publish`` returns only after the broker acknowledged every record it
sent. A dead-letter record is the input message as it was (key, value bytes, headers) plus
``coc-dlq-*`` headers saying why, where from and when. Broker failures surface as
``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from schemas.outcomes import utc_text
from worker.errors import BrokerUnavailable, DeadLetterUnwritable
from worker.kafka_config import (
    broker_answers,
    cannot_connect,
    kafka_error_text,
    producer_kwargs,
)
from worker.logs import redact_cut
from worker.settings import WorkerSettings
from worker.tracing import HEADER as TRACEPARENT

Headers = list[tuple[str, bytes]]
#: (key, value, headers, delivered): an outcome waiting for the next batch.
_Queued = tuple[bytes | None, bytes, Headers, "asyncio.Future[None]"]

DLQ_HEADER_PREFIX = "coc-dlq-"
_DETAIL_LIMIT = 1000
#: Outcomes written together in one record batch (they are ~1 KB each).
_OUTCOME_BATCH_BYTES = 256 * 1024
#: How long the gate's probe of the broker waits for an answer.
_PROBE_TIMEOUT_S = 10.0
#: How often the cached partition list of the results topic is refreshed.
_PARTITIONS_TTL_S = 30.0
#: Keys whose partition is remembered (a ticket's is asked for with each of its outcomes).
_PARTITION_MEMO_KEYS = 65_536
#: Below Kafka's default message.max.bytes (1 MB) with room for headers.
_SAFE_DLQ_VALUE_BYTES = 900 * 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The input message to copy to the dead-letter topic, and why."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    status: str
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    event_id: str | None
    #: A repeat for a redelivered message: the first may or may not have been written.
    redelivered: bool = False
    #: The API's answer, when it gave one, passed on as it came (the worker branches on no code):
    #: a DLQ consumer reads why without joining the results topic. Which code means what is the
    #: API's Error Codes page's to say; the reference gives only GOM.00000000~GOM.00009999999, and
    #: the simulator's codes (GOM.00001005, GOM.00001003, ...) are its own, not the real API's.
    http_status: int | None = None
    error_code: str | None = None


def dead_letter_headers(letter: DeadLetter, worker_id: str, traceparent: str, now: datetime) -> Headers:
    """Original headers (minus a stale traceparent), then the ``coc-dlq-*`` explanation."""
    kept = [
        (k, v) for k, v in letter.headers if k.lower() != TRACEPARENT and not k.startswith(DLQ_HEADER_PREFIX)
    ]
    ours = {
        "status": letter.status,
        "reason": letter.reason,
        "error": redact_cut(letter.detail, _DETAIL_LIMIT),
        "source-topic": letter.topic,
        "source-partition": str(letter.partition),
        "source-offset": str(letter.offset),
        "at": utc_text(now),
        "worker": worker_id,
    }
    if letter.event_id:
        ours["event-id"] = letter.event_id
    if letter.http_status is not None:
        ours["http-status"] = str(letter.http_status)
    if letter.error_code:
        ours["error-code"] = letter.error_code
    if letter.redelivered:
        ours["redelivered"] = "true"
    if letter.value is None:
        # A tombstone: Kafka refuses a record with neither key nor value, and a keyed one would
        # delete older records of its key from a compacted topic. The letter's empty value says it.
        ours["tombstone"] = "true"
    return [
        *kept,
        *((DLQ_HEADER_PREFIX + k, v.encode()) for k, v in ours.items()),
        (TRACEPARENT, traceparent.encode()),
    ]


class Publisher:
    """The producer of outcomes and dead letters: each call returns only once the broker has
    acknowledged what it wrote, so that an offset is never committed past a message whose answer
    could still be lost."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(
            **producer_kwargs(settings), max_batch_size=_OUTCOME_BATCH_BYTES, compression_type=None
        )
        self._partitioner = DefaultPartitioner()
        self._queued: dict[int, list[_Queued]] = {}  # partition -> outcomes waiting for its writer
        self._writers: dict[int, asyncio.Task[None]] = {}
        self._partitions: list[int] = []
        self._partitions_at = 0.0
        #: key -> its partition under ``_partitions``: the default partitioner hashes in pure Python
        #: (~2 us per outcome), and a ticket's outcomes always land on the same partition
        self._partition_of: dict[bytes, int] = {}

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            raise BrokerUnavailable(
                cannot_connect("producer", self._settings.kafka_bootstrap_servers, exc)
            ) from exc

    async def stop(self) -> None:
        await self._producer.stop()

    def ended(self) -> str | None:
        """Why the producer's sender task ended, if it did: aiokafka then fails every later send
        with a copy of its error and never starts it again (a refused InitProducerId, an
        unrecoverable sequence error), while metadata requests, the gate's probe, still pass."""
        task = self._producer._sender.sender_task if self._producer._sender is not None else None
        if task is None or not task.done() or task.cancelled():
            return None
        error = task.exception()
        return kafka_error_text(error) if error else "it returned"

    async def ping(self) -> None:
        """A metadata request: proves the broker answers now (the gate's probe after a failed
        write; the results topic's metadata would answer from the client's cache)."""
        await broker_answers(self._producer.client.fetch_all_metadata(), _PROBE_TIMEOUT_S)

    async def ping_dead_letters(self) -> None:
        """Fresh metadata of the dead-letter topic: fails while the topic does not exist or a
        partition of it has no leader. (``partitions_for`` answered from the client's cache: during
        an outage of the topic alone the probe passed at once, each write failed a request timeout
        later, and the pause never backed off.)"""
        cluster = await broker_answers(self._producer.client.fetch_all_metadata(), _PROBE_TIMEOUT_S)
        topic = self._settings.dlq_topic
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            raise BrokerUnavailable(f"the dead-letter topic {topic!r} does not exist")
        if cluster.available_partitions_for_topic(topic) != partitions:
            raise BrokerUnavailable(f"a partition of the dead-letter topic {topic!r} has no leader")

    async def publish(
        self,
        key: bytes | None,
        outcome: bytes | None,
        status: str,
        letter: DeadLetter | None,
        traceparent: str,
    ) -> None:
        """Send the outcome (its JSON, keyed by ticket) and the dead-letter record, and wait until
        the broker has both. ``outcome`` is None when an earlier call confirmed it.

        Outcomes of concurrent jobs are written together (see ``_write``); the call returns when
        the batch holding this outcome is acknowledged. When one of the two fails, the error says
        which one went through, so that it is not written again: ``DeadLetterUnwritable`` when
        only the dead-letter record failed, ``BrokerUnavailable.dead_letter_confirmed`` when only
        the outcome did.
        """
        if outcome is None:
            if letter is not None:
                await self._send_dead_letter(letter, traceparent)
            return
        if letter is None:
            await self._send_outcome(key, outcome, status, traceparent)
            return
        sent, lettered = await asyncio.gather(
            self._send_outcome(key, outcome, status, traceparent),
            self._send_dead_letter(letter, traceparent),
            return_exceptions=True,
        )
        if isinstance(sent, BaseException):
            if isinstance(sent, BrokerUnavailable) and not isinstance(lettered, BaseException):
                sent.dead_letter_confirmed = True
            raise sent
        if isinstance(lettered, BaseException):
            raise lettered

    async def _send_dead_letter(self, letter: DeadLetter, traceparent: str) -> None:
        try:
            await self._deliver_dead_letter(letter, traceparent)
        except Exception as exc:  # not only KafkaError: see _send_outcome
            raise DeadLetterUnwritable(
                f"dead letter not confirmed by the broker ({self._settings.dlq_topic}): {kafka_error_text(exc)}"
            ) from exc

    async def _send_outcome(self, key: bytes | None, outcome: bytes, status: str, traceparent: str) -> None:
        headers: Headers = [(TRACEPARENT, traceparent.encode()), ("coc-status", status.encode())]
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        partition: int | None = None
        try:
            if not self._partitions or time.monotonic() - self._partitions_at > _PARTITIONS_TTL_S:
                await self._refresh_partitions()  # rarely: no coroutine per outcome
            partition = self._partition(key)
            self._queued.setdefault(partition, []).append((key, outcome, headers, delivered))
            if partition not in self._writers:
                # Its own context: it writes for every job, not for the one that started it.
                task = asyncio.get_running_loop().create_task(
                    self._write(partition), context=contextvars.Context()
                )
                self._writers[partition] = task
            await delivered
        except Exception as exc:
            # Not only KafkaError: aiokafka also raises others (an assertion on a partition the
            # topic no longer has; a dead sender's stored error). Whatever it is, the outcome is not
            # confirmed, and the caller must wait and write it again, never finish the message.
            # The partition list is read again before that write: it may be what failed.
            self._partitions = []
            # Which topic and partition, in the client's words: one partition refusing writes
            # (short of in-sync replicas, a broker's error) reads apart from a broker that is away.
            where = self._settings.results_topic + (f"/{partition}" if partition is not None else "")
            raise BrokerUnavailable(
                f"outcome not confirmed by the broker ({where}): {kafka_error_text(exc)}"
            ) from exc

    async def _write(self, partition: int) -> None:
        """One writer per partition: send what has queued as record batches, wait for the broker's
        acknowledgement, repeat until nothing is left.

        Per message, ``producer.send`` costs several times more CPU than a record appended to a
        batch; at thousands of outcomes per second the difference is a visible share of the
        worker's CPU. While one batch is on its way the next one fills up, so batches grow with
        the load, and one partition never waits behind another.
        """
        try:
            while queued := self._queued.pop(partition, None):
                await self._write_group(partition, queued)
        finally:
            del self._writers[partition]

    async def _write_group(self, partition: int, items: list[_Queued], per_batch: int = 0) -> None:
        """``items`` as record batches, each answered. A batch of several records the broker refuses
        as too large (a results topic whose ``max.message.bytes`` is under the producer's batch
        size) is written again as two batches, and so on: failed whole, its jobs paused and wrote
        the same outcomes together again, refused every time, and the pause never ended."""
        try:
            sent = await self._send_group(partition, items, per_batch)
            if sent:
                await asyncio.wait([answer for answer, _ in sent])
            for answer, batch_items in sent:
                if len(batch_items) > 1 and _refused_as_too_large(answer):
                    await self._write_group(partition, batch_items, (len(batch_items) + 1) // 2)
        except BaseException as exc:  # whatever it is, every waiting job must hear of it
            stopped = exc if isinstance(exc, Exception) else KafkaError("outcome writer stopped")
            _fail([item[3] for item in items], stopped)
            if stopped is not exc:
                raise

    async def _send_group(
        self, partition: int, items: list[_Queued], per_batch: int = 0
    ) -> list[tuple[asyncio.Future[object], list[_Queued]]]:
        """Hand ``items`` to the producer as record batches (of at most ``per_batch`` records when
        given); each one handed over, with its items.

        A batch that could not be handed over (``send_batch`` raised: a full accumulator timed out,
        the producer closed) fails its records and every later one. Those handed over before it are
        left to the broker's answer: failed too, their jobs would write the outcomes again, while
        aiokafka still delivers the first copies."""
        topic = self._settings.results_topic
        sent: list[tuple[asyncio.Future[object], list[_Queued]]] = []
        batch = self._producer.create_batch()
        members: list[_Queued] = []
        handed = 0  # items[:handed] are in batches handed over
        try:
            for item in items:
                key, value, headers, _ = item
                full = per_batch and len(members) == per_batch
                if full or batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                    # Full: send it and start the next one, which takes any first record whatever
                    # its size (one the broker refuses fails its waiter when the batch is answered).
                    answer = await self._producer.send_batch(batch, topic, partition=partition)
                    sent.append((_settle_when_sent(answer, members), members))
                    handed += len(members)
                    batch, members = self._producer.create_batch(), []
                    batch.append(timestamp=None, key=key, value=value, headers=headers)
                members.append(item)
            if members:
                answer = await self._producer.send_batch(batch, topic, partition=partition)
                sent.append((_settle_when_sent(answer, members), members))
        except Exception as exc:
            _fail([item[3] for item in items[handed:]], exc)
        return sent

    def _partition(self, key: bytes | None) -> int:
        """Chosen exactly as ``producer.send`` would (the default partitioner on the key), so each
        ticket's outcomes keep their order; a keyless outcome goes to any partition."""
        partitions = self._partitions
        if key is None:
            return int(self._partitioner(key, partitions, partitions))
        partition = self._partition_of.get(key)
        if partition is None:
            partition = int(self._partitioner(key, partitions, partitions))
            if len(self._partition_of) >= _PARTITION_MEMO_KEYS:
                self._partition_of.clear()
            self._partition_of[key] = partition
        return partition

    async def _refresh_partitions(self) -> None:
        found = sorted(await self._producer.partitions_for(self._settings.results_topic))
        if found != self._partitions:  # partitions were added: a key's partition may have moved
            self._partition_of.clear()
        self._partitions = found
        self._partitions_at = time.monotonic()

    async def _deliver_dead_letter(self, letter: DeadLetter, traceparent: str) -> None:
        """Write the dead-letter record, smaller if it must be: too big for our request limit or
        the broker's, first the value is cut, then the input's own headers are left out, then the
        value and the key. The ``coc-dlq-*`` headers always stay: they say where the whole message
        still is (source topic, partition, offset). A size error never becomes an outage."""
        headers = dead_letter_headers(letter, self._settings.worker_id, traceparent, datetime.now(UTC))
        value = letter.value or b""  # a tombstone's letter carries an empty value (see its headers)
        cut = value[: min(self._settings.max_event_bytes, _SAFE_DLQ_VALUE_BYTES)]

        def truncated(kept: bytes) -> Headers:
            if len(kept) == len(value):
                return []
            return [(DLQ_HEADER_PREFIX + "value-truncated-from", str(len(value)).encode())]

        ours = [(k, v) for k, v in headers if k.startswith(DLQ_HEADER_PREFIX) or k == TRACEPARENT]
        ours.append((DLQ_HEADER_PREFIX + "headers-dropped", str(len(headers) - len(ours)).encode()))
        tries: list[tuple[bytes | None, bytes | None, Headers]] = [
            (value, letter.key, headers),
            (cut, letter.key, headers + truncated(cut)),
            (cut, letter.key, ours + truncated(cut)),
            # no value and no key (a key too big for the broker), only our headers
            (b"", None, ours + truncated(b"") + [(DLQ_HEADER_PREFIX + "key-dropped", b"true")]),
        ]
        for i, (value_sent, key, headers_sent) in enumerate(tries):
            try:
                await (
                    await self._producer.send(
                        self._settings.dlq_topic, value=value_sent, key=key, headers=headers_sent
                    )
                )
                return
            except MessageSizeTooLargeError:
                if i == len(tries) - 1:  # the smallest record: nothing left to leave out
                    raise


def _fail(waiters: list[asyncio.Future[None]], exc: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(exc)


def _refused_as_too_large(answer: asyncio.Future[object]) -> bool:
    return not answer.cancelled() and isinstance(
        answer.exception(), MessageSizeTooLargeError | RecordListTooLargeError
    )


def _settle_when_sent(sent: asyncio.Future[object], items: list[_Queued]) -> asyncio.Future[object]:
    """Resolve every outcome of a record batch when the broker acknowledges (or refuses) it; a
    batch of several refused as too large is left to ``_write_group``, which splits it."""
    waiters = [item[3] for item in items]

    def settle(done: asyncio.Future[object]) -> None:
        if len(waiters) > 1 and _refused_as_too_large(done):
            return
        error = done.exception() if not done.cancelled() else KafkaError("outcome batch cancelled")
        if error is not None:
            _fail(waiters, error)
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    sent.add_done_callback(settle)
    return sent
