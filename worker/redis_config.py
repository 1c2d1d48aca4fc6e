"""The Redis client shared in shape by every Redis user of the worker (dedup store, rate limit).

One place for the pool policy, as ``kafka_config`` is for Kafka clients.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis

#: Connections per client; callers beyond them wait (up to REDIS_POOL_WAIT_S) for one.
REDIS_POOL_SIZE = 64
REDIS_POOL_WAIT_S = 5.0


#: The keys' prefix when the URL names none (``?prefix=``).
DEFAULT_PREFIX = "coc:dedup:"


def key_prefix(url: str) -> str:
    """The prefix of every key the worker writes in this Redis: the URL's ``?prefix=`` (the last
    one, as the store reads it), else the default."""
    found = [v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True) if k == "prefix"]
    return found[-1] if found else DEFAULT_PREFIX


def connection_url(url: str) -> str:
    """``url`` without the worker's own ``prefix`` option: the options left are redis-py's
    (``settings.REDIS_URL_OPTIONS``), which it reads from the URL itself."""
    parts = urlsplit(url)
    options = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "prefix"]
    return parts._replace(query=urlencode(options)).geturl()


def redis_client(url: str, *, socket_timeout_s: float) -> aioredis.Redis:
    """A client whose callers *wait* for a free connection when all are busy; ``aclose()`` closes
    its pool too.

    redis-py's default pool raises once its connections are in use, which with hundreds of jobs
    in flight would read as "the store is down" and pause the worker for nothing.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        connection_url(url),
        max_connections=REDIS_POOL_SIZE,
        timeout=REDIS_POOL_WAIT_S,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=15,
    )
    return aioredis.Redis.from_pool(pool)


async def leave_demoted_node(client: aioredis.Redis) -> None:
    """After a ``READONLY`` answer: a failover demoted the node the pooled connections reach (a
    primary behind a stable name, whose clients were not dropped), and pooled they would reach it
    for ever. New connections resolve the name again and find the new primary."""
    await client.connection_pool.disconnect()
