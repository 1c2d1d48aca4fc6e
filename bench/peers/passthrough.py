"""The latency floor: consume -> write an outcome at once, with the worker's Kafka settings.

The paced scenario's counterpart of ceiling A. It does none of the worker's work (no validation,
dedup, API call), only what any Kafka-in, Kafka-out worker must do on this broker: a consumer
group member fetching with the worker's ``fetch_max_wait_ms``, one outcome per record written
with the worker's producer settings (``acks=all``, ``linger_ms`` 2), offsets committed once a
second after the outcomes are acknowledged, on uvloop like the worker. Its outcomes carry the
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
from collections.abc import Callable
from datetime import UTC, datetime

import uvloop
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from common import group_consumer, parse_args

#: The worker's producer and commit defaults (``worker/publisher.py``, ``worker/settings.py``); the
#: fetch wait is the worker's too, passed by the harness (``--worker-env`` may change it).
LINGER_MS, COMMIT_EVERY_S = 2, 1.0


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
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=LINGER_MS)
    await producer.start()
    await consumer.start()
    assigned = _Assigned()
    consumer.subscribe([args.input], listener=assigned)
    acked: dict[TopicPartition, int] = {}  # the next offset to commit: its outcome is written

    def ack(tp: TopicPartition, offset: int) -> Callable[[asyncio.Future[object]], None]:
        def done(future: asyncio.Future[object]) -> None:
            if not future.cancelled() and future.exception() is None:
                acked[tp] = max(acked.get(tp, 0), offset + 1)

        return done

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
                    received = datetime.now(UTC).isoformat()
                    outcome = {
                        "source": {"topic": tp.topic, "partition": tp.partition, "offset": record.offset},
                        "status": "applied",
                        "received_at": received,
                        "finished_at": datetime.now(UTC).isoformat(),
                    }
                    sent = await producer.send(
                        args.results, key=record.key, value=json.dumps(outcome).encode()
                    )
                    sent.add_done_callback(ack(tp, record.offset))
    finally:
        committer.cancel()
        with contextlib.suppress(Exception):
            await producer.stop()
        with contextlib.suppress(Exception):
            await consumer.stop()


if __name__ == "__main__":
    uvloop.run(main())
