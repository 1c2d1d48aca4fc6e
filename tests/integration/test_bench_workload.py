"""The paced load generator dates each record when it sends it, as the broker stores it."""

from __future__ import annotations

from bench.workload import produce_paced
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
