"""Peer 1: the same pipeline as a FastStream application, with FastStream's at-least-once settings.

``ack_policy=AckPolicy.NACK_ON_ERROR`` acknowledges (commits) a message only after its handler
returned, which here means after the outcome was published and confirmed (``broker.publish`` waits
for the broker's ack; the producer uses ``acks="all"``), and seeks back to it when the handler
raised, so that it is read again (``AckPolicy.ACK`` would commit it then too, its outcome never
written); auto-commit is then off. ``max_workers`` > 1 with that policy gives FastStream's
``ConcurrentBetweenPartitionsSubscriber``: one consumer per worker in the group, each handling its
partitions one message at a time, so per-ticket order holds and concurrency is bounded by the
partition count. (Concurrency *within* a partition exists only
with ``AckPolicy.ACK_FIRST``, which commits before processing: not at-least-once.)
"""

from __future__ import annotations

import asyncio

from common import Step, now, parse_args
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker, KafkaMessage

args = parse_args(__doc__ or "")
broker = KafkaBroker(args.bootstrap, acks="all")
app = FastStream(broker)
step = Step(args.api, args.ak, args.sk, connections=args.concurrency)


@broker.subscriber(
    args.input,
    group_id=args.group,
    auto_offset_reset="earliest",
    fetch_max_wait_ms=args.fetch_max_wait_ms,
    session_timeout_ms=args.session_timeout_ms,
    heartbeat_interval_ms=args.heartbeat_ms,
    ack_policy=AckPolicy.NACK_ON_ERROR,
    max_workers=args.concurrency,
)
async def handle(msg: KafkaMessage) -> None:
    # The raw bytes, validated by the step as every peer does (a ``ChangeEvent`` parameter would
    # have FastStream parse the JSON and validate through its own wrapper model instead).
    received_at = now()
    record = msg.raw_message
    key, value = await step.process(msg.body, record.topic, record.partition, record.offset, received_at)
    await broker.publish(value, topic=args.results, key=key)


@app.on_startup
async def _open() -> None:
    await step.start()


@app.after_shutdown
async def _close() -> None:
    await step.close()


if __name__ == "__main__":
    asyncio.run(app.run())
