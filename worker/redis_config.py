"""The Redis client shared in shape by every Redis user of the worker (dedup store, rate limit).

One place for the pool policy, as ``kafka_config`` is for Kafka clients, and for the login:
``dedup_target`` is where every Redis client's URL and password come from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

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


@dataclass(frozen=True)
class DedupTarget:
    """The dedup store's URL, and the Redis password given apart from it
    (``COC_WORKER_DEDUP_REDIS_PASSWORD``). Kept apart all the way to redis-py, never spliced into
    the URL: a URL is what logs, errors and ``dedup_url_shown`` show, and the password must not
    ride along; nor does the repr show it."""

    url: str
    password: str | None = field(default=None, repr=False)


def dedup_target(settings: WorkerSettings) -> DedupTarget:
    """Where every Redis client of the worker connects and how it logs in (the dedup store, and the
    rate limit that shares its Redis): the one place the password setting is read for them. A
    ``_FILE`` is read now, at the client's making: a rotated password needs a restart, as a rotated
    URL does (redis-py keeps the password for every connection it makes later)."""
    return DedupTarget(settings.dedup_url, settings.secret("dedup_redis_password"))


def redis_client(target: DedupTarget | str, *, socket_timeout_s: float) -> aioredis.Redis:
    """A client whose callers *wait* for a free connection when all are busy; ``aclose()`` closes
    its pool too. ``target``: a URL alone, or with the password of its own setting.

    redis-py's default pool raises once its connections are in use, which with hundreds of jobs
    in flight would read as "the store is down" and pause the worker for nothing.
    """
    if isinstance(target, str):
        target = DedupTarget(target)
    pool = aioredis.BlockingConnectionPool.from_url(
        connection_url(target.url),
        # the setting's; None: the URL's own, if any (settings refuse a password in both)
        password=target.password,
        max_connections=REDIS_POOL_SIZE,
        timeout=REDIS_POOL_WAIT_S,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=15,
    )
    return aioredis.Redis.from_pool(pool)


#: Redis' READONLY code, wherever it stands in an error's text (first, or after a script's "-").
_READ_ONLY = re.compile(r"\bREADONLY\b")


def is_read_only(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis' ``READONLY`` refusal: the node is a replica now (a failover), and
    ``leave_demoted_node`` is due. redis-py raises ``ReadOnlyError`` for the plain answer; before
    Redis 7, a write refused inside a script (every write of the dedup store and the rate limit)
    comes back wrapped in the script's error, ``ERR Error running script (call to f_…):
    @user_script:N: -READONLY You can't write against a read only replica.``, a plain
    ``ResponseError``: the pool was never dropped, and the worker stayed paused on the demoted node
    (its probe is a script too)."""
    return isinstance(exc, redis_errors.ReadOnlyError) or (
        isinstance(exc, redis_errors.ResponseError) and _READ_ONLY.search(server_text(exc)) is not None
    )


def server_text(exc: BaseException) -> str:
    """A Redis error's own words. Inside a pipeline (``min_replicas``: the write and its ``WAIT``)
    redis-py puts the command before them, ``Command # 1 (EVALSHA … <key> …) of pipeline caused
    error: …``, and a key holds a producer's event_id: an id with READONLY or WRONGTYPE in it made
    another error read as that one."""
    return str(exc).rpartition(" of pipeline caused error: ")[2]


async def leave_demoted_node(client: aioredis.Redis) -> None:
    """After a ``READONLY`` answer: a failover demoted the node the pooled connections reach (a
    primary behind a stable name, whose clients were not dropped), and pooled they would reach it
    for ever. New connections resolve the name again and find the new primary."""
    await client.connection_pool.disconnect()
