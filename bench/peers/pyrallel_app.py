"""Peer 2: the same pipeline on ``pyrallel-consumer`` (key-ordered parallel consumer, confluent-kafka).

Runs in its own Python >= 3.12 environment (the library requires it; ``bench/envs.py`` builds one
when the project's interpreter is older). ``ordering_mode="key_hash"`` keeps each ticket's events
in order while different tickets run concurrently (``execution.max_in_flight``); the library
commits only offsets below every unfinished message (auto-commit off), and a message counts as
finished when this coroutine returns, i.e. after its outcome is confirmed: at-least-once. Outcomes
are produced with aiokafka, as every other subject does.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiokafka import AIOKafkaProducer
from common import Step, now, parse_args, running
from pyrallel_consumer.config import KafkaConfig
from pyrallel_consumer.consumer import PyrallelConsumer
from pyrallel_consumer.dto import ExecutionMode, WorkItem


async def main() -> None:
    args = parse_args(__doc__ or "")
    logging.basicConfig(level=logging.WARNING)
    config = KafkaConfig(
        BOOTSTRAP_SERVERS=args.bootstrap,
        CONSUMER_GROUP=args.group,
        SESSION_TIMEOUT_MS=args.session_timeout_ms,
    )
    config.dlq_enabled = False
    config.parallel_consumer.ordering_mode = "key_hash"
    config.parallel_consumer.execution.mode = ExecutionMode.ASYNC
    config.parallel_consumer.execution.max_in_flight = args.concurrency
    # The default (1,000) held it at ~1,300-1,650 events/s here with one core idle; 5,000 gave
    # ~2,600 (alternating runs): a peer measured below its own capacity flatters the worker.
    config.parallel_consumer.poll_batch_size = 5000
    # "max_retries" counts attempts: 0 would complete every message without calling the handler
    # (a silent drop, pyrallel-consumer 1.0.0). 1 = one attempt; the step retries the API itself.
    config.parallel_consumer.execution.max_retries = 1

    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    step = Step(args.api, args.ak, args.sk, connections=args.concurrency)

    async def handle(item: WorkItem) -> None:
        key, value = await step.process(item.payload, item.tp.topic, item.tp.partition, item.offset, now())
        await producer.send_and_wait(args.results, value=value, key=key)

    consumer = PyrallelConsumer(config=config, worker=handle, topic=args.input)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with running(step, producer, consumer):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
