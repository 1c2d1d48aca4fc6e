"""The latency floor: consume -> write an outcome at once, with the worker's Kafka settings.

The paced scenario's counterpart of ceiling A. It does none of the worker's work (no validation,
dedup, API call), only what any Kafka-in, Kafka-out worker must do on this broker: a consumer
group member fetching with the worker's ``fetch_max_wait_ms``, one outcome per record written
through the worker's own ``Publisher`` (its producer settings and its batches per partition, so
that an outcome is stamped at the same point of the write path as the worker's: with
``producer.send`` the floor's were stamped before waiting behind the produce request in flight,
the worker's after, which charged the worker with that wait), offsets committed once a second
after the outcomes are acknowledged, on uvloop like the worker. Its outcomes carry the
fields the harness reads (``source``, ``status``, ``received_at``, ``finished_at``), so its
latency is measured exactly as the worker's: the worker's p99 minus this one's, from the same run
and rate, is the latency the worker adds. Prints ``ready`` once it holds its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
from datetime import UTC, datetime

import uvloop
from aiokafka import ConsumerRebalanceListener, TopicPartition
from common import group_consumer, parse_args

from worker.publisher import Publisher
from worker.settings import load_settings

#: The worker's commit default (``worker/settings.py``); the fetch wait is the worker's too, passed
#: by the harness (``--worker-env`` may change it).
COMMIT_EVERY_S = 1.0
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            self.event.set()


async def main() -> None:
    args = parse_args(__doc__ or "")  # the flags every peer gets; --api and the keys go unused
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumer = group_consumer(args)  # subscribed below, with a listener that tells when it is ready
    publisher = Publisher(load_settings(kafka_bootstrap_servers=args.bootstrap, results_topic=args.results))
    await publisher.start()
    await consumer.start()
    assigned = _Assigned()
    consumer.subscribe([args.input], listener=assigned)
    acked: dict[TopicPartition, int] = {}  # the next offset to commit: its outcome is written
    writing: set[asyncio.Task[None]] = set()

    async def write(tp: TopicPartition, offset: int, key: bytes | None) -> None:
        received = datetime.now(UTC).isoformat()
        outcome = {
            "source": {"topic": tp.topic, "partition": tp.partition, "offset": offset},
            "status": "applied",
            "received_at": received,
            "finished_at": datetime.now(UTC).isoformat(),
        }
        await publisher.publish(key, json.dumps(outcome).encode(), "applied", None, TRACEPARENT)
        acked[tp] = max(acked.get(tp, 0), offset + 1)

    async def commit_every_second() -> None:
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            if acked:
                offsets = dict(acked)
                acked.clear()
                await consumer.commit(offsets)

    committer = asyncio.create_task(commit_every_second())
    ready = False
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            if not ready and assigned.event.is_set():
                ready = True
                # What lives from here on out of the collector's passes, as in the worker
                # (worker/cli.py): a floor that stalls for its collector would flatter the worker.
                gc.collect()
                gc.freeze()
                print("ready", flush=True)
            for tp, records in batches.items():
                for record in records:
                    task = asyncio.create_task(write(tp, record.offset, record.key))
                    writing.add(task)
                    task.add_done_callback(writing.discard)
    finally:
        committer.cancel()
        for task in writing:
            task.cancel()
        with contextlib.suppress(Exception):
            await publisher.stop()
        with contextlib.suppress(Exception):
            await consumer.stop()


if __name__ == "__main__":
    uvloop.run(main())
