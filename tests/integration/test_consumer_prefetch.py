"""The worker's consumer against the real broker: what a pause keeps of aiokafka's prefetch."""

from __future__ import annotations

from waiting import until

from worker.consumer import Consumer, Message
from worker.offsets import PartitionKey
from worker.sandbox import TansuBroker, create_topics, produce
from worker.settings import load_settings


class _NoRebalanceWork:
    async def on_revoked(self, partitions: set[PartitionKey]) -> None:
        pass

    async def on_assigned(self, partitions: set[PartitionKey]) -> None:
        pass


async def test_a_paused_partition_keeps_its_prefetched_records_through_the_keep_alive_polls(
    broker: TansuBroker, unique: str
) -> None:
    """aiokafka drops the records it has prefetched for a paused partition that a poll touches (the
    second half pins that), and the worker's keep-alive polled that way at every wake-up of a pause,
    about ten times a second at full load. Its polls touch no partition of its own now: after the
    pause the next messages are still in hand, with no fetch to wait for."""
    topic = f"in-{unique}"
    await create_topics(broker.bootstrap, [topic], partitions=1)
    await produce(broker.bootstrap, topic, [(None, f"m{i}".encode(), None) for i in range(60)])
    settings = load_settings(
        kafka_bootstrap_servers=broker.bootstrap,
        input_topic=topic,
        group_id=f"group-{unique}",
        kafka_session_timeout_ms=2000,
        kafka_heartbeat_interval_ms=300,
        kafka_fetch_max_wait_ms=20,
    )
    consumer = Consumer(settings, _NoRebalanceWork())
    await consumer.start()
    taken: list[Message] = []

    async def some_taken() -> bool:
        taken.extend(await consumer.fetch(5, 0.2))
        return bool(taken)

    try:
        await until(some_taken, 20, what="the first messages")
        consumer.pause()
        for _ in range(3):
            assert await consumer.fetch(0, 0.0) == []  # the worker's keep-alive poll
        consumer.resume()
        held = await consumer.fetch(10, 0.0)  # no wait: only what is already prefetched
        assert [m.offset for m in held] == list(range(len(taken), len(taken) + 10))

        consumer.pause()
        await consumer._consumer.getmany(timeout_ms=0)  # a poll that names no partition
        consumer.resume()
        assert await consumer.fetch(10, 0.0) == []  # dropped: it must be fetched again
        assert [m.offset for m in await consumer.fetch(10, 5.0)][:1] == [len(taken) + 10]
    finally:
        await consumer.stop()
