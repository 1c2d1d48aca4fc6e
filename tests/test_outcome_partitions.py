"""The publisher without a broker: the partition of an outcome, and what a failed write raises."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from waiting import until

from worker.errors import BrokerUnavailable, DeadLetterUnwritable
from worker.publisher import DeadLetter, Publisher
from worker.settings import load_settings

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_each_outcome_goes_where_the_default_partitioner_sends_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ticket's partition is remembered, and forgotten when the topic gains partitions: each
    ticket's outcomes must stay on the partition ``producer.send`` would pick, in order."""
    publisher = Publisher(load_settings())
    keys = [f"CT-{n:06d}".encode() for n in range(300)]
    try:
        await _check(publisher, keys, monkeypatch)
    finally:
        await publisher.stop()


async def _check(publisher: Publisher, keys: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    partitioner = DefaultPartitioner()
    for count in (4, 12):
        partitions = set(range(count))

        async def partitions_for(topic: str, found: set[int] = partitions) -> set[int]:
            return found

        monkeypatch.setattr(publisher._producer, "partitions_for", partitions_for)
        await publisher._refresh_partitions()
        expected = {key: partitioner(key, sorted(partitions), sorted(partitions)) for key in keys}
        assert len(set(expected.values())) == count  # the keys spread over every partition
        assert {key: publisher._partition(key) for key in keys} == expected
        assert publisher._partition_of == expected  # remembered: the next pass answers from it
        assert {key: publisher._partition(key) for key in keys} == expected
    assert publisher._partition(None) in range(12)


async def test_a_producer_error_of_any_kind_leaves_the_outcome_unconfirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka raises more than KafkaError: an assertion on a partition the topic no longer has
    (our list is cached for 30 s), a dead sender's stored error. Such an error went past the
    pipeline's handling: the message got a second, different outcome, or none, and its offset was
    never committed. It is an unconfirmed write now, and the partition list is read again."""
    publisher = Publisher(load_settings())
    topic_partitions = {0, 1, 2}
    written: list[int] = []

    async def partitions_for(topic: str) -> set[int]:
        return set(topic_partitions)

    async def send_batch(batch: object, topic: str, *, partition: int) -> asyncio.Future[None]:
        assert partition in topic_partitions, "Unrecognized partition"  # as aiokafka's check
        written.append(partition)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send(topic: str, **record: object) -> asyncio.Future[None]:
        raise RuntimeError("the producer's sender has died")

    monkeypatch.setattr(publisher._producer, "partitions_for", partitions_for)
    monkeypatch.setattr(publisher._producer, "send_batch", send_batch)
    monkeypatch.setattr(publisher._producer, "send", send)
    partitioner = DefaultPartitioner()
    key = next(
        k for k in (f"CT-{n:06d}".encode() for n in range(100)) if partitioner(k, [0, 1, 2], [0, 1, 2]) == 2
    )
    letter = DeadLetter(None, b"{}", [], "failed", "retries_exhausted", "", "in", 0, 7, "ev-1")
    try:
        await publisher.publish(key, b"{}", "applied", None, TRACEPARENT)
        assert written == [2]
        topic_partitions.clear()
        topic_partitions.add(0)  # recreated with one partition
        with pytest.raises(BrokerUnavailable, match="AssertionError") as refused:
            await publisher.publish(key, b"{}", "applied", None, TRACEPARENT)
        # which topic and partition: one refusing writes reads apart from a broker that is away
        assert f"({publisher._settings.results_topic}/2)" in str(refused.value)
        await publisher.publish(key, b"{}", "applied", None, TRACEPARENT)  # the list read again
        assert written == [2, 0]
        with pytest.raises(DeadLetterUnwritable, match="RuntimeError"):
            await publisher.publish(key, None, "failed", letter, TRACEPARENT)
    finally:
        await publisher.stop()


async def test_a_batch_not_handed_over_fails_only_its_own_outcomes(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the second of two record batches could not be handed to the producer, the first one's
    outcomes were failed too, while aiokafka went on to deliver them: their jobs wrote them again."""
    publisher = Publisher(load_settings())
    first_batch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handed: list[int] = []

    class TwoRecordBatch:
        def __init__(self) -> None:
            self.records = 0

        def append(self, **record: object) -> object | None:
            if self.records == 2:
                return None
            self.records += 1
            return object()

    async def partitions_for(topic: str) -> set[int]:
        return {0}

    async def send_batch(batch: TwoRecordBatch, topic: str, *, partition: int) -> asyncio.Future[None]:
        if handed:
            raise KafkaTimeoutError("the accumulator stayed full")
        handed.append(batch.records)
        return first_batch

    monkeypatch.setattr(publisher._producer, "partitions_for", partitions_for)
    monkeypatch.setattr(publisher._producer, "create_batch", TwoRecordBatch)
    monkeypatch.setattr(publisher._producer, "send_batch", send_batch)
    try:
        jobs = [
            asyncio.ensure_future(publisher.publish(b"CT-1", b"{}", "applied", None, TRACEPARENT))
            for _ in range(4)
        ]
        await until(lambda: jobs[3].done())
        assert [job.done() for job in jobs] == [False, False, True, True]
        assert all(isinstance(job.exception(), BrokerUnavailable) for job in jobs[2:])
        first_batch.set_result(None)  # the broker acknowledges the batch that was handed over
        assert await asyncio.gather(*jobs[:2]) == [None, None]
        assert handed == [2]
    finally:
        await publisher.stop()


async def test_a_batch_refused_as_too_large_is_written_again_in_smaller_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A results topic whose max.message.bytes is under the producer's batch size (256 KiB) refused
    every full batch: its outcomes failed together, their jobs paused, then wrote them again
    together, refused again, and the pause never ended. Each outcome fits; the batches are split
    until they do."""
    publisher = Publisher(load_settings())
    limit = 64 * 1024
    sizes: list[tuple[int, bool]] = []

    async def partitions_for(topic: str) -> set[int]:
        return {0}

    async def send_batch(batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        refused = batch.size() > limit
        sizes.append((batch.size(), refused))
        if refused:
            done.set_exception(MessageSizeTooLargeError())
        else:
            done.set_result(None)
        return done

    monkeypatch.setattr(publisher._producer, "partitions_for", partitions_for)
    monkeypatch.setattr(publisher._producer, "send_batch", send_batch)
    outcome = b"{" + b"x" * 700 + b"}"
    try:
        jobs = [
            publisher.publish(f"CT-{n}".encode(), outcome, "applied", None, TRACEPARENT) for n in range(256)
        ]
        assert await asyncio.wait_for(asyncio.gather(*jobs), 5) == [None] * 256
    finally:
        await publisher.stop()
    assert any(refused for _, refused in sizes)  # the full batches were refused at first
    written = [size for size, refused in sizes if not refused]
    assert max(written) <= limit
    assert len(written) <= 8  # halved, not sent one by one


async def test_a_single_outcome_refused_as_too_large_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing left to split: that outcome is unconfirmed (its job pauses), as before."""
    publisher = Publisher(load_settings())

    async def partitions_for(topic: str) -> set[int]:
        return {0}

    async def send_batch(batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_exception(MessageSizeTooLargeError())
        return done

    monkeypatch.setattr(publisher._producer, "partitions_for", partitions_for)
    monkeypatch.setattr(publisher._producer, "send_batch", send_batch)
    try:
        with pytest.raises(BrokerUnavailable, match="MessageSizeTooLargeError"):
            await asyncio.wait_for(publisher.publish(b"CT-1", b"{}", "applied", None, TRACEPARENT), 5)
    finally:
        await publisher.stop()
