"""Fixtures that run the real worker against the real broker, the simulator over HTTP and Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from waiting import until

from worker.app import Worker
from worker.sandbox import TansuBroker
from worker.settings import WorkerSettings, load_settings
from worker.simulator import SimulatorConfig, SimulatorServer

AK = "it-access-key"
SK = "it-secret-key-0123456789abcdef"


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorConfig(credentials={AK: SK}, auto_create=True)) as sim:
        yield sim


SettingsFactory = Callable[..., WorkerSettings]


@pytest.fixture
def make_settings(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, tmp_path: Path, unique: str
) -> SettingsFactory:
    """Settings for a worker of this test: its topics, its group, fast timings for tests."""

    def make(**overrides: Any) -> WorkerSettings:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": broker.bootstrap,
            "input_topic": topics["input"],
            "results_topic": topics["results"],
            "dlq_topic": topics["dlq"],
            "group_id": f"group-{unique}",
            "api_endpoint": simulator.url,
            "api_ak": AK,
            "api_sk": SK,
            "dedup_url": f"sqlite:///{tmp_path}/dedup.sqlite3",
            "http_host": "127.0.0.1",
            "http_port": 0,
            "kafka_session_timeout_ms": 2000,
            "kafka_heartbeat_interval_ms": 300,
            "kafka_fetch_max_wait_ms": 20,
            "commit_interval_s": 0.2,
            "retry_base_delay_s": 0.01,
            "retry_max_delay_s": 0.2,
            "probe_max_delay_s": 0.5,
            "shutdown_grace_s": 10,
            "revoke_grace_s": 5,
            "log_format": "json",
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@contextlib.asynccontextmanager
async def running_worker(settings: WorkerSettings, *, assigned: bool = True) -> AsyncIterator[Worker]:
    """Run a worker in this event loop; on exit stop it and wait for a clean shutdown."""
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.started.is_set() or task.done(), 20, 0.02, what="the worker to start")
        if task.done():
            task.result()
        if assigned:
            await until(lambda: bool(worker.status()["assigned"]), 20, 0.02, what="a partition assignment")
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
