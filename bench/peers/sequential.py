"""Baseline: the naive loop — consume one message, call the API, produce its outcome, commit, repeat.

At-least-once (the commit follows the confirmed outcome), ordered (one message at a time), and
as slow as one API round trip plus two broker round trips per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from aiokafka import AIOKafkaProducer, TopicPartition
from common import Step, group_consumer, now, parse_args, running


async def main() -> None:
    args = parse_args(__doc__ or "")
    consumer = group_consumer(args, args.input)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    step = Step(args.api, args.ak, args.sk, connections=1)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with running(step, producer, consumer):
        while True:
            msg = await consumer.getone()
            key, value = await step.process(msg.value, msg.topic, msg.partition, msg.offset, now())
            await producer.send_and_wait(args.results, value=value, key=key)
            await consumer.commit({TopicPartition(msg.topic, msg.partition): msg.offset + 1})


if __name__ == "__main__":
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(main())
