"""The benchmark's input: a deterministic backlog of valid change events, and how it is produced.

Every ticket walks its sub-tickets through the simulator's state machine in order (started ->
ended -> succeeded | failed), so an event applied out of order is refused by the simulator (a
result before its start; a ``failed`` result overtaking its end is taken, and the end after it
refused) and shows up as a ``rejected`` outcome: the report counts them, which doubles as an
ordering check.
Events are produced keyed by ticket, tickets interleaved, so every partition holds many tickets.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

Record = tuple[bytes, bytes]
#: Record batches of the backlog: the size its ``producer.send`` batches had (``max_batch_size``),
#: so that the subjects fetch the same layout as before.
_BACKLOG_BATCH_BYTES = 256 * 1024

_SOURCES = ("argo-cd", "spinnaker", "jenkins", "alertmanager")
_FAIL_TYPES = ("fr_dependent_service_issue", "fr_change_plan_issue", "fr_operation_issue")


@dataclass(frozen=True, slots=True)
class Workload:
    events: int
    tickets: int
    seed: int = 7


def ticket_id(n: int) -> str:
    return f"CMBENCH{n:06d}"


def _event(ticket: int, k: int, rng: random.Random) -> dict[str, object]:
    """The k-th event of a ticket: sub-ticket k // 3, step k % 3 of its lifecycle."""
    sub, step = divmod(k, 3)
    base: dict[str, object] = {
        "event_id": f"bench-{ticket:06d}-{k:05d}",
        "ticket_id": ticket_id(ticket),
        "sub_ticket_id": f"region-{sub:03d}",
        "source": _SOURCES[(ticket + sub) % len(_SOURCES)],
        "occurred_at": f"2025-11-28T{(k // 60) % 24:02d}:{k % 60:02d}:00Z",
    }
    if step == 0:
        return {**base, "type": "change.started"}
    if step == 1:
        return {**base, "type": "change.ended"}
    if rng.random() < 0.8:
        return {
            **base,
            "type": "change.succeeded",
            "result": {"is_verified_in_change_time": True, "comment": "Rollout healthy; canary green."},
        }
    start = 1_764_300_000_000 + k * 1000
    return {
        **base,
        "type": "change.failed",
        "result": {
            "comment": "HighErrorRate firing after the change.",
            "change_fail_type": rng.choice(_FAIL_TYPES),
            "rollback_start_time": start,
            "rollback_end_time": start + 300_000,
            "is_rollback_success": True,
            "is_monitor_found": True,
        },
    }


def generate(workload: Workload) -> list[Record]:
    """``(key, value)`` in produce order: round-robin over tickets, each ticket's events in order.

    When the events do not divide evenly, the last round stops part way (on the first tickets).
    """
    rng = random.Random(workload.seed)
    order = list(range(workload.tickets))
    rng.shuffle(order)
    records: list[Record] = []
    for i in range(workload.events):
        k, position = divmod(i, workload.tickets)  # round k, the position-th ticket of the round
        ticket = order[position]
        value = json.dumps(_event(ticket, k, rng), separators=(",", ":")).encode()
        records.append((ticket_id(ticket).encode(), value))
    return records


#: (partition, offset) -> the record's timestamp (ms), as the producer stamped it
Timestamps = dict[tuple[int, int], int]


async def produce_backlog(bootstrap: str, topic: str, records: list[Record]) -> Timestamps:
    """Write every record (acks=all) before the subject starts: each on the partition
    ``producer.send`` would choose for its key, in order, in record batches built here.

    ``send`` per record cost ~1.6 s of every run's set-up for the 50,000-event backlog (a full
    benchmark makes ~30 such runs); whole batches cost a fraction of that. Each record is dated
    when it is appended, and its offset is its batch's base offset plus its place in the batch.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=_BACKLOG_BATCH_BYTES)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partitioner = DefaultPartitioner()
        by_partition: dict[int, list[Record]] = {}
        for key, value in records:
            by_partition.setdefault(partitioner(key, partitions, partitions), []).append((key, value))
        sent: list[tuple[int, list[int], asyncio.Future[Any]]] = []

        async def send(partition: int, batch: Any, stamps: list[int]) -> None:
            sent.append((partition, stamps, await producer.send_batch(batch, topic, partition=partition)))

        for partition, items in by_partition.items():
            batch, stamps = producer.create_batch(), []
            for key, value in items:
                stamp = int(time.time() * 1000)
                # A full batch is sent and the record goes into the next: an empty batch takes any
                # first record, whatever its size, so this runs at most twice.
                while batch.append(key=key, value=value, timestamp=stamp, headers=[]) is None:
                    await send(partition, batch, stamps)
                    batch, stamps = producer.create_batch(), []
                stamps.append(stamp)
            await send(partition, batch, stamps)
        timestamps: Timestamps = {}
        for partition, stamps, delivered in sent:
            base = (await delivered).offset
            timestamps.update(((partition, base + i), stamp) for i, stamp in enumerate(stamps))
    finally:
        await producer.stop()
    return timestamps


def paced_schedule(count: int, rate_per_s: float) -> Iterator[tuple[int, float]]:
    """(index, offset in seconds from the start) at which each record is due, evenly spaced."""
    interval = 1.0 / rate_per_s
    for i in range(count):
        yield i, i * interval


async def produce_paced(
    bootstrap: str, topic: str, records: list[Record], rate_per_s: float
) -> tuple[Timestamps, float]:
    """Produce at ``rate_per_s``, each record stamped when it is sent; returns them and the rate achieved.

    The stamp is taken here and given to the record (``timestamp_ms``): the metadata aiokafka
    returns carries the timestamp of the first record of its batch for every record in it, which
    dated a record queued behind a produce request in flight too early, by up to a broker stall.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    loop = asyncio.get_running_loop()
    futures = []
    stamps = []
    try:
        start = loop.time()
        for i, due in paced_schedule(len(records), rate_per_s):
            delay = start + due - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            key, value = records[i]
            stamp = int(time.time() * 1000)
            futures.append(await producer.send(topic, key=key, value=value, timestamp_ms=stamp))
            stamps.append(stamp)
        written = await asyncio.gather(*futures)
        elapsed = loop.time() - start
    finally:
        await producer.stop()
    achieved = len(records) / elapsed if elapsed > 0 else float("inf")
    return {(md.partition, md.offset): stamp for md, stamp in zip(written, stamps, strict=True)}, achieved
