"""The outcome publisher against a broker that goes away (a TCP proxy in front of Tansu)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faults.harness import ProxiedBroker

from worker.errors import BrokerUnavailable
from worker.publisher import Publisher
from worker.sandbox import create_topics
from worker.settings import load_settings


@contextlib.asynccontextmanager
async def publisher_behind_a_proxy(
    tmp_path: Path, prefix: str, created: tuple[str, ...] = ("in", "results", "dlq")
) -> AsyncIterator[tuple[ProxiedBroker, Publisher]]:
    """A started publisher writing through a TCP proxy to Tansu, to topics ``<prefix>-in``,
    ``-results`` and ``-dlq``, of which those in ``created`` exist; the proxy restored at the end."""
    topics = {
        "input_topic": f"{prefix}-in",
        "results_topic": f"{prefix}-results",
        "dlq_topic": f"{prefix}-dlq",
    }
    async with ProxiedBroker(tmp_path / "tansu.log") as pb:
        await create_topics(pb.bootstrap, [f"{prefix}-{role}" for role in created], partitions=1)
        publisher = Publisher(load_settings(kafka_bootstrap_servers=pb.bootstrap, **topics))
        await publisher.start()
        try:
            yield pb, publisher
        finally:
            await pb.proxy.restore()
            await publisher.stop()


async def test_the_gates_probe_after_a_failed_write_reaches_the_broker(tmp_path: Path) -> None:
    """The probe read the results topic's metadata, which the client answers from its cache once
    the topic has been seen: with the broker gone it passed at once, and the gate reopened onto
    writes that failed again. It is a metadata request now."""
    async with publisher_behind_a_proxy(tmp_path, "probe") as (pb, publisher):
        await publisher.ping()
        assert await publisher._producer.partitions_for("probe-results")  # seen: cached now
        await pb.proxy.cut("refuse")
        with pytest.raises(BrokerUnavailable, match="broker unreachable"):
            await publisher.ping()


async def test_the_dead_letter_probe_asks_the_broker_and_needs_the_topic(tmp_path: Path) -> None:
    """The dead-letter probe read the topic's partitions from the client's cache: with the broker
    gone it passed at once, and the pause for an unwritable dead letter never backed off. It asks
    the broker now, and fails while the topic does not exist."""
    async with publisher_behind_a_proxy(tmp_path, "dlqp", created=("in", "results")) as (pb, publisher):
        with pytest.raises(BrokerUnavailable, match="does not exist"):
            await publisher.ping_dead_letters()
        await create_topics(pb.bootstrap, ["dlqp-dlq"], partitions=2)
        await publisher.ping_dead_letters()
        assert await publisher._producer.partitions_for("dlqp-dlq")  # seen: cached now
        await pb.proxy.cut("refuse")
        with pytest.raises(BrokerUnavailable, match="broker unreachable"):
            await publisher.ping_dead_letters()
