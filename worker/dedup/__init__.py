"""Deduplication by ``event_id``: a claim before the API call, a record of what was applied after.

Each event id moves through three states in the store::

    (absent) --claim--> claimed(owner, lease) --API success-------------------> applied (TTL, 7 days)
                           |   |
                           |   +--not applied (rejected, failed), before its outcome--> done (TTL, 7 days)
                           |  lease expires / release
                           v
                        (absent)

* ``claimed`` is a lease: two workers racing on one event (after a rebalance) cannot both call
  the API; a crashed owner's claim expires after ``lease_s`` and may then be *taken over*. The
  taker is told (``Claim.taken_over``): the dead owner may have reached the API, so the change
  is checked against the ticket before it is sent again. The same holds for a worker's own
  unfinished claim (a job cancelled mid-call by a revocation or a shutdown past its grace, or a
  restart under the same worker id): its owner may claim it again at once, as a takeover.
* ``applied`` is written right after the API accepted the change, *before* the outcome is
  published, and is the event's last record: a redelivery, whether the crash came before the
  outcome was published or after, republishes ``applied`` without calling the API again.
* ``done`` remembers an outcome that is not ``applied`` (invalid, rejected, failed), the message
  it came from and its dead letter's detail, *before* the outcome and the dead letter are
  published: a redelivery repeats both, never calling the API again.
* Both keep the outcome's status and reason for the TTL. The same message read again (a crash
  before the commit) gets the same outcome again, marked ``redelivered``. Another message with
  the same ``event_id`` and the same change (the records' ``target``) is a duplicate when the
  event was applied; when it was rejected or failed, it may try again (a fixed ticket, a replay
  from the DLQ). One for another change reused the id: the claim answers ``DONE`` and the
  pipeline refuses it (records of an earlier release, without a target, cannot tell). A claim
  keeps its target too: a message for another change that meets an unfinished claim is refused
  the same way, and never takes the claim over, which the first message's redelivery does.

Backends by URL: ``memory://?max_entries=N`` (bounded LRU, one process), ``sqlite:///path``
(survives restarts on one node), ``redis://host:port/db?prefix=...`` (shared by all replicas).
Every backend failure is raised as ``DedupUnavailable``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from pydantic_core import to_json

from worker.errors import ConfigError, DedupUnavailable
from worker.logs import get_logger, redact_text
from worker.redis_config import DEFAULT_PREFIX, key_prefix, leave_demoted_node, redis_client
from worker.settings import MEMORY_MAX_ENTRIES, memory_max_entries

T = TypeVar("T")
log = get_logger(__name__)


class ClaimKind(StrEnum):
    NEW = "new"  # the caller now holds the claim and may call the API
    HELD = "held"  # another live owner holds it: wait, then ask again
    APPLIED = "applied"  # already applied; the outcome may not have been published
    DONE = "done"  # finished; its outcome and dead letter published, or owed to a redelivery


#: How long a claim record outlives its lease at least (so a taker learns it took over a dead
#: owner's claim); ``open_store`` keeps it as long as an applied record (``dedup_ttl_s``) when that
#: is longer: a message read again days after its worker crashed mid-send must still find the
#: claim, or it is sent again without a look at the ticket (the first send may have landed).
CLAIM_RECORD_KEEP_S = 24 * 3600.0
#: Written by the stores' probes; '@' never occurs in an event_id (nor "@probe" in an invalid
#: message's key, ``@topic/partition/offset``).
_PROBE_KEY = "@probe"
_PROBE_OWNER = "coc-worker-probe"
#: How long a Redis write waits for its replicas' acknowledgements (``RedisStore._write``).
_REPLICA_WAIT_MS = 1000


@dataclass(frozen=True, slots=True)
class DedupRecord:
    state: str  # "claimed" | "applied" | "done"
    owner: str = ""
    source: str = ""  # "topic/partition/offset" of the message that produced it
    status: str = ""  # outcome status, for "applied" and "done"
    attempts: int = 0
    http_status: int | None = None
    lease_until: float = 0.0  # epoch seconds, for "claimed"
    reason: str = ""  # outcome reason, for "applied" and "done"
    #: What a redelivery needs to repeat a dead letter, for "done" (redacted, cut short)
    error_code: str | None = None
    detail: str = ""
    #: What the event changes (``Pipeline``'s ``event_target``), for "applied" and "done": another
    #: message with this event_id but another target reused the id, it is not a duplicate
    target: str = ""

    def of_another_change(self, target: str) -> bool:
        """Whether this record is of another change than ``target``: the event_id was reused.
        A record without a target (an earlier release's) cannot tell."""
        return bool(target and self.target and self.target != target)

    def encode(self) -> str:
        # Not dataclasses.asdict (it deep-copies every value) nor the json module (3x slower):
        # both are measurable at three writes per event. The dead-letter fields and the target
        # are written only when set, and decode leaves out keys it does not know: a release reads
        # the records of a later one (a rolling update, a rollback).
        data = {name: getattr(self, name) for name in _BASE_FIELDS}
        if self.error_code is not None:
            data["error_code"] = self.error_code
        if self.detail:
            data["detail"] = self.detail
        if self.target:
            data["target"] = self.target
        return to_json(data).decode()

    @classmethod
    def decode(cls, text: str | bytes) -> DedupRecord:
        """Keys this release does not know (a later one's) are left out, not an error."""
        data = json.loads(text)
        return cls(**{name: value for name, value in data.items() if name in _RECORD_FIELDS})


_RECORD_FIELDS = frozenset(f.name for f in fields(DedupRecord))
_BASE_FIELDS = tuple(f.name for f in fields(DedupRecord) if f.name not in ("error_code", "detail", "target"))


@dataclass(frozen=True, slots=True)
class Claim:
    kind: ClaimKind
    record: DedupRecord | None = None
    taken_over: bool = False  # NEW over an unfinished claim: another owner's expired one, or our own

    @property
    def maybe_sent(self) -> bool:
        """Whether an earlier attempt may have reached the API without its answer being recorded:
        an unfinished claim, or an earlier message of this event that failed (its last answer may
        have been lost). The change is then checked against the ticket before it is sent."""
        return self.taken_over or (self.record is not None and self.record.status == "failed")


def decide(record: DedupRecord | None, owner: str, source: str, now: float, target: str = "") -> Claim:
    """What an existing record means for a new claim (``NEW``: the caller takes the claim).

    The one rule shared by every backend (the Redis script mirrors it). ``target``: what the
    claiming message's event changes; a rejected or failed event is retried by another message
    only for the same change (records without a target, an earlier release's, cannot tell).
    """
    if record is None:
        return Claim(ClaimKind.NEW)
    if record.of_another_change(target):
        # This message reuses the id: whatever the first change's state, it neither sends nor
        # takes the record over (an unfinished claim's change may have been sent; the first
        # message's redelivery takes it over and reads its own ticket).
        return Claim(ClaimKind.APPLIED if record.state == "applied" else ClaimKind.DONE, record)
    if record.state == "claimed":
        if record.owner == owner:  # a job of ours that did not finish: it may have sent the change
            return Claim(ClaimKind.NEW, record, taken_over=True)
        if record.lease_until > now:
            return Claim(ClaimKind.HELD, record)
        return Claim(ClaimKind.NEW, record, taken_over=True)
    if record.state == "applied":
        return Claim(ClaimKind.APPLIED, record)
    if record.status != "applied" and record.source != source:
        return Claim(ClaimKind.NEW, record)  # rejected/failed before: another message may retry
    return Claim(ClaimKind.DONE, record)


def claimed(owner: str, source: str, now: float, lease_s: float, target: str = "") -> DedupRecord:
    """A claim, with the change it is for: another change under the same id is a reuse."""
    return DedupRecord("claimed", owner, source, lease_until=now + lease_s, target=target)


class DedupStore(Protocol):
    """What the pipeline needs from a dedup backend (memory, sqlite, Redis): atomic claims with a
    lease, and the records that let a redelivery repeat its first answer instead of calling again."""

    async def claim(
        self, event_id: str, owner: str, source: str, lease_s: float, target: str = ""
    ) -> Claim: ...
    async def extend(self, event_id: str, owner: str, lease_s: float) -> bool: ...
    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None: ...
    async def mark_done(self, event_id: str, record: DedupRecord, ttl_s: float) -> None: ...
    async def release(self, event_id: str, owner: str) -> None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


# --- memory ---------------------------------------------------------------------------------------
class MemoryStore:
    """Bounded LRU in this process: protects against redelivery, not against restarts."""

    def __init__(
        self, max_entries: int = MEMORY_MAX_ENTRIES, claim_keep_s: float = CLAIM_RECORD_KEEP_S
    ) -> None:
        self._max = max_entries
        self._claim_keep_s = claim_keep_s
        self._items: OrderedDict[str, tuple[DedupRecord, float]] = OrderedDict()  # record, expires_at

    def _get(self, event_id: str) -> DedupRecord | None:
        item = self._items.get(event_id)
        if item is None:
            return None
        if item[1] < time.monotonic():
            del self._items[event_id]
            return None
        self._items.move_to_end(event_id)
        return item[0]

    def _put(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        self._items[event_id] = (record, time.monotonic() + ttl_s)
        self._items.move_to_end(event_id)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    async def claim(self, event_id: str, owner: str, source: str, lease_s: float, target: str = "") -> Claim:
        now = time.time()
        answer = decide(self._get(event_id), owner, source, now, target)
        if answer.kind is ClaimKind.NEW:
            self._put(event_id, claimed(owner, source, now, lease_s, target), lease_s + self._claim_keep_s)
        return answer

    async def extend(self, event_id: str, owner: str, lease_s: float) -> bool:
        record = self._get(event_id)
        if record is None or record.state != "claimed" or record.owner != owner:
            return False
        now = time.time()
        renewed = claimed(owner, record.source, now, lease_s, record.target)
        self._put(event_id, renewed, lease_s + self._claim_keep_s)
        return True

    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        self._put(event_id, record, ttl_s)

    async def mark_done(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        self._put(event_id, record, ttl_s)

    async def release(self, event_id: str, owner: str) -> None:
        record = self._get(event_id)
        if record is not None and record.state == "claimed" and record.owner == owner:
            del self._items[event_id]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# --- sqlite ---------------------------------------------------------------------------------------
class SqliteStore:
    """One file on local disk (WAL), written on the event loop's thread with group commit.

    Calls made in the same event-loop turn run together in one transaction, right after that
    turn: one commit per batch instead of per call. A WAL commit with ``synchronous=NORMAL`` is a
    ``write()`` without ``fsync`` (tens of microseconds), far cheaper than a hop to a thread and
    back, which measured as the worker's largest cost at moderate rates (CPU per event and p99
    latency). What may take milliseconds stays off the loop: checkpoints (which ``fsync``) run on
    a maintenance thread with their own connection, and expired records are purged in small
    indexed chunks.

    The WAL starts over only when a commit begins with every frame in it copied and no
    checkpoint running, which writes that never pause almost never allow: the WAL grew for ever
    (1.2 GB after 240,000 events, and slower with it). So when a checkpoint leaves a large WAL
    behind, the store holds its writes (callers queue, the loop runs on) for a second checkpoint
    of the little written meanwhile, and the commit after it starts the WAL over.
    """

    _CHECKPOINT_EVERY_S = 1.0
    #: Pages (32 MiB). Each hold stops every dedup write for a checkpoint's length (7-15 ms here),
    #: and at SQLite's own auto-checkpoint size (1,000 pages) one came every ~2 s at 1,000 events/s:
    #: the p99 of an event held by the worker fell from 87-101 to 64-73 ms at 8,000 (three
    #: alternating pairs, bench/README.md).
    _WAL_RESTART_FRAMES = 8000
    _WAL_KEEP_BYTES = 64 << 20  # a WAL file grown larger by a burst is cut back to this on restart
    _PURGE_EVERY_S = 60.0
    _PURGE_CHUNK = 1000

    def __init__(self, path: Path, claim_keep_s: float = CLAIM_RECORD_KEEP_S) -> None:
        self._path = path
        self._claim_keep_s = claim_keep_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dedup-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._batch: list[tuple[Any, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._last_purge = 0.0
        self._last_checkpoint = time.monotonic()
        self._checkpoint: Future[int] | None = None
        self._holding = False  # writes wait for the checkpoint that lets the WAL start over
        self._maintenance_conn: sqlite3.Connection | None = None  # used on the maintenance thread only
        self._checkpoint_failing = False  # on the maintenance thread only: said once per episode
        self._closed = False

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._batch and not self._holding:
            loop.call_soon(self._run_batch)
        self._batch.append((fn, args, future))
        try:
            return await future
        except (sqlite3.Error, OSError) as exc:
            raise DedupUnavailable(f"sqlite dedup store: {exc}") from exc

    def _run_batch(self) -> None:
        """Every call queued in the last loop turn, in one transaction."""
        batch, self._batch = self._batch, []
        if self._closed:  # a hold released after close(), or a turn that began before it
            _settle(
                [(future, None, DedupUnavailable("sqlite dedup store is closed")) for _, _, future in batch]
            )
            return
        try:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = [_call(conn, fn, args, future) for fn, args, future in batch]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back itself (a full disk): the
                    conn.execute("ROLLBACK")  # error to report is that one, not "no transaction"
                raise
        except Exception as exc:  # every waiting caller must hear about it, whatever it is
            _settle([(future, None, exc) for _, _, future in batch])
            return
        _settle(results)
        try:
            self._maintain(conn)
        except Exception as exc:  # the batch is committed and answered; the upkeep runs again next time
            log.warning("dedup_maintenance_failed", error=type(exc).__name__, detail=str(exc))

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the maintenance thread checkpoints
            conn.execute(f"PRAGMA journal_size_limit={self._WAL_KEEP_BYTES}")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS dedup (event_id TEXT PRIMARY KEY, record TEXT NOT NULL,"
                " expires_at REAL NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS dedup_expires_at ON dedup (expires_at)")
            self._conn = conn
        return self._conn

    def _maintain(self, conn: sqlite3.Connection) -> None:
        now = time.monotonic()
        if now - self._last_purge > self._PURGE_EVERY_S:
            deleted = conn.execute(
                "DELETE FROM dedup WHERE rowid IN (SELECT rowid FROM dedup WHERE expires_at < ? LIMIT ?)",
                (time.time(), self._PURGE_CHUNK),
            ).rowcount
            if deleted < self._PURGE_CHUNK:  # otherwise the next batch deletes the next chunk
                self._last_purge = now
        if self._checkpoint is not None and self._checkpoint.done():
            frames = self._checkpoint.result()
            self._checkpoint = None
            # A WAL this large has not started over since: a commit began while a checkpoint ran.
            # Only after a regular checkpoint (a hold's is forgotten by ``_release_hold``): a reader
            # that keeps the WAL from being copied (someone inspecting the file) must not turn
            # every batch into a hold.
            if frames >= self._WAL_RESTART_FRAMES:
                self._hold_for_checkpoint()
                return
        if now - self._last_checkpoint > self._CHECKPOINT_EVERY_S and self._checkpoint is None:
            self._last_checkpoint = now
            self._checkpoint = self._executor.submit(self._checkpoint_wal)

    def _hold_for_checkpoint(self) -> None:
        """Queue writes while the maintenance thread copies the frames the last checkpoint missed:
        with none added meanwhile it copies them all, and the next commit starts the WAL over."""
        self._checkpoint = self._executor.submit(self._checkpoint_wal)  # first: it raises once closed
        self._holding = True
        asyncio.wrap_future(self._checkpoint).add_done_callback(self._release_hold)

    def _release_hold(self, _: object) -> None:
        self._holding = False
        self._checkpoint = None  # its count is not looked at: the next commit starts the WAL over
        if self._batch:
            self._run_batch()

    def _checkpoint_wal(self) -> int:
        """On the maintenance thread: copy the WAL into the database without blocking writers.

        Returns the frames in the WAL (since it last started over)."""
        try:
            if self._maintenance_conn is None:
                self._maintenance_conn = sqlite3.connect(
                    self._path, isolation_level=None, check_same_thread=False, timeout=5
                )
            _, frames, _ = self._maintenance_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except (sqlite3.Error, OSError) as exc:  # retried a second later; the WAL only grows meanwhile
            if not self._checkpoint_failing:  # said once per episode, not every second
                log.warning("dedup_checkpoint_failed", error=type(exc).__name__, detail=str(exc))
            self._checkpoint_failing = True
            return 0
        if self._checkpoint_failing:
            log.info("dedup_checkpoint_recovered")
            self._checkpoint_failing = False
        return int(frames)

    @staticmethod
    def _read(conn: sqlite3.Connection, event_id: str, now: float) -> DedupRecord | None:
        row = conn.execute(
            "SELECT record FROM dedup WHERE event_id = ? AND expires_at >= ?", (event_id, now)
        ).fetchone()
        return DedupRecord.decode(row[0]) if row else None

    @staticmethod
    def _write(conn: sqlite3.Connection, event_id: str, record: DedupRecord, expires_at: float) -> None:
        conn.execute(
            "INSERT INTO dedup (event_id, record, expires_at) VALUES (?, ?, ?) ON CONFLICT(event_id)"
            " DO UPDATE SET record = excluded.record, expires_at = excluded.expires_at",
            (event_id, record.encode(), expires_at),
        )

    # Each operation runs on the sqlite thread, inside the batch's transaction.
    @classmethod
    def _claim_op(
        cls,
        conn: sqlite3.Connection,
        event_id: str,
        owner: str,
        source: str,
        lease_s: float,
        keep_s: float,
        target: str,
    ) -> Claim:
        now = time.time()
        answer = decide(cls._read(conn, event_id, now), owner, source, now, target)
        if answer.kind is ClaimKind.NEW:
            record = claimed(owner, source, now, lease_s, target)
            cls._write(conn, event_id, record, now + lease_s + keep_s)
        return answer

    @classmethod
    def _extend_op(
        cls, conn: sqlite3.Connection, event_id: str, owner: str, lease_s: float, keep_s: float
    ) -> bool:
        now = time.time()
        record = cls._read(conn, event_id, now)
        if record is None or record.state != "claimed" or record.owner != owner:
            return False
        renewed = claimed(owner, record.source, now, lease_s, record.target)
        cls._write(conn, event_id, renewed, now + lease_s + keep_s)
        return True

    @classmethod
    def _put_op(cls, conn: sqlite3.Connection, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        cls._write(conn, event_id, record, time.time() + ttl_s)

    @classmethod
    def _release_op(cls, conn: sqlite3.Connection, event_id: str, owner: str) -> None:
        record = cls._read(conn, event_id, time.time())
        if record is not None and record.state == "claimed" and record.owner == owner:
            conn.execute("DELETE FROM dedup WHERE event_id = ?", (event_id,))

    async def claim(self, event_id: str, owner: str, source: str, lease_s: float, target: str = "") -> Claim:
        result: Claim = await self._run(
            self._claim_op, event_id, owner, source, lease_s, self._claim_keep_s, target
        )
        return result

    async def extend(self, event_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self._run(self._extend_op, event_id, owner, lease_s, self._claim_keep_s))

    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        await self._run(self._put_op, event_id, record, ttl_s)

    async def mark_done(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        await self._run(self._put_op, event_id, record, ttl_s)

    async def release(self, event_id: str, owner: str) -> None:
        await self._run(self._release_op, event_id, owner)

    async def ping(self) -> None:
        """A claim of the probe key: a full disk or a read-only file answers ``SELECT 1`` all the
        same, and the gate would reopen onto a store that refuses every claim."""
        await self.claim(_PROBE_KEY, _PROBE_OWNER, "probe", 1.0)

    async def close(self) -> None:
        self._closed = True  # no batch after this one opens the database again
        self._executor.shutdown(wait=True)
        if self._maintenance_conn is not None:
            self._maintenance_conn.close()
            self._maintenance_conn = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _call(
    conn: sqlite3.Connection, fn: Any, args: tuple[Any, ...], future: asyncio.Future[Any]
) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
    """One call of a batch. A failure of the database fails the whole batch (it is rolled back);
    any other is this call's own (a record it cannot read, written before it raised nothing) and
    goes to its caller alone, not to every other event of the batch."""
    try:
        return future, fn(conn, *args), None
    except sqlite3.Error:
        raise
    except Exception as exc:
        return future, None, exc


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.done():  # its caller was cancelled meanwhile
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


# --- redis ----------------------------------------------------------------------------------------
# Claim atomically with Redis' clock, following ``decide()``. Returns {taken, previous-or-false}.
_CLAIM_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('GET', KEYS[1])
if v then
  local ok, r = pcall(cjson.decode, v)
  -- unreadable: answered as it is, for the caller to refuse (as sqlite does), not a store error
  if not ok or type(r) ~= 'table' then return {0, v} end
  -- the id reused for another change: never taken, whatever the record's state
  if ARGV[6] ~= '' and r['target'] and r['target'] ~= '' and r['target'] ~= ARGV[6] then return {0, v} end
  if r['state'] == 'claimed' then
    if r['owner'] ~= ARGV[1] and tonumber(r['lease_until']) > now then return {0, v} end
  elseif r['state'] == 'applied' then
    return {0, v}
  elseif r['status'] == 'applied' or r['source'] == ARGV[3] then
    return {0, v}
  end
end
local mine = cjson.decode(ARGV[2])
mine['lease_until'] = now + tonumber(ARGV[4])
redis.call('SET', KEYS[1], cjson.encode(mine), 'PX', ARGV[5])
return {1, v or false}
"""
_EXTEND_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, r = pcall(cjson.decode, v)
if not ok or type(r) ~= 'table' then return 0 end
if r['state'] == 'claimed' and r['owner'] == ARGV[1] then
  local t = redis.call('TIME')
  r['lease_until'] = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2])
  redis.call('SET', KEYS[1], cjson.encode(r), 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, r = pcall(cjson.decode, v)
if not ok or type(r) ~= 'table' then return 0 end
if r['state'] == 'claimed' and r['owner'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _NotReplicated(DedupUnavailable):
    """A Redis write the primary made but too few replicas acknowledged; ``result`` is its answer."""

    def __init__(self, detail: str, result: Any) -> None:
        super().__init__(detail)
        self.result = result


class RedisStore:
    """Shared by every replica; atomic claims by Lua script."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        claim_keep_s: float = CLAIM_RECORD_KEEP_S,
        min_replicas: int = 0,
    ) -> None:
        self._prefix = prefix
        self._claim_keep_s = claim_keep_s
        self._min_replicas = min_replicas
        #: Events whose claim here was refused for want of replicas only (``claim``), with the
        #: record that claim replaced on the primary (None: none).
        self._unreplicated: dict[str, str | bytes | None] = {}
        self._client: aioredis.Redis = redis_client(url, socket_timeout_s=2.0)
        self._claim = self._client.register_script(_CLAIM_LUA)
        self._extend = self._client.register_script(_EXTEND_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)

    def _key(self, event_id: str) -> str:
        return self._prefix + event_id

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            # One lost connection, all of them, most likely (a restart, a failover, a network cut):
            # the probe would pass on a fresh one and each job then meet another dead one, every
            # pause starting from the backoff already reached. The idle ones are dropped and made
            # afresh; those in use end on their own.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            # redis-py's text names the address it tried (never the password; redacted all the same)
            reason = redact_text(str(exc))[:200]
            raise DedupUnavailable(
                f"redis dedup store unreachable: {type(exc).__name__}" + (f": {reason}" if reason else "")
            ) from exc
        except redis_errors.ReadOnlyError as exc:
            await leave_demoted_node(self._client)
            raise DedupUnavailable("redis dedup store is a read-only replica now (failover)") from exc
        except redis_errors.RedisError as exc:
            raise DedupUnavailable(f"redis dedup store error: {type(exc).__name__}") from exc

    async def _write(self, command: Callable[[Any], Any]) -> Any:
        """``command(client)``, a write. With ``min_replicas``, sent on one connection followed by
        ``WAIT``, and refused as the store being away unless that many replicas acknowledged it:
        Redis replicates asynchronously, and a failover lost the last claims and records the
        worker had acted on (another worker claimed the same event as new and sent it too)."""
        if not self._min_replicas:
            return await self._call(command(self._client))

        async def replicated() -> Any:
            async with self._client.pipeline(transaction=False) as pipe:
                queued = command(pipe)
                if inspect.isawaitable(queued):  # a script queues itself in a coroutine
                    await queued
                pipe.wait(self._min_replicas, _REPLICA_WAIT_MS)
                result, acked = await pipe.execute()
            if acked < self._min_replicas:
                raise _NotReplicated(
                    f"redis dedup store: a write reached {acked} of {self._min_replicas} replicas"
                    f" in {_REPLICA_WAIT_MS} ms",
                    result,
                )
            return result

        return await self._call(replicated())

    async def claim(self, event_id: str, owner: str, source: str, lease_s: float, target: str = "") -> Claim:
        mine = DedupRecord("claimed", owner, source, target=target).encode()
        keep_ms = int((lease_s + self._claim_keep_s) * 1000)
        try:
            taken, previous = await self._write(
                lambda client: self._claim(
                    keys=[self._key(event_id)],
                    args=[owner, mine, source, lease_s, keep_ms, target],
                    client=client,
                )
            )
        except _NotReplicated as exc:
            refused_taken, replaced = exc.result
            if refused_taken:  # written on the primary: our claim, nothing sent yet
                # What it replaced is what this claim answers for when asked again (the first
                # refusal's: a second would only have replaced our own claim).
                self._unreplicated.setdefault(event_id, replaced or None)
            raise
        record = DedupRecord.decode(previous) if previous else None
        if taken:
            if event_id in self._unreplicated:
                replaced = self._unreplicated.pop(event_id)
                if record is not None and record.state == "claimed" and record.owner == owner:
                    # Our own claim, written by the refused attempt: the record before it tells
                    # what this claim took over (another owner's expired claim, a failed event).
                    record = DedupRecord.decode(replaced) if replaced else None
            # The script followed decide(): any previous claim (another owner's expired one, or
            # our own unfinished one) was a takeover.
            return Claim(ClaimKind.NEW, record, taken_over=record is not None and record.state == "claimed")
        assert record is not None
        # Not taken: held by a live owner, claimed for another change, applied, or done. decide()
        # says which (a held claim's lease is by definition in the future of Redis' clock, hence
        # "now" = 0 for it).
        return decide(record, owner, source, 0.0, target)

    async def extend(self, event_id: str, owner: str, lease_s: float) -> bool:
        keep_ms = int((lease_s + self._claim_keep_s) * 1000)
        extended = await self._write(
            lambda client: self._extend(
                keys=[self._key(event_id)], args=[owner, lease_s, keep_ms], client=client
            )
        )
        return bool(extended)

    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        await self._put(event_id, record, ttl_s)

    async def mark_done(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        await self._put(event_id, record, ttl_s)

    async def _put(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        value = record.encode()
        await self._write(lambda client: client.set(self._key(event_id), value, px=int(ttl_s * 1000)))

    async def release(self, event_id: str, owner: str) -> None:
        await self._call(self._release(keys=[self._key(event_id)], args=[owner]))

    async def ping(self) -> None:
        """A claim of the probe key, not ``PING``: a replica answers ``PING``, as an ACL user
        without scripts answers a ``SET``, and the gate would reopen onto a node (or with a user)
        that refuses every claim."""
        await self.claim(_PROBE_KEY, _PROBE_OWNER, "probe", 1.0)  # acknowledged as a claim must be

    async def close(self) -> None:
        await self._client.aclose()


def open_store(url: str, record_ttl_s: float = 0.0, redis_min_replicas: int = 0) -> DedupStore:
    """The backend named by ``url`` (``COC_WORKER_DEDUP_URL``); ``record_ttl_s`` is how long it
    keeps an applied or done record (``dedup_ttl_s``), claims at least as long;
    ``redis_min_replicas`` the replicas that must acknowledge each Redis write."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    keep_s = max(CLAIM_RECORD_KEEP_S, record_ttl_s)
    if parts.scheme == "memory":
        try:
            return MemoryStore(max_entries=memory_max_entries(url), claim_keep_s=keep_s)
        except ValueError as exc:
            raise ConfigError(f"COC_WORKER_DEDUP_URL: {exc}") from None
    if parts.scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :].split("?", 1)[0])
        if not url.startswith("sqlite:///") or not path:
            raise ConfigError("COC_WORKER_DEDUP_URL: use sqlite:///relative/path or sqlite:////absolute/path")
        return SqliteStore(Path(path), claim_keep_s=keep_s)
    if parts.scheme in ("redis", "rediss"):
        for option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            # Read when connecting: a missing file would look like the store being down.
            if option in query and not os.access(query[option], os.R_OK):
                raise ConfigError(f"COC_WORKER_DEDUP_URL: ?{option}= names no readable file: {query[option]}")
        if query.get("ssl_cert_reqs") == "none":  # said as loudly as for Kafka and the API
            log.warning("redis_tls_verification_disabled", setting="COC_WORKER_DEDUP_URL")
        return RedisStore(
            url,
            prefix=key_prefix(url),
            claim_keep_s=keep_s,
            min_replicas=redis_min_replicas,
        )
    raise ConfigError(f"COC_WORKER_DEDUP_URL: unsupported scheme {parts.scheme!r}")
