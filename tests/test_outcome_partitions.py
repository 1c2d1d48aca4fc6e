"""The publisher's choice of partition for an outcome, without a broker."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from worker.publisher import Publisher
from worker.settings import load_settings


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
