"""The benchmark's broker I/O: the backlog lands where ``producer.send`` would put it, in order;
the paced load generator dates each record when it sends it, as the broker stores it; the outcome
reader reads what an exited subject wrote to the end, and caps from the window it is given."""

from __future__ import annotations

import json
import time

from aiokafka.partitioner import DefaultPartitioner

from bench.scenarios import PARTITIONS, collect
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


class _Exited:
    """A subject as ``collect`` sees it: ``alive`` only."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive


def _outcomes(count: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"t", json.dumps({"source": {"partition": 0, "offset": i}, "pad": "x" * 1000}).encode())
        for i in range(count)
    ]


async def test_the_outcomes_of_a_subject_that_exited_are_read_to_the_end(
    broker: TansuBroker, unique: str
) -> None:
    """The paced runs read their outcomes after the load: a subject that died meanwhile has
    written them all already, and they must all be read, more than one fetch's worth."""
    topic = f"out-{unique}"
    await create_topics(broker.bootstrap, [topic], partitions=PARTITIONS)
    written = _outcomes(3000)  # ~3 MB on one partition: several fetches
    await produce_backlog(broker.bootstrap, topic, written)
    out, _, capped_at = await collect(broker.bootstrap, topic, 10_000, 60.0, _Exited(alive=False))  # type: ignore[arg-type]
    assert len(out) == len(written)
    assert capped_at is None


async def test_the_cap_counts_from_the_window_given_not_from_the_first_read(
    broker: TansuBroker, unique: str
) -> None:
    topic = f"out-{unique}"
    await create_topics(broker.bootstrap, [topic], partitions=PARTITIONS)
    await produce_backlog(broker.bootstrap, topic, _outcomes(100))
    began = time.monotonic() - 100.0  # the load began long ago: the cap has struck already
    out, _, capped_at = await collect(
        broker.bootstrap, topic, 10_000, 5.0, _Exited(alive=True), window_from=began
    )  # type: ignore[arg-type]
    assert capped_at is not None
    assert capped_at <= len(out) <= 100
