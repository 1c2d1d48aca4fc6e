"""``Worker``'s rebalance handlers, without a broker: what a revocation leaves behind."""

from __future__ import annotations

from pathlib import Path

from worker.app import Worker
from worker.settings import WorkerSettings


async def test_a_revoked_partition_stops_being_reported_in_the_lag_metric(tmp_path: Path) -> None:
    """After a rebalance another member owns the partition and reports its lag: the value this pod
    measured before it lost the partition must not stay exported (summed across pods it counted
    twice, and a lag from a backlog kept an alert firing)."""
    settings = WorkerSettings(
        api_endpoint="http://127.0.0.1:1", api_ak="a", api_sk="b", dedup_url=f"sqlite:///{tmp_path}/d.sqlite3"
    )
    worker = Worker(settings)
    topic = settings.input_topic
    try:
        await worker.on_assigned({(topic, 0), (topic, 1)})
        worker.metrics.lag.labels(partition="0").set(16)
        worker.metrics.lag.labels(partition="1").set(11)

        await worker.on_revoked({(topic, 0)})
    finally:  # never started: only the clients' objects to close
        await worker._consumer.stop()
        await worker._publisher.stop()

    registry = worker.metrics.registry
    assert registry.get_sample_value("coc_worker_consumer_lag", {"partition": "0"}) is None
    assert registry.get_sample_value("coc_worker_consumer_lag", {"partition": "1"}) == 11
