"""Shared fixtures: the real Tansu broker (once per session), the real Redis, fresh topics per test.

A missing service skips its tests locally, with the reason printed, and fails the run in CI
(``CI=true``): CI must never go green by skipping the integration suite.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import structlog
from services import OwnRedis, service_missing

from worker.dedup import DedupStore, open_store
from worker.logs import bind_message_context
from worker.sandbox import TansuBroker, create_topics, free_port, wait_for_port

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-soak", action="store_true", default=False, help="run full-size soak scenarios")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-soak"):
        return
    skip = pytest.mark.skip(reason="soak scenario: run with `make soak`")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Commands run in-process configure logging globally: give every test the defaults back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    bind_message_context({})
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def broker() -> Iterator[TansuBroker]:
    """One real Tansu broker for the whole session (topics are unique per test)."""
    try:
        tansu = TansuBroker().start()
    except Exception as exc:  # the binary is missing or will not start
        service_missing(f"the Tansu broker ({exc})")
        raise
    try:
        yield tansu
    finally:
        tansu.stop()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def topics(broker: TansuBroker, unique: str) -> dict[str, str]:
    """Fresh input/results/DLQ topics for one test."""
    names = {
        "input": f"in-{unique}",
        "results": f"out-{unique}",
        "dlq": f"dlq-{unique}",
    }
    await create_topics(broker.bootstrap, list(names.values()), partitions=4)
    return names


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A redis-server of this test's own (the shared one must never be demoted)."""
    exe = shutil.which("redis-server")
    if exe is None:
        service_missing("redis-server (the binary, to run a Redis of the test's own)")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen([*args, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout_s=10)
        except TimeoutError:
            pytest.fail("redis-server did not start")
        yield OwnRedis(port)
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def redis_url(unique: str) -> Iterator[str]:
    """The real Redis on 127.0.0.1:6379, db 15, with a key prefix of this test only."""
    if not _port_open(REDIS_HOST, REDIS_PORT):
        service_missing(f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    prefix = f"test:{unique}:"
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/15?prefix={prefix}"
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=15)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DedupStore]:
    """A dedup store of each backend (the real Redis for ``redis``), closed after the test."""
    if request.param == "memory":
        url = "memory://?max_entries=1000"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/dedup.sqlite3"
    else:
        url = request.getfixturevalue("redis_url")
    opened = open_store(url)
    try:
        yield opened
    finally:
        await opened.close()
