"""What a test needs from the machine (a service, a program): skipped locally, a failure in CI.

CI must never go green because something it was meant to test could not run there.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis

from worker.dedup import DedupStore, open_store
from worker.redis_config import key_prefix

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_missing(what: str) -> None:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not available")
    pytest.skip(f"{what} is not available here")


class OwnRedis:
    """A redis-server of one test's own (the ``own_redis`` fixture), which the test may demote to a
    replica, as a failover does, and promote again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    async def _admin(self, *command: str) -> Any:
        async with aioredis.Redis(port=self.port) as admin:
            return await admin.execute_command(*command)

    async def demote(self) -> None:
        """A replica now, of a primary that is not there: every write is refused with READONLY."""
        await self._admin("REPLICAOF", "127.0.0.1", "1")

    async def promote(self) -> None:
        await self._admin("REPLICAOF", "NO", "ONE")

    def require_password(self) -> str:
        """Make the default user need a fresh password, as a Redis of the Bitnami chart does, and
        return it. The server is the test's own and ends with it: nothing to put back."""
        password = f"requirepass-{uuid.uuid4().hex}"
        with redis.Redis(port=self.port) as admin:
            admin.config_set("requirepass", password)
        return password

    async def connections(self) -> set[str]:
        """The ids of the server's client connections, other than the one asking."""
        async with aioredis.Redis(port=self.port) as admin:
            mine = str(await admin.client_id())
            return {c["id"] for c in await admin.client_list() if c["id"] != mine}


def store_redis(url: str) -> redis.Redis:
    """A plain client on the Redis db of the dedup store at ``url`` (the ``redis_url`` fixture's)."""
    parts = urlsplit(url)
    return redis.Redis(host=parts.hostname, port=parts.port, db=int(parts.path.strip("/") or 0))


@contextlib.asynccontextmanager
async def redis_store(url: str, window_s: float) -> AsyncIterator[DedupStore]:
    """A Redis dedup store answering new claims ``store_young`` for ``window_s`` after its epoch."""
    store = open_store(url, redis_forgotten_window_s=window_s)
    try:
        yield store
    finally:
        await store.close()


def forget_store(url: str) -> None:
    """What a Redis without persistence keeps of the dedup store at ``url`` when it restarts:
    nothing (every key under its prefix deleted, the epoch with the records)."""
    prefix = key_prefix(url)
    with store_redis(url) as client:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
