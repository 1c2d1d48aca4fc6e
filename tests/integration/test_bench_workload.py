"""The benchmark's producers: the backlog lands where ``producer.send`` would put it, in order, and
the paced load generator dates each record when it sends it, as the broker stores it."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from bench.workload import produce_backlog, produce_paced
from worker.sandbox import TansuBroker, create_topics, read_topic


async def test_each_paced_record_is_dated_when_it_was_sent(broker: TansuBroker, unique: str) -> None:
    """aiokafka's metadata gives every record of a batch the first record's timestamp: records
    queued behind a produce request in flight were dated too early, and the paced latency of
    both the worker and the floor overstated by as long as they waited. Sent as fast as the
    producer takes them, the records share batches; each must carry its own send time."""
    topic = f"paced-{unique}"
    await create_topics(broker.bootstrap, [topic], partitions=1)
    records = [(b"k", f"value-{i}".encode()) for i in range(2000)]
    stamps, _ = await produce_paced(broker.bootstrap, topic, records, rate_per_s=1_000_000)
    stored = await read_topic(broker.bootstrap, topic, until=lambda r: len(r) >= len(records), timeout_s=30)
    assert len(stored) == len(records)
    assert {(r.partition, r.offset): r.timestamp_ms for r in stored} == stamps


async def test_the_backlog_lands_on_each_keys_partition_in_order_with_its_timestamps(
    broker: TansuBroker, unique: str
) -> None:
    """The harness builds the backlog's record batches itself: every record must still go to the
    partition the default partitioner gives its key (ticket order and the outcomes' partitions
    rely on it), in the order given, over more than one batch per partition, and the offsets and
    timestamps it returns must be the stored ones (the latency columns use them)."""
    topic = f"backlog-{unique}"
    partitions = 3
    await create_topics(broker.bootstrap, [topic], partitions=partitions)
    records = [(f"ticket-{i % 7}".encode(), f"{i:06d}".encode() * 200) for i in range(3000)]  # ~3.6 MB
    stamps = await produce_backlog(broker.bootstrap, topic, records)
    stored = await read_topic(broker.bootstrap, topic, until=lambda r: len(r) >= len(records), timeout_s=30)
    assert len(stored) == len(records)
    assert {(r.partition, r.offset): r.timestamp_ms for r in stored} == stamps
    every = list(range(partitions))
    for p in every:
        expected = [(k, v) for k, v in records if DefaultPartitioner()(k, every, every) == p]
        assert [
            (r.key, r.value) for r in sorted(stored, key=lambda r: r.offset) if r.partition == p
        ] == expected
