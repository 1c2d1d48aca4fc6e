"""The ``sqlite:///`` dedup backend: records that survive a restart on one node.

Its group commit's helpers (``_call``, ``_settle``) are here with it, their only user.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from worker.dedup.records import (
    CLAIM_RECORD_KEEP_S,
    PROBE_KEY,
    PROBE_OWNER,
    Claim,
    DedupRecord,
    claim_over,
    done_may_replace,
    renewed,
)
from worker.errors import DedupUnavailable
from worker.logs import get_logger

log = get_logger(__name__)


#: How long a batch waits for another writer's lock (an operator's ``sqlite3`` shell, a backup, a
#: second process on the same file) before the store reports itself unavailable and the worker
#: pauses: it waits on the event loop's thread, so everything else waits with it (5 s stopped
#: heartbeats, /healthz and every job). The maintenance thread's checkpoints never take the lock.
_LOCKED_WAIT_S = 0.1


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

    remote = False

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
            conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=_LOCKED_WAIT_S
            )
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
        token: str,
    ) -> Claim:
        now = time.time()
        answer, record = claim_over(
            cls._read(conn, event_id, now), owner, source, now, lease_s, target, token
        )
        if record is not None:
            cls._write(conn, event_id, record, now + lease_s + keep_s)
        return answer

    @classmethod
    def _extend_op(
        cls, conn: sqlite3.Connection, event_id: str, owner: str, lease_s: float, keep_s: float, token: str
    ) -> bool:
        now = time.time()
        renewal = renewed(cls._read(conn, event_id, now), owner, token, now, lease_s)
        if renewal is None:
            return False
        cls._write(conn, event_id, renewal, now + lease_s + keep_s)
        return True

    @classmethod
    def _put_op(cls, conn: sqlite3.Connection, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        cls._write(conn, event_id, record, time.time() + ttl_s)

    @classmethod
    def _done_op(
        cls,
        conn: sqlite3.Connection,
        event_id: str,
        record: DedupRecord,
        ttl_s: float,
        owner: str,
        token: str,
    ) -> DedupRecord | None:
        now = time.time()
        current = cls._read(conn, event_id, now)
        if not done_may_replace(current, owner, token, now):
            return current
        cls._write(conn, event_id, record, now + ttl_s)
        return None

    @classmethod
    def _release_op(cls, conn: sqlite3.Connection, event_id: str, owner: str, token: str) -> None:
        record = cls._read(conn, event_id, time.time())
        if record is not None and record.is_claim_of(owner, token):
            conn.execute("DELETE FROM dedup WHERE event_id = ?", (event_id,))

    async def claim(
        self, event_id: str, owner: str, source: str, lease_s: float, target: str = "", token: str = ""
    ) -> Claim:
        result: Claim = await self._run(
            self._claim_op, event_id, owner, source, lease_s, self._claim_keep_s, target, token
        )
        return result

    async def extend(self, event_id: str, owner: str, lease_s: float, token: str = "") -> bool:
        return bool(await self._run(self._extend_op, event_id, owner, lease_s, self._claim_keep_s, token))

    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        await self._run(self._put_op, event_id, record, ttl_s)

    async def mark_done(
        self, event_id: str, record: DedupRecord, ttl_s: float, *, owner: str = "", token: str = ""
    ) -> DedupRecord | None:
        kept: DedupRecord | None = await self._run(self._done_op, event_id, record, ttl_s, owner, token)
        return kept

    async def release(self, event_id: str, owner: str, token: str = "") -> None:
        await self._run(self._release_op, event_id, owner, token)

    async def ping(self) -> None:
        """A claim of the probe key: a full disk or a read-only file answers ``SELECT 1`` all the
        same, and the gate would reopen onto a store that refuses every claim."""
        await self.claim(PROBE_KEY, PROBE_OWNER, "probe", 1.0)

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
