"""Every dedup backend keeps the same promises: one claim at a time, applied events stay applied."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from redis._parsers.base import BaseParser
from redis.exceptions import ReadOnlyError, ResponseError
from services import OwnRedis, forget_store, redis_store, store_redis
from structlog.testing import capture_logs
from waiting import until

from worker import dedup, redis_config
from worker.dedup import (
    Claim,
    ClaimKind,
    DedupRecord,
    DedupStore,
    MemoryStore,
    RedisStore,
    SqliteStore,
    open_store,
)
from worker.errors import ConfigError, DedupUnavailable
from worker.metrics import Metrics
from worker.ratelimit import RedisTokenBucket
from worker.redis_config import REDIS_POOL_SIZE, connection_url, dedup_target, key_prefix
from worker.sandbox import free_port
from worker.settings import load_settings


async def test_first_claim_wins_and_others_see_it_held(store: DedupStore) -> None:
    assert (await store.claim("e1", "w1", "t/0/1", 30)).kind is ClaimKind.NEW
    held = await store.claim("e1", "w2", "t/0/1", 30)
    assert held.kind is ClaimKind.HELD
    assert held.record is not None
    assert held.record.owner == "w1"
    # its owner may claim it again at once (a job of its own that did not finish), and is told it
    # took the claim over: that job may have reached the API
    again = await store.claim("e1", "w1", "t/0/1", 30)
    assert again.kind is ClaimKind.NEW
    assert again.taken_over
    assert again.maybe_sent
    assert again.record is not None
    assert again.record.owner == "w1"


async def claim_once_expired(store: DedupStore, event_id: str, *args: Any) -> Claim:
    """``store.claim(event_id, *args)``, asked until it answers NEW: an earlier lease ran out."""
    answers: list[Claim] = []

    async def taken() -> bool:
        answers.append(await store.claim(event_id, *args))
        return answers[-1].kind is ClaimKind.NEW

    await until(taken, timeout_s=5, every_s=0.02, what="the lease to run out")
    return answers[-1]


async def test_lease_expires_and_the_taker_knows_it_took_over(store: DedupStore) -> None:
    first = await store.claim("e2", "w1", "t/0/1", 0.05)
    assert first.kind is ClaimKind.NEW
    assert not first.taken_over
    claim = await claim_once_expired(store, "e2", "w2", "t/0/1", 30)
    assert claim.taken_over  # w1 may have reached the API before it died
    assert claim.record is not None
    assert claim.record.owner == "w1"
    # w2 now holds it; w1's lease is gone
    assert not await store.extend("e2", "w1", 30)
    assert await store.extend("e2", "w2", 30)


async def test_extend_keeps_a_claim_alive(store: DedupStore) -> None:
    await store.claim("e8", "w1", "t/0/1", 0.3)
    deadline = asyncio.get_running_loop().time() + 0.6
    while asyncio.get_running_loop().time() < deadline:
        assert await store.extend("e8", "w1", 0.3)
        assert (await store.claim("e8", "w2", "t/0/1", 30)).kind is ClaimKind.HELD
        await asyncio.sleep(0.05)


async def test_rejected_events_repeat_for_their_message_and_retry_for_another(store: DedupStore) -> None:
    await store.claim("e9", "w1", "t/0/5", 30)
    await store.mark_done(
        "e9", DedupRecord("done", "w1", "t/0/5", "rejected", 1, 400, reason="api_rejected"), 60, owner="w1"
    )
    same = await store.claim("e9", "w2", "t/0/5", 30)
    assert same.kind is ClaimKind.DONE  # the same message read again: repeat its outcome
    assert same.record is not None
    assert same.record.reason == "api_rejected"
    other = await store.claim("e9", "w2", "dlq-replay/0/1", 30)
    assert other.kind is ClaimKind.NEW  # a replay of a fixed event may try again
    assert not other.taken_over
    assert not other.maybe_sent  # the API refused it: nothing to check before sending


async def test_a_not_applied_event_is_retried_only_for_the_same_change(store: DedupStore) -> None:
    """Another message may retry a rejected or failed event, not reuse its id for another change
    (that one is refused: DONE, its outcome decided by the caller); a record without a target (an
    earlier release's) cannot tell, and lets it through as before."""
    first = DedupRecord("done", "w1", "t/0/1", "rejected", 1, 400, target="change.ended CM1/s-1")
    await store.mark_done("e9", first, 60)
    other = await store.claim("e9", "w2", "t/0/2", 30, "change.started CM1/s-1")
    assert (other.kind, other.record) == (ClaimKind.DONE, first)
    same = await store.claim("e9", "w2", "t/0/3", 30, "change.ended CM1/s-1")
    assert same.kind is ClaimKind.NEW
    await store.mark_done("e10", DedupRecord("done", "w1", "t/0/4", "failed", 8, 503), 60)
    assert (await store.claim("e10", "w2", "t/0/5", 30, "change.started CM1/s-1")).kind is ClaimKind.NEW


async def test_an_unfinished_claim_for_another_change_is_not_taken_over(store: DedupStore) -> None:
    """A claim keeps its change: a message reusing the id for another change, meeting a claim that
    is unfinished (its job cancelled, its worker gone, its lease expired), took it over and sent
    its own change; the first change, sent and unconfirmed, was then refused as the reuse."""
    started = "change.started CM1/s-1"
    first = await store.claim("e11", "w1", "t/0/1", 0.05, started)
    assert first.kind is ClaimKind.NEW
    assert await store.extend("e11", "w1", 0.05)  # a renewal keeps the target
    for owner in ("w1", "w2"):  # the same worker (its job cancelled) or another (the lease out)
        other = await store.claim("e11", owner, "t/0/2", 30, "change.started CM2/s-2")
        assert other.kind is ClaimKind.DONE
        assert other.record is not None
        assert (other.record.state, other.record.target, other.record.source) == ("claimed", started, "t/0/1")
    # the first message read again still takes its own claim over, and reads its ticket first
    again = await claim_once_expired(store, "e11", "w2", "t/0/1", 30, started)
    assert again.taken_over
    assert again.maybe_sent


async def test_a_failed_event_retried_by_another_message_may_have_been_sent(store: DedupStore) -> None:
    await store.claim("e10", "w1", "t/0/5", 30)
    await store.mark_done(
        "e10", DedupRecord("done", "w1", "t/0/5", "failed", 5, None, reason="api_failed"), 60, owner="w1"
    )
    replay = await store.claim("e10", "w2", "dlq-replay/0/1", 30)
    assert replay.kind is ClaimKind.NEW
    assert not replay.taken_over
    assert replay.maybe_sent  # its last answer may have been lost: read the ticket first


async def test_extend_only_by_owner(store: DedupStore) -> None:
    await store.claim("e3", "w1", "t/0/1", 30)
    assert await store.extend("e3", "w1", 30)
    assert not await store.extend("e3", "w2", 30)
    assert not await store.extend("missing", "w1", 30)


async def test_applied_then_done(store: DedupStore) -> None:
    await store.claim("e4", "w1", "t/0/7", 30)
    applied = DedupRecord("applied", "w1", "t/0/7", "applied", 2, 200, target="change.started CM1/s-1")
    await store.mark_applied("e4", applied, 60)
    claim = await store.claim("e4", "w2", "t/0/9", 30)
    assert claim.kind is ClaimKind.APPLIED
    assert claim.record == applied  # the target too: a reuse of the id is told from a copy by it
    assert not await store.extend("e4", "w1", 30)  # no longer a claim
    assert await store.mark_done("e5", DedupRecord("done", "w1", "t/0/7", "failed", 2, 503), 60) is None
    claim = await store.claim("e5", "w1", "t/0/7", 30)
    assert claim.kind is ClaimKind.DONE
    assert claim.record is not None
    assert claim.record.source == "t/0/7"


async def test_a_done_record_never_replaces_an_applied_one(store: DedupStore) -> None:
    """A worker whose claim ran out while its gate was closed (an outage longer than the lease)
    finished late, after another worker had taken the event over and applied it: its done-record
    (failed) replaced the applied one, the same message read again was answered "failed", and a
    later copy of the event was no duplicate."""
    assert (await store.claim("e6", "w1", "t/0/7", 0.05, token="0x1")).kind is ClaimKind.NEW
    target = "change.started CM1/s-1"

    async def taken_over() -> bool:
        return (await store.claim("e6", "w2", "t/0/7", 30, target, token="0x1")).kind is ClaimKind.NEW

    await until(taken_over, timeout_s=5, every_s=0.02, what="w1's lease to run out")
    applied = DedupRecord("applied", "w2", "t/0/7", "applied", 1, 200, target=target)
    await store.mark_applied("e6", applied, 60)
    late = DedupRecord("done", "w1", "t/0/7", "failed", 6, 503, target=target)
    assert await store.mark_done("e6", late, 60) == applied  # kept, and said: its outcome is the event's
    again = await store.claim("e6", "w3", "t/0/7", 30, target)
    assert (again.kind, again.record) == (ClaimKind.APPLIED, applied)


async def test_a_done_record_never_replaces_a_live_claim_of_another(store: DedupStore) -> None:
    """A's lease ran out (a pause longer than it), B took the event over and is sending it; A then
    finished (failed) and its done-record erased B's live claim: the event's next message was
    claimed as new while B was sending, and B's renewal found its claim gone. The done-record is
    written only over the writer's own claim (its owner and token), no record, or a record that is
    no live claim of another; else the record there is kept, and returned."""
    assert (await store.claim("e20", "A", "t/0/1", 0.05, "tgt", "0x1")).kind is ClaimKind.NEW
    took = await claim_once_expired(store, "e20", "B", "t/0/1", 30, "tgt", "0x1")
    assert took.taken_over
    late = DedupRecord("done", "A", "t/0/1", "failed", 6, 503, target="tgt")
    for writer in ({}, {"owner": "A", "token": "0x1"}, {"owner": "B", "token": "0x2"}):
        # no claim (a record kept by position), the stale owner's, B's with another claim's token
        kept = await store.mark_done("e20", late, 60, **writer)
        assert kept is not None, writer
        assert (kept.state, kept.owner, kept.token) == ("claimed", "B", "0x1")
    assert (await store.claim("e20", "C", "t/1/9", 30, "tgt", "0x1")).kind is ClaimKind.HELD
    assert await store.extend("e20", "B", 30, token="0x1")  # B still holds it
    mine = DedupRecord("done", "B", "t/0/1", "rejected", 1, 400, target="tgt")
    assert await store.mark_done("e20", mine, 60, owner="B", token="0x1") is None  # over its own
    assert (await store.claim("e20", "C", "t/0/1", 30, "tgt", "0x1")).record == mine


async def test_a_done_record_replaces_its_writers_claim_expired_claims_and_done_records(
    store: DedupStore,
) -> None:
    """What a done-record may replace: its writer's own claim, live or run out; another's claim
    that ran out (its owner is gone: a request of it can no longer land); a done-record."""
    first = DedupRecord("done", "A", "t/0/1", "rejected", 1, 400, target="tgt")
    await store.claim("e21", "A", "t/0/1", 30, "tgt", "0x1")
    assert await store.mark_done("e21", first, 60, owner="A", token="0x1") is None  # its own, live
    run_out = DedupRecord("claimed", "A", "t/0/1", lease_until=time.time() - 1, target="tgt", token="0x2")
    await _put_raw(store, "e22", run_out.encode())
    assert await store.mark_done("e22", first, 60, owner="A", token="0x2") is None  # its own, run out
    await _put_raw(store, "e23", replace(run_out, owner="X").encode())
    assert await store.mark_done("e23", first, 60, owner="A", token="0x2") is None  # X's, run out
    assert await store.mark_done("e22", first, 60) is None  # without a claim too
    again = DedupRecord("done", "B", "t/0/2", "failed", 3, 503, target="tgt")
    assert await store.mark_done("e22", again, 60) is None  # a done-record
    assert (await store.claim("e22", "C", "t/0/2", 30, "tgt")).record == again


async def test_the_same_claim_asked_again_is_answered_as_the_first(store: DedupStore) -> None:
    """A claim whose answer was lost (it ran on Redis; the client timed out) is asked again with
    the same claimant and token. It found its own claim and answered "taken over, our own claim",
    hiding what the first replaced: a failed message's record, for which the pipeline looks up the
    message's position (read again after a retry of its event, it repeats its own outcome), was
    not seen, and the message was sent again. The claim keeps what it replaced, and the same ask
    is answered as the first was; a renewal keeps it too."""
    failed = DedupRecord("done", "W", "t/1/7", "failed", 6, 503, target="tgt")
    await store.mark_done("e23", failed, 60)
    first = await store.claim("e23", "A/1", "t/0/3", 30, "tgt", "0x5")
    assert (first.kind, first.record, first.taken_over) == (ClaimKind.NEW, failed, False)
    assert await store.extend("e23", "A/1", 30, token="0x5")
    for _ in range(2):
        again = await store.claim("e23", "A/1", "t/0/3", 30, "tgt", "0x5")
        assert (again.kind, again.record, again.taken_over, again.maybe_sent) == (
            ClaimKind.NEW,
            failed,
            False,
            True,
        )
    # over another's expired claim: a takeover then, a takeover again, of that claim
    await store.claim("e24", "W", "t/0/3", 0.05, "tgt", "0x1")
    took = await claim_once_expired(store, "e24", "A/1", "t/0/3", 30, "tgt", "0x6")
    again = await store.claim("e24", "A/1", "t/0/3", 30, "tgt", "0x6")
    assert (again.kind, again.taken_over) == (ClaimKind.NEW, True)
    assert again.record == took.record
    assert again.record is not None
    assert (again.record.owner, again.record.token) == ("W", "0x1")
    # another ask of the same owner (another token) takes the claim over as before
    other = await store.claim("e24", "A/1", "t/0/3", 30, "tgt", "0x7")
    assert (other.kind, other.taken_over) == (ClaimKind.NEW, True)
    assert other.record is not None
    assert (other.record.owner, other.record.token, other.record.replaced) == ("A/1", "0x6", took.record)


async def test_a_claim_keeps_one_claim_at_most_of_what_it_replaced(store: DedupStore) -> None:
    """A chain of takeovers (each claim taken over once its lease ran out) keeps the claim it took
    over and the last record before the chain, never the whole chain."""
    failed = DedupRecord("done", "W", "t/1/7", "failed", 6, 503, target="tgt")
    await store.mark_done("e25", failed, 60)
    await store.claim("e25", "A", "t/0/3", 0.05, "tgt", "0x1")
    await claim_once_expired(store, "e25", "B", "t/0/3", 0.05, "tgt", "0x1")
    took = await claim_once_expired(store, "e25", "C", "t/0/3", 30, "tgt", "0x1")
    assert took.record is not None  # what C found: B's claim, as it was
    assert took.record.replaced is not None
    assert (took.record.owner, took.record.replaced.owner, took.record.replaced.replaced) == (
        "B",
        "A",
        failed,
    )
    held = await store.claim("e25", "D", "t/0/3", 30, "tgt", "0x1")
    assert held.record is not None  # what C keeps: B's claim, and the record before the chain
    assert (held.record.owner, held.record.replaced) == ("C", replace(took.record, replaced=failed))


async def test_release_frees_only_own_claim(store: DedupStore) -> None:
    await store.claim("e5", "w1", "t/0/1", 30)
    await store.release("e5", "w2")
    assert (await store.claim("e5", "w2", "t/0/1", 30)).kind is ClaimKind.HELD
    await store.release("e5", "w1")
    assert (await store.claim("e5", "w2", "t/0/1", 30)).kind is ClaimKind.NEW


async def test_a_late_hand_on_of_an_earlier_claim_leaves_its_owners_later_claim_alone(
    store: DedupStore,
) -> None:
    """A cancelled job's release or renewal that timed out may still run later (Redis runs a
    command already sent after its client gave up), after its owner claimed the event again (a
    redelivery, taken over as its own). Matched by owner alone, it deleted that
    later claim, or set its lease to the hand-on's (0 s): another worker could claim the event and
    send the change too. Each claim carries its token, and only that token reaches it."""
    assert (await store.claim("e12", "w1", "t/0/1", 30, token="1")).kind is ClaimKind.NEW
    again = await store.claim("e12", "w1", "t/0/1", 30, token="2")
    assert (again.kind, again.taken_over) == (ClaimKind.NEW, True)
    assert again.record is not None
    assert again.record.token == "1"

    async def lease_seen_by_another_worker() -> float:
        held = await store.claim("e12", "w2", "t/0/1", 30)
        assert held.kind is ClaimKind.HELD
        assert held.record is not None
        assert (held.record.owner, held.record.token) == ("w1", "2")
        return held.record.lease_until

    lease = await lease_seen_by_another_worker()
    await store.release("e12", "w1", token="1")  # the first claim's, late
    assert not await store.extend("e12", "w1", 0.0, token="1")
    assert not await store.extend("e12", "w1", 0.0)  # no token: never a claim that has one
    await store.release("e12", "w1")
    assert await lease_seen_by_another_worker() == lease  # still held, its lease as it was

    assert await store.extend("e12", "w1", 60, token="2")  # its own token renews it
    assert await lease_seen_by_another_worker() > lease
    await store.release("e12", "w1", token="2")
    assert (await store.claim("e12", "w2", "t/0/1", 30)).kind is ClaimKind.NEW


async def test_a_claim_without_a_token_is_reached_only_without_one(store: DedupStore) -> None:
    """A claim an earlier release wrote has no token (nor has the probe's): a caller without one
    renews and releases it as before; a caller with a token names another claim, and leaves it."""
    await store.claim("e13", "w1", "t/0/1", 30)  # as an earlier release wrote it: no token
    assert not await store.extend("e13", "w1", 30, token="1")
    await store.release("e13", "w1", token="1")
    assert (await store.claim("e13", "w2", "t/0/1", 30)).kind is ClaimKind.HELD
    assert await store.extend("e13", "w1", 30)
    await store.release("e13", "w1")
    assert (await store.claim("e13", "w2", "t/0/1", 30)).kind is ClaimKind.NEW


async def test_release_never_drops_an_applied_record(store: DedupStore) -> None:
    await store.mark_applied("e6", DedupRecord("applied", "w1", "t/0/1", "applied", 1, 200), 60)
    await store.release("e6", "w1")
    assert (await store.claim("e6", "w1", "t/0/1", 30)).kind is ClaimKind.APPLIED


async def test_concurrent_claims_have_exactly_one_winner(store: DedupStore) -> None:
    results = await asyncio.gather(*(store.claim("race", f"w{i}", "t/0/1", 30) for i in range(20)))
    assert sum(r.kind is ClaimKind.NEW for r in results) == 1


async def test_sqlite_survives_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/d.sqlite3"
    first = open_store(url)
    await first.mark_done("e7", DedupRecord("done", "w1", "t/0/1", "applied", 1, 200), 60)
    await first.close()
    second = open_store(url)
    try:
        assert (await second.claim("e7", "w2", "t/0/2", 30)).kind is ClaimKind.DONE
    finally:
        await second.close()


async def test_sqlite_purges_expired_records_in_chunks(tmp_path: Path) -> None:
    """Expired records go in small chunks (the loop is never held by one big DELETE); live ones stay."""
    store = SqliteStore(tmp_path / "d.sqlite3")
    store._PURGE_CHUNK = 2
    store._last_purge = float("inf")  # not due while the records are written
    try:
        for n in range(5):
            await store.mark_done(f"old{n}", DedupRecord("done", "w1", f"t/0/{n}", "applied"), -1)
        await store.mark_done("live", DedupRecord("done", "w1", "t/0/9", "applied"), 60)

        def rows() -> set[str]:
            with sqlite3.connect(tmp_path / "d.sqlite3") as conn:
                return {r[0] for r in conn.execute("SELECT event_id FROM dedup WHERE event_id != '@probe'")}

        counts = []
        for _ in range(4):
            store._last_purge = float("-inf")  # due now (0.0 is not, on a machine up under a minute)
            await store.ping()
            counts.append(len(rows()))
        assert counts == [4, 2, 1, 1]  # 6 rows, 2 per chunk; the short chunk ends the round
        assert rows() == {"live"}
    finally:
        await store.close()


async def test_sqlite_checkpoints_the_wal_off_the_loop(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "d.sqlite3")
    store._CHECKPOINT_EVERY_S = 0.0
    try:
        await store.mark_done("e1", DedupRecord("done", "w1", "t/0/1", "applied"), 60)
        await store.mark_done("e2", DedupRecord("done", "w1", "t/0/2", "applied"), 60)
        assert store._checkpoint is not None
        await asyncio.wait_for(asyncio.wrap_future(store._checkpoint), 10)
        # That checkpoint may have run beside the second commit, whose transaction held a read mark
        # at the first: SQLite then copies only frames up to it (a partial checkpoint, correct for
        # its readers), and the file alone can name pages it does not hold yet. One more, with
        # nothing writing, copies every frame.
        await asyncio.wrap_future(store._executor.submit(store._checkpoint_wal))
        # The database file alone (no -wal beside it) holds the records once they are checkpointed.
        copy = tmp_path / "copy.sqlite3"
        shutil.copyfile(tmp_path / "d.sqlite3", copy)
        with sqlite3.connect(copy) as conn:
            assert conn.execute("SELECT count(*) FROM dedup").fetchone()[0] >= 1
    finally:
        await store.close()


async def test_a_failing_checkpoint_is_said_once_per_episode(tmp_path: Path) -> None:
    """A checkpoint that failed (a locked or unwritable file) returned 0 without a word, every
    second: the WAL grew with nothing in the log to say why."""
    store = SqliteStore(tmp_path / "d.sqlite3")
    try:
        await store.mark_done("e1", DedupRecord("done", "w1", "t/0/1", "applied"), 60)

        class _Refusing:
            def execute(self, _: str) -> None:
                raise sqlite3.OperationalError("database is locked")

        store._maintenance_conn = _Refusing()  # type: ignore[assignment]
        with capture_logs() as logs:
            assert store._checkpoint_wal() == 0
            assert store._checkpoint_wal() == 0
            store._maintenance_conn = None  # the next one opens its connection again, and works
            assert store._checkpoint_wal() >= 0
        assert [(line["event"], line.get("detail")) for line in logs] == [
            ("dedup_checkpoint_failed", "database is locked"),
            ("dedup_checkpoint_recovered", None),
        ]
    finally:
        await store.close()


async def test_memory_is_bounded() -> None:
    store = MemoryStore(max_entries=10)
    for i in range(50):
        await store.mark_done(f"e{i}", DedupRecord("done", status="applied"), 60)
    assert (await store.claim("e0", "w", "s", 30)).kind is ClaimKind.NEW
    assert (await store.claim("e49", "w", "s", 30)).kind is ClaimKind.DONE


async def test_unreachable_redis_is_dedup_unavailable() -> None:
    store = open_store("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(DedupUnavailable, match=r"127\.0\.0\.1:1"):  # the address it tried, to check
            await store.ping()
        with pytest.raises(DedupUnavailable):
            await store.claim("e", "w", "s", 1)
    finally:
        await store.close()


async def test_unusable_sqlite_path_is_dedup_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = open_store(f"sqlite:///{blocker}/dedup.sqlite3")
    try:
        with pytest.raises(DedupUnavailable):
            await store.ping()
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url", ["sqlite://", "postgres://x", "memory", "memory://?max_entries=0", "memory://?size=9"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)


async def test_redis_callers_beyond_the_pool_wait_instead_of_failing(redis_url: str) -> None:
    """More concurrent calls than pooled connections must queue, not read as "store down"."""
    store = open_store(redis_url)
    try:
        claims = await asyncio.gather(
            *(store.claim(f"burst-{i}", "w1", "t/0/1", 30) for i in range(REDIS_POOL_SIZE * 4))
        )
    finally:
        await store.close()
    assert {c.kind for c in claims} == {ClaimKind.NEW}


async def test_sqlite_wal_starts_over_under_writes_that_never_pause(tmp_path: Path) -> None:
    """A checkpoint on another thread never catches up with a writer that never pauses, and the WAL
    only starts over once every frame is copied: without the store's short hold it grew for ever
    (here 56 MB; 1.2 GB after 240,000 events). Every record must still be there."""
    store = SqliteStore(tmp_path / "d.sqlite3")
    store._CHECKPOINT_EVERY_S = 0.0
    store._WAL_RESTART_FRAMES = 200
    wal = tmp_path / "d.sqlite3-wal"
    writers, each = 64, 300

    async def write(w: int) -> None:
        for n in range(each):
            await store.mark_done(f"e{w}-{n}", DedupRecord("done", "w1", f"t/{w}/{n}", "applied"), 60)

    try:
        await asyncio.gather(*(write(w) for w in range(writers)))
        await store.ping()
        assert wal.stat().st_size < 16 << 20
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "d.sqlite3") as conn:
        assert (
            conn.execute("SELECT count(*) FROM dedup WHERE event_id != '@probe'").fetchone()[0]
            == writers * each
        )


async def test_upkeep_failing_after_a_commit_neither_fails_nor_holds_up_the_writes(tmp_path: Path) -> None:
    """The checkpoint that lets the WAL start over cannot be scheduled (the maintenance thread is
    gone). The batch is committed by then: its callers get their answers, not the upkeep's error,
    and later writes are not queued for ever behind a hold that was never set up."""
    store = SqliteStore(tmp_path / "d.sqlite3")
    try:
        await store.mark_done("a", DedupRecord("done", "w1", "t/0/1", "applied"), 60)
        store._executor.shutdown()
        store._WAL_RESTART_FRAMES = 1
        last: Future[int] = Future()
        last.set_result(10_000)  # a regular checkpoint left a large WAL behind: hold for another
        store._checkpoint = last

        await store.mark_done("b", DedupRecord("done", "w1", "t/0/2", "applied"), 60)
        await asyncio.wait_for(store.mark_done("c", DedupRecord("done", "w1", "t/0/3", "applied"), 60), 5)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "d.sqlite3") as conn:
        assert {r[0] for r in conn.execute("SELECT event_id FROM dedup")} == {"a", "b", "c"}


async def test_a_hold_released_after_close_does_not_open_the_database_again(tmp_path: Path) -> None:
    """A shutdown closes the store while writes wait for a WAL hold (a cancelled job's claim still
    queued): the hold's release ran that batch after close, and it opened the database again."""
    store = SqliteStore(tmp_path / "d.sqlite3")
    await store.ping()
    release = threading.Event()
    checkpoint = store._checkpoint_wal

    def held() -> int:
        release.wait(5)
        return checkpoint()

    store._checkpoint_wal = held  # type: ignore[method-assign]
    store._hold_for_checkpoint()  # as _maintain does after a checkpoint left a large WAL behind
    claim = asyncio.create_task(store.claim("ev-1", "w1", "in/0/1", 30.0))
    await until(lambda: bool(store._batch))  # queued behind the hold
    claim.cancel()
    release.set()
    await store.close()
    await until(lambda: not store._holding)  # the hold's release has run
    assert store._conn is None


async def test_a_call_that_fails_fails_its_own_event_not_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call of a group commit that raised anything but a database error rolled the whole batch
    back and failed every event in it, each ending as an internal error without calling the API.
    (A record that cannot be read no longer raises, ``test_a_record_that_cannot_be_read_is_taken_over``:
    a read that fails stands in for any such call.)"""
    read = SqliteStore._read

    def refusing(conn: sqlite3.Connection, event_id: str, now: float) -> DedupRecord | None:
        if event_id == "bad":
            raise ValueError("this call's own failure")
        return read(conn, event_id, now)

    monkeypatch.setattr(SqliteStore, "_read", staticmethod(refusing))
    store = SqliteStore(tmp_path / "d.sqlite3")
    try:
        bad, good = await asyncio.gather(
            store.claim("bad", "w1", "t/0/1", 30.0),
            store.claim("good", "w1", "t/0/2", 30.0),
            return_exceptions=True,
        )
        assert isinstance(bad, ValueError)
        assert not isinstance(good, BaseException)
        assert good.kind is ClaimKind.NEW
        assert (await store.claim("good", "w2", "t/0/2", 30.0)).kind is ClaimKind.HELD  # committed
    finally:
        await store.close()


async def _put_raw(store: DedupStore, event_id: str, text: str) -> None:
    """``text`` stored as ``event_id``'s record, as it is: what a bug, an operator or another
    program may leave there. The memory store keeps records decoded, so it is given what it would
    have decoded."""
    if isinstance(store, MemoryStore):
        store._put(event_id, DedupRecord.decode(text), 600)
    elif isinstance(store, SqliteStore):
        await store.ping()
        assert store._conn is not None
        store._conn.execute("INSERT INTO dedup VALUES (?, ?, ?)", (event_id, text, time.time() + 600))
    else:
        assert isinstance(store, RedisStore)
        await store._client.set(store._key(event_id), text, ex=600)


#: Records no release writes: a claim without a lease or with a lease that is no number (0, as
#: the scripts' ``tonumber(x) or 0``), not JSON, not an object, no known state, an owner that is
#: no string, a token that is null.
ODD_RECORDS = {
    "no_lease": '{"state": "claimed", "owner": "X", "source": "s", "target": "tgt"}',
    "lease_text": '{"state": "claimed", "owner": "X", "source": "s", "lease_until": "soon"}',
    "lease_true": '{"state": "claimed", "owner": "X", "source": "s", "lease_until": true}',
    "not_json": "{not json",
    "array": '["claimed", "X"]',
    "number": "42",
    "no_state": '{"owner": "X", "source": "s", "lease_until": 9e99}',
    "state_unknown": '{"state": "sending", "owner": "X", "lease_until": 9e99}',
    "owner_number": '{"state": "claimed", "owner": 7, "source": "s", "lease_until": 9e99}',
    "token_null": '{"state": "claimed", "owner": "X", "source": "s", "lease_until": 9e99, "token": null}',
}


@pytest.mark.parametrize("odd", list(ODD_RECORDS))
async def test_a_record_that_cannot_be_read_is_taken_over(store: DedupStore, odd: str) -> None:
    """On Redis a claim without ``lease_until`` (``tonumber(nil) > now``) or one that is no number
    was a Lua error, and a record that was no JSON object came back for the caller to refuse: a
    store error that paused the worker, its probe (another key) passed, the gate reopened, and the
    same record paused it again, over and over; sqlite took a claim without a lease over and failed
    the others' jobs, memory took them over. Every backend now reads a record alike: one it cannot
    read is an expired claim of no one, taken over with the ticket read first (it may have been
    sent), written over by a done-record, never renewed nor released."""
    await _put_raw(store, "odd", ODD_RECORDS[odd])
    assert not await store.extend("odd", "X", 30, token="1")
    await store.release("odd", "X", token="1")
    claim = await store.claim("odd", "B", "t/0/2", 30, "tgt", "0x9")
    assert (claim.kind, claim.taken_over, claim.maybe_sent) == (ClaimKind.NEW, True, True)
    assert claim.record is not None
    assert claim.record.lease_until == 0
    held = await store.claim("odd", "C", "t/0/3", 30, "tgt", "0x1")
    assert held.kind is ClaimKind.HELD  # B's claim, written over it
    assert held.record is not None
    assert held.record.owner == "B"
    assert await store.extend("odd", "B", 30, token="0x9")
    await _put_raw(store, "odd-done", ODD_RECORDS[odd])
    done = DedupRecord("done", "B", "t/0/2", "failed", target="tgt")
    assert await store.mark_done("odd-done", done, 60, owner="B", token="0x9") is None
    assert (await store.claim("odd-done", "C", "t/0/2", 30, "tgt", "0x1")).record == done
    await store.ping()


async def test_a_record_that_cjson_cannot_write_again_is_taken_over(store: DedupStore) -> None:
    """A failed record holding a number out of range (another program's, ``1e999``): Redis' claim
    kept it in the new claim and cjson refused to write it back (NaN, Inf), so every claim of the
    event failed; the others take it over. Now it is kept as unreadable, and the claim is taken."""
    await _put_raw(
        store,
        "inf",
        '{"state": "done", "owner": "X", "source": "t/0/1", "status": "failed", "attempts": 1e999}',
    )
    claim = await store.claim("inf", "B", "t/0/2", 30, "", "0x9")
    assert claim.kind is ClaimKind.NEW
    assert (await store.claim("inf", "C", "t/0/3", 30, "", "0x1")).kind is ClaimKind.HELD


async def test_a_redis_key_of_another_type_fails_its_own_event_not_the_store(redis_url: str) -> None:
    """A key under the prefix holding a hash (WRONGTYPE in the script) was a store error: the
    worker paused, its probe on another key passed, and the same key paused it again, without end.
    It is that event's failure now, with the server's words; the store stays up. The store's own
    ``@epoch`` of another type is rewritten, as an epoch that is no number is (every claim reads
    it: failing them all would fail every event)."""
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    try:
        await store._client.hset(store._key("hash"), "x", "1")
        for call in (
            lambda: store.claim("hash", "w1", "t/0/1", 30.0, "tgt", "0x1"),
            lambda: store.extend("hash", "w1", 30.0, token="0x1"),
            lambda: store.release("hash", "w1", token="0x1"),
            lambda: store.mark_done("hash", DedupRecord("done", "w1", "t/0/1", "failed"), 60, owner="w1"),
        ):
            with pytest.raises(dedup.DedupRecordError, match="WRONGTYPE Operation against a key") as failed:
                await call()
            assert not isinstance(failed.value, DedupUnavailable)
        await store.ping()
        await store._client.delete(store._epoch_key)
        await store._client.hset(store._epoch_key, "x", "1")
        assert (await store.claim("good", "w1", "t/0/2", 30.0)).kind is ClaimKind.NEW
        assert float(await store._client.get(store._epoch_key)) == pytest.approx(time.time(), abs=60)
    finally:
        await store.close()


async def test_a_redis_key_of_another_type_fails_its_own_event_with_replicas_asked_for_too(
    own_redis: OwnRedis,
) -> None:
    """With ``dedup_redis_min_replicas`` the script runs in a pipeline, whose error names the
    command first: still this event's failure, not the store's (no replica runs here: a claim
    that went through would be refused for want of one)."""
    store = RedisStore(own_redis.url, min_replicas=1)
    try:
        await store._client.hset(store._key("hash"), "x", "1")
        with pytest.raises(dedup.DedupRecordError, match="WRONGTYPE"):
            await store.claim("hash", "w1", "t/0/1", 30.0, "tgt", "0x1")
    finally:
        await store.close()


def test_records_stay_readable_by_the_release_before_and_after() -> None:
    """Claimed records are written as the first release wrote them, and keys a later release adds
    (the dead-letter fields, the target, the token) are left out when read, not an error: a
    rollback reads the records of the release after it."""
    claimed = DedupRecord("claimed", "w1", "t/0/1", lease_until=5.0)
    assert set(json.loads(claimed.encode())) == {
        "state",
        "owner",
        "source",
        "status",
        "attempts",
        "http_status",
        "lease_until",
        "reason",
    }
    mine = replace(claimed, target="x CM1/", token="1f")  # a claim of a later release
    assert set(json.loads(mine.encode())) - set(json.loads(claimed.encode())) == {"target", "token"}
    assert DedupRecord.decode(mine.encode()) == mine
    done = DedupRecord(
        "done", "w1", "t/0/1", "rejected", 1, 400, error_code="GOM.1", detail="pending", target="x CM1/"
    )
    assert DedupRecord.decode(done.encode()) == done
    later = json.dumps({**json.loads(done.encode()), "a_later_field": [1]})
    assert DedupRecord.decode(later) == done


#: What Redis before 7 answers a write refused inside a script on a replica (7 answers READONLY
#: itself), and the other script errors of that release, each as redis-py raises it (``ERR`` cut off).
REDIS_6_SCRIPT_ERRORS = {
    "readonly": "Error running script (call to f_6b1bf486c81ceb7edf3c093f4c48582e38c0e791):"
    " @user_script:12: -READONLY You can't write against a read only replica.",
    "noreplicas": "Error running script (call to f_6b1bf486c81ceb7edf3c093f4c48582e38c0e791):"
    " @user_script:12: -NOREPLICAS Not enough good replicas to write.",
    "wrongtype": "Error running script (call to f_6b1bf486c81ceb7edf3c093f4c48582e38c0e791):"
    " @user_script:9: WRONGTYPE Operation against a key holding the wrong kind of value",
    "lua": "Error running script (call to f_6b1bf486c81ceb7edf3c093f4c48582e38c0e791):"
    " @user_script:20: user_script:20: attempt to compare nil with number",
}


async def test_a_readonly_wrapped_in_a_script_error_leaves_the_demoted_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before Redis 7 a write refused inside a script comes back as the script's error, which
    redis-py raises as a plain ResponseError, not ReadOnlyError: the pooled connections to the
    demoted node were never dropped, and the worker (its probe a claim script too) stayed paused
    on it. Both Redis users (the dedup store, the rate limit) read it as READONLY now, by one rule;
    a script's other errors stay what they were: the store away (NOREPLICAS), or this event's."""
    wrapped = BaseParser.parse_error("ERR " + REDIS_6_SCRIPT_ERRORS["readonly"])
    assert type(wrapped) is ResponseError  # what redis-py makes of it
    assert str(wrapped) == REDIS_6_SCRIPT_ERRORS["readonly"]
    assert redis_config.is_read_only(wrapped)
    assert redis_config.is_read_only(ReadOnlyError("You can't write against a read only replica."))
    for name in ("noreplicas", "wrongtype", "lua"):
        assert not redis_config.is_read_only(ResponseError(REDIS_6_SCRIPT_ERRORS[name])), name

    left: list[object] = []

    async def leave(client: object) -> None:
        left.append(client)

    monkeypatch.setattr("worker.dedup.redis.leave_demoted_node", leave)
    monkeypatch.setattr("worker.ratelimit.leave_demoted_node", leave)

    async def fails(text: str) -> None:
        raise BaseParser.parse_error("ERR " + text)

    store = RedisStore("redis://127.0.0.1:1/0")  # never reached: each call fails as scripted
    try:
        with pytest.raises(DedupUnavailable, match="read-only replica"):
            await store._call(fails(REDIS_6_SCRIPT_ERRORS["readonly"]))
        assert left == [store._client]
        with pytest.raises(DedupUnavailable, match="NOREPLICAS Not enough good replicas") as away:
            await store._call(fails(REDIS_6_SCRIPT_ERRORS["noreplicas"]))
        assert not isinstance(away.value, dedup.DedupRecordError)
        with pytest.raises(dedup.DedupRecordError, match=r"user_script:\d+: WRONGTYPE") as own:
            await store._call(fails(REDIS_6_SCRIPT_ERRORS["wrongtype"]))
        assert not isinstance(own.value, DedupUnavailable)
        # a script's own runtime error is a bug of the script, which every event would meet: the
        # worker pauses on it (DedupUnavailable), none is dead-lettered
        with pytest.raises(DedupUnavailable, match=r"user_script:\d+:"):
            await store._call(fails(REDIS_6_SCRIPT_ERRORS["lua"]))
        # in a pipeline (min_replicas) redis-py names the command first, keys and all: an event_id
        # holding READONLY or WRONGTYPE does not make another error read as that one
        piped = "Command # 1 (EVALSHA f 2 coc:ev-READONLY-WRONGTYPE x) of pipeline caused error: "
        with pytest.raises(DedupUnavailable, match="NOREPLICAS") as away:
            await store._call(fails(piped + REDIS_6_SCRIPT_ERRORS["noreplicas"]))
        assert not isinstance(away.value, dedup.DedupRecordError)
        assert not redis_config.is_read_only(ResponseError(piped + REDIS_6_SCRIPT_ERRORS["noreplicas"]))
        assert left == [store._client]
    finally:
        await store.close()

    bucket = RedisTokenBucket("redis://127.0.0.1:1/0", "k", rate_per_s=100, burst=1, metrics=Metrics())

    async def script(**_: Any) -> int:
        raise BaseParser.parse_error("ERR " + REDIS_6_SCRIPT_ERRORS["readonly"])

    bucket._script = script  # type: ignore[assignment]
    try:
        await asyncio.wait_for(bucket.acquire(), 5)  # limited locally meanwhile
        assert left == [store._client, bucket._client]
    finally:
        await bucket.close()


async def test_a_redis_demoted_by_a_failover_is_left_and_not_probed_as_healthy(own_redis: OwnRedis) -> None:
    """A failover that demotes the primary behind a stable name without dropping its clients: every
    claim met READONLY on the pooled connections for ever, and the gate's probe (PING, which a
    replica answers) reopened the gate onto it again and again. Now the pool is dropped (new
    connections find the new primary) and the probe is a write."""
    store = RedisStore(own_redis.url)
    try:
        await store.ping()
        assert (await store.claim("e1", "w", "s", 30)).kind is ClaimKind.NEW
        before = await own_redis.connections()
        assert before
        await own_redis.demote()
        with pytest.raises(DedupUnavailable, match="read-only"):
            await store.claim("e2", "w", "s", 30)
        assert not before & await own_redis.connections()  # the pooled connections were dropped
        with pytest.raises(DedupUnavailable):
            await store.ping()
        await own_redis.promote()  # the new primary
        await store.ping()
        assert (await store.claim("e2", "w", "s", 30)).kind is ClaimKind.NEW
    finally:
        await store.close()


async def test_redis_url_options_reach_redis(redis_url: str) -> None:
    """``?db=`` was dropped with the rest of the query (only ``prefix`` was read), and the store
    wrote to the database of the path instead."""
    url = redis_url.replace("/15?", "/0?db=15&")
    store = open_store(url)
    try:
        await store.claim("options-db", "w1", "t/0/1", 30)
    finally:
        await store.close()
    prefix = parse_qs(urlsplit(url).query)["prefix"][0]
    with redis.Redis(host="127.0.0.1", port=6379, db=15) as db15, redis.Redis(port=6379, db=0) as db0:
        assert db15.exists(prefix + "options-db") == 1
        assert db0.exists(prefix + "options-db") == 0


@pytest.fixture
def redis_acl_user(redis_url: str, unique: str) -> Iterator[tuple[str, str]]:
    """An ACL user of this test's own on the shared Redis, with a password, allowed only the keys
    under ``redis_url``'s prefix; deleted after (nothing else of that Redis changes)."""
    name, password = f"coc-test-{unique}", f"acl-pw-{unique}-{uuid.uuid4().hex}"
    with redis.Redis(host="127.0.0.1", port=6379) as admin:  # the shared one, as redis_url
        admin.execute_command(
            "ACL", "SETUSER", name, "on", f">{password}", f"~{key_prefix(redis_url)}*", "+@all"
        )
        try:
            yield name, password
        finally:
            admin.execute_command("ACL", "DELUSER", name)


async def test_the_password_setting_logs_the_store_in_as_the_urls_acl_user(
    redis_url: str, redis_acl_user: tuple[str, str]
) -> None:
    """A Secret holding only the password (Bitnami's ``redis-password``, a Vault file) reached the
    store only spliced into a URL by hand. Given apart, with the user named in the URL, it logs in;
    a wrong or missing one is a login refused (not "unreachable"), the password never in the error."""
    name, password = redis_acl_user
    url = redis_url.replace("redis://", f"redis://{name}@")
    store = open_store(dedup_target(load_settings(dedup_url=url, dedup_redis_password=password)))
    try:
        await store.ping()
        assert (await store.claim("e1", "w1", "t/0/1", 30)).kind is ClaimKind.NEW
    finally:
        await store.close()
    with store_redis(redis_url) as raw:
        assert raw.exists(key_prefix(url) + "e1") == 1
    for wrong in (f"wrong-{password}", None):
        store = open_store(dedup_target(load_settings(dedup_url=url, dedup_redis_password=wrong)))
        try:
            with pytest.raises(DedupUnavailable, match="refused the login: AuthenticationError") as refused:
                await store.claim("e2", "w1", "t/0/1", 30)
        finally:
            await store.close()
        assert password not in str(refused.value)
        assert "invalid username-password pair" in str(refused.value)  # the server's words


async def test_the_password_setting_logs_in_to_a_redis_that_wants_one_for_its_default_user(
    own_redis: OwnRedis,
) -> None:
    """A Redis of the Bitnami chart: ``requirepass``, no ACL user, the URL without credentials."""
    password = own_redis.require_password()
    store = open_store(dedup_target(load_settings(dedup_url=own_redis.url, dedup_redis_password=password)))
    try:
        assert (await store.claim("e1", "w1", "t/0/1", 30)).kind is ClaimKind.NEW
    finally:
        await store.close()
    store = open_store(own_redis.url)  # the URL alone
    try:
        with pytest.raises(DedupUnavailable, match="refused the login: AuthenticationError") as refused:
            await store.ping()
    finally:
        await store.close()
    assert password not in str(refused.value)


def test_the_worker_prefix_is_not_passed_to_redis() -> None:
    url = "rediss://:pw@redis:6380/2?prefix=p:&ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false"
    assert (
        connection_url(url)
        == "rediss://:pw@redis:6380/2?ssl_ca_certs=%2Fetc%2Fca.pem&ssl_check_hostname=false"
    )


def test_a_redis_tls_file_that_cannot_be_read_is_a_configuration_error(tmp_path: Path) -> None:
    """redis-py opens it when it connects: a missing CA file read as the store being down."""
    with pytest.raises(ConfigError, match=r"\?ssl_ca_certs= names no readable file: /nowhere/ca.pem"):
        open_store("rediss://redis:6380/0?ssl_ca_certs=/nowhere/ca.pem")


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
async def test_a_claim_is_kept_as_long_as_an_applied_record(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A worker crashed mid-send leaves its claim; the message is read again whenever the group
    next runs. The claim was forgotten after 24 h while applied records live ``dedup_ttl_s`` (7
    days): read again on day two, the event was claimed as new and sent again without a look at
    the ticket, though the first send may have landed."""
    week_s = 7 * 24 * 3600.0
    url = {
        "memory": "memory://?max_entries=1000",
        "sqlite": f"sqlite:///{tmp_path}/dedup.sqlite3",
        "redis": request.getfixturevalue("redis_url") if backend == "redis" else "",
    }[backend]
    store = open_store(url, record_ttl_s=week_s)
    try:
        await store.claim("crashed", "w1", "t/0/1", 30)
        await store.extend("crashed", "w1", 30)  # renewed before a send
        if isinstance(store, MemoryStore):
            left_s = store._items["crashed"][1] - time.monotonic()
        elif isinstance(store, SqliteStore):
            with sqlite3.connect(tmp_path / "dedup.sqlite3") as conn:
                (expires_at,) = conn.execute(
                    "SELECT expires_at FROM dedup WHERE event_id = 'crashed'"
                ).fetchone()
            left_s = expires_at - time.time()
        else:
            assert isinstance(store, RedisStore)
            left_s = await store._client.pttl(store._key("crashed")) / 1000
        assert left_s > week_s
    finally:
        await store.close()


async def test_the_sqlite_probe_fails_while_claims_fail(tmp_path: Path) -> None:
    """A store that takes no writes (a read-only file or mount) fails the probe as it fails the
    claims, or the gate would reopen onto it over and over. (The probe is a write now, as a full
    disk lets ``BEGIN IMMEDIATE`` and ``SELECT 1`` pass; a full disk is not simulated here.)"""
    store = SqliteStore(tmp_path / "d.sqlite3")
    try:
        await store.ping()
        assert store._conn is not None
        store._conn.execute("PRAGMA query_only = ON")  # as a read-only file or mount answers
        with pytest.raises(DedupUnavailable, match="readonly"):
            await store.claim("e1", "w1", "t/0/1", 30)
        with pytest.raises(DedupUnavailable, match="readonly"):
            await store.ping()
    finally:
        await store.close()


async def test_a_sqlite_file_locked_by_another_writer_fails_fast_without_stalling_the_loop(
    tmp_path: Path,
) -> None:
    """Another writer holding the file (an operator's ``sqlite3`` shell in a transaction, a backup)
    kept each batch waiting up to 5 s on the event loop's thread: heartbeats, /healthz and every
    job stopped with it. It now waits at most 0.1 s and reports the store unavailable, and the
    worker pauses and probes as for any outage; the claim goes through once the lock is gone."""
    path = tmp_path / "d.sqlite3"
    store = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await store.ping()
        assert store._conn is not None
        assert store._conn.execute("PRAGMA busy_timeout").fetchone() == (100,)
        other.execute("BEGIN IMMEDIATE")  # the other writer takes the lock and keeps it
        with pytest.raises(DedupUnavailable, match="locked"):
            await store.claim("e1", "w1", "t/0/1", 30)
        other.execute("ROLLBACK")
        assert (await store.claim("e1", "w1", "t/0/1", 30)).kind is ClaimKind.NEW
    finally:
        other.close()
        await store.close()


async def _fill(store: SqliteStore) -> DedupUnavailable:
    """Write until the store refuses; return its error."""
    for n in range(10_000):
        try:
            await store.mark_done(
                f"e{n}", DedupRecord("done", "w1", f"t/0/{n}", "applied", detail="x" * 400), 60
            )
        except DedupUnavailable as exc:
            return exc
    raise AssertionError("never full")


async def test_a_full_sqlite_store_says_it_is_full(tmp_path: Path) -> None:
    """SQLite rolls a transaction back itself when the disk is full; the store's own ROLLBACK then
    failed, and the error reported was "cannot rollback - no transaction is active"."""
    store = SqliteStore(tmp_path / "d.sqlite3")
    try:
        await store.ping()
        assert store._conn is not None
        (pages,) = store._conn.execute("PRAGMA page_count").fetchone()
        store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk full soon
        error = await _fill(store)
        assert "full" in str(error)
    finally:
        await store.close()


async def test_the_redis_probe_fails_for_a_user_that_may_not_run_the_claim(own_redis: OwnRedis) -> None:
    """An ACL user allowed ``SET`` but not scripts: the probe (a ``SET``) passed, every claim
    failed, and the gate opened and closed at the probe's pace while nothing was processed."""
    admin = redis.Redis(port=own_redis.port)
    admin.execute_command(
        "ACL", "SETUSER", "setonly", "on", ">setonly-pw", "~*", "+@all", "-eval", "-evalsha"
    )
    store = RedisStore(f"redis://setonly:setonly-pw@127.0.0.1:{own_redis.port}/0")
    try:
        with pytest.raises(DedupUnavailable):
            await store.claim("e1", "w1", "t/0/1", 30)
        with pytest.raises(DedupUnavailable):
            await store.ping()
    finally:
        await store.close()
        admin.close()


@pytest.fixture
def replica_of_own_redis(own_redis: OwnRedis, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server replicating ``own_redis``; the test may stop it."""
    exe = shutil.which("redis-server")
    assert exe is not None  # own_redis found it
    with redis.Redis(port=own_redis.port) as primary:
        primary.config_set("repl-diskless-sync-delay", 0)  # the first sync at once, not after 5 s
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(tmp_path), "--replicaof", "127.0.0.1", str(own_redis.port)]
    replica = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        yield replica
    finally:
        replica.kill()
        replica.wait(10)


async def test_redis_writes_wait_for_the_replicas_asked_for(
    own_redis: OwnRedis, replica_of_own_redis: subprocess.Popen[bytes]
) -> None:
    """Redis replicates asynchronously: a failover lost the last claims and applied records, and
    another worker then claimed the same event as new and sent it again. With
    ``dedup_redis_min_replicas`` a claim or record no replica acknowledged is refused as the store
    being away (the worker pauses) instead of acted on."""
    primary = redis.Redis(port=own_redis.port)
    guarded = RedisStore(own_redis.url, min_replicas=1)
    trusting = RedisStore(own_redis.url)
    try:
        await until(
            lambda: primary.info("replication").get("slave0", {}).get("state") == "online",
            what="the replica in sync",
        )
        assert (await guarded.claim("e1", "w1", "t/0/1", 30)).kind is ClaimKind.NEW
        await guarded.mark_applied("e1", DedupRecord("applied", "w1", "t/0/1", "applied"), 60)

        replica_of_own_redis.terminate()
        await until(lambda: primary.info("replication")["connected_slaves"] == 0, what="the replica gone")
        with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
            await guarded.claim("e2", "w1", "t/0/2", 30)
        with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
            await guarded.mark_applied("e2", DedupRecord("applied", "w1", "t/0/2", "applied"), 60)
        with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
            await guarded.ping()  # or the gate would reopen onto claims that fail
        with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
            await guarded.claim("e4", "w1", "t/0/4", 30)  # written on the primary all the same
        guarded._min_replicas = 0  # as if the replica were back: the claim again
        again = await guarded.claim("e4", "w1", "t/0/4", 30)
        assert (again.kind, again.taken_over) == (ClaimKind.NEW, False)  # ours, and nothing was sent
        assert (await trusting.claim("e3", "w1", "t/0/3", 30)).kind is ClaimKind.NEW  # 0: as before
    finally:
        primary.close()
        await guarded.close()
        await trusting.close()


async def test_a_refused_claim_over_another_owners_failed_record_is_answered_with_that_record(
    own_redis: OwnRedis,
) -> None:
    """The first refused claim (no replica acknowledged it) was remembered with what it replaced,
    and later refusals were not: once that claim had run out, another worker took the event over
    and failed it, and a second refused claim replaced that failed record; the claim that then
    passed was answered as if nothing had been there, and the change went out again without a
    look at the ticket (the failed attempt may have landed). No replica runs here."""
    guarded = RedisStore(own_redis.url, min_replicas=1)
    other = RedisStore(own_redis.url)
    try:
        with pytest.raises(DedupUnavailable, match="replicas"):
            await guarded.claim("e", "A", "t/0/1", 0.05, "tgt", "0x1")

        async def taken_over() -> bool:
            return (await other.claim("e", "B", "t/0/2", 30, "tgt", "0x1")).taken_over

        await until(taken_over, timeout_s=5, every_s=0.02, what="A's refused claim to run out")
        failed = DedupRecord("done", "B", "t/0/2", "failed", 6, 503, target="tgt")
        await other.mark_done("e", failed, 60, owner="B", token="0x1")
        with pytest.raises(DedupUnavailable, match="replicas"):
            await guarded.claim("e", "A", "t/0/3", 30, "tgt", "0x2")  # over B's failed record
        guarded._min_replicas = 0  # the replica back
        got = await guarded.claim("e", "A", "t/0/3", 30, "tgt", "0x2")
        assert (got.kind, got.record, got.maybe_sent) == (ClaimKind.NEW, failed, True)
    finally:
        await guarded.close()
        await other.close()


async def test_a_release_waits_for_replicas_as_a_renewal_does(own_redis: OwnRedis) -> None:
    """A cancelled job's hand-on deletes its claim (nothing sent) or makes it expire: both are
    writes a failover may undo, and both are refused alike when no replica acknowledged them (the
    deletion was not, and the log said the claim was kept only for the other). No replica runs
    here."""
    plain = RedisStore(own_redis.url)
    guarded = RedisStore(own_redis.url, min_replicas=1)
    try:
        await plain.claim("e1", "w1", "t/0/1", 30, token="1")
        with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
            await guarded.extend("e1", "w1", 30.0, token="1")
        with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
            await guarded.release("e1", "w1", token="1")
        assert (await plain.claim("e1", "w2", "t/0/2", 30)).kind is ClaimKind.NEW  # done on the primary
    finally:
        await plain.close()
        await guarded.close()


async def test_a_takeover_refused_for_want_of_replicas_is_still_a_takeover_when_asked_again(
    own_redis: OwnRedis,
) -> None:
    """The refused claim replaced a crashed worker's expired claim (or a failed event's record) on
    the primary; asked again, the claim found only its own and answered a plain NEW: the change,
    maybe sent by the dead worker, went out again without a look at the ticket. (No replica runs
    here: every write with min_replicas=1 is refused, as while the replica is away.)"""
    crashed = RedisStore(own_redis.url)
    guarded = RedisStore(own_redis.url, min_replicas=1)
    try:
        assert (await crashed.claim("e1", "w1", "t/0/1", 0.05)).kind is ClaimKind.NEW
        await crashed.mark_done("e2", DedupRecord("done", "w1", "t/0/2", "failed", 5, 503), 60)
        for event_id in ("e1", "e2"):

            async def taken_on_the_primary(event_id: str = event_id) -> bool:
                with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
                    await guarded.claim(event_id, "w2", "t/0/9", 30)
                return event_id in guarded._unreplicated

            # e1: once w1's lease is out, the claim is taken (on the primary) and refused
            await until(taken_on_the_primary, timeout_s=5, every_s=0.02, what="w1's lease to run out")
            with pytest.raises(DedupUnavailable):  # refused again: it must not forget the first
                await guarded.claim(event_id, "w2", "t/0/9", 30)
        guarded._min_replicas = 0  # the replica back
        took = await guarded.claim("e1", "w2", "t/0/9", 30)
        assert (took.kind, took.taken_over, took.maybe_sent) == (ClaimKind.NEW, True, True)
        assert took.record is not None
        assert took.record.owner == "w1"
        retried = await guarded.claim("e2", "w2", "t/0/9", 30)
        assert (retried.kind, retried.taken_over, retried.maybe_sent) == (ClaimKind.NEW, False, True)
    finally:
        await crashed.close()
        await guarded.close()


def test_redis_tls_without_verification_is_logged_as_a_warning() -> None:
    """As for Kafka and the API: a man in the middle could read and forge every claim."""
    with capture_logs() as logs:
        stores = [
            open_store(f"rediss://redis.example:6380/0{query}") for query in ("?ssl_cert_reqs=none", "")
        ]
    for store in stores:
        asyncio.run(store.close())
    assert [(e["event"], e["log_level"]) for e in logs] == [("redis_tls_verification_disabled", "warning")]


async def test_after_a_redis_restart_the_pool_is_dropped_at_the_first_lost_connection(
    own_redis: OwnRedis,
) -> None:
    """A restart closes every pooled connection. The probe's PING passed on a fresh one, then each
    job met another dead pooled connection and paused the worker again, each pause from the
    backoff already reached: three pauses and ~60 s late in an operator review. Now the first
    lost connection drops the pool, and the probe's pass holds."""
    store = RedisStore(own_redis.url)
    try:
        await asyncio.gather(*(store.claim(f"warm-{i}", "w", "s", 30) for i in range(8)))
        assert len(await own_redis.connections()) > 1  # several pooled
        await own_redis._admin("CLIENT", "KILL", "TYPE", "normal")  # as a restart does
        with pytest.raises(DedupUnavailable, match="unreachable"):
            await store.claim("after-1", "w", "s", 30)
        await store.ping()  # the gate's probe passes
        claims = await asyncio.gather(
            *(store.claim(f"after-{i}", "w", "s", 30) for i in range(2, 10)), return_exceptions=True
        )
        assert [c for c in claims if isinstance(c, BaseException)] == []
    finally:
        await store.close()


# --- a Redis store that may have forgotten (restarted empty) -------------------------------------
#: The default of ``dedup_forgotten_window_s``.
WINDOW_S = 600.0


async def test_a_new_redis_store_answers_new_claims_as_young_within_its_window(redis_url: str) -> None:
    """A store without the epoch is new: either never used, or a Redis that restarted empty and
    forgot every claim and applied record. A claim over no record then cannot tell "never seen"
    from "forgotten", and is answered young (the ticket is read first), said once. Not maybe
    sent: no answer of ours is known lost (a refusal after the read is an ordinary one)."""
    prefix = key_prefix(redis_url)
    with store_redis(redis_url) as client:
        async with redis_store(redis_url, WINDOW_S) as store:
            with capture_logs() as logs:
                first = await store.claim("e1", "w1", "t/0/1", 30)
                second = await store.claim("e2", "w1", "t/0/2", 30)
            assert (first.kind, first.record, first.taken_over) == (ClaimKind.NEW, None, False)
            assert (first.store_young, first.maybe_sent) == (True, False)
            assert second.store_young
            held = await store.claim("e1", "w2", "t/0/1", 30)  # only a NEW claim over nothing is young
            assert (held.kind, held.store_young) == (ClaimKind.HELD, False)
            assert [(e["event"], e["log_level"], e["age_s"], e["window_s"]) for e in logs] == [
                ("dedup_store_young", "warning", 0, WINDOW_S)
            ]
            # the store's creation time on Redis' clock, kept for ever
            epoch = client.get(prefix + "@epoch")
            assert epoch is not None
            assert abs(float(epoch) - time.time()) < 5
            assert client.ttl(prefix + "@epoch") == -1


async def test_a_window_of_0_answers_no_claim_as_young_and_still_dates_the_store(redis_url: str) -> None:
    """0 turns the window off; the epoch is written all the same, so that turning it on later, or
    another process with it on, dates the store from its first claim."""
    prefix = key_prefix(redis_url)
    with store_redis(redis_url) as client:
        async with redis_store(redis_url, 0) as store:
            with capture_logs() as logs:
                claim = await store.claim("e1", "w1", "t/0/1", 30)
            assert (claim.kind, claim.store_young, claim.maybe_sent) == (ClaimKind.NEW, False, False)
            assert logs == []
            assert client.get(prefix + "@epoch") is not None


@pytest.mark.parametrize(("age_s", "young"), [(60, True), (3600, False)])
async def test_a_store_is_young_only_within_the_window_after_its_epoch(
    redis_url: str, age_s: int, young: bool
) -> None:
    """The epoch is Unix seconds on Redis' clock; once the window is over, a claim over nothing is
    a new event again (sent without a read) and the epoch is left as it is."""
    prefix = key_prefix(redis_url)
    with store_redis(redis_url) as client:
        created = f"{time.time() - age_s:.6f}"
        client.set(prefix + "@epoch", created)
        async with redis_store(redis_url, WINDOW_S) as store:
            claim = await store.claim("e1", "w1", "t/0/1", 30)
            assert (claim.kind, claim.store_young, claim.maybe_sent) == (ClaimKind.NEW, young, False)
            assert client.get(prefix + "@epoch") == created.encode()


async def test_an_applied_event_forgotten_by_a_restarted_redis_is_claimed_as_young(
    redis_url: str,
) -> None:
    """The reviewer's case: an event applied, its offset not yet committed, and Redis (without
    persistence) restarts empty. The redelivery found no record and was sent again without a look
    at the ticket. Now the store is young again: the claim is NEW and young. The process that saw
    the store emptied under it says so, as an error, once for each time it was emptied."""
    prefix = key_prefix(redis_url)
    with store_redis(redis_url) as client:
        client.set(prefix + "@epoch", f"{time.time() - 3600:.6f}")  # a store in use for an hour
        async with redis_store(redis_url, WINDOW_S) as store:
            first = await store.claim("e1", "w1", "t/0/1", 30)
            assert (first.kind, first.maybe_sent) == (ClaimKind.NEW, False)
            await store.mark_applied("e1", DedupRecord("applied", "w1", "t/0/1", "applied"), 60)
            assert (await store.claim("e1", "w1", "t/0/1", 30)).kind is ClaimKind.APPLIED

            forget_store(redis_url)
            with capture_logs() as logs:
                again = await store.claim("e1", "w1", "t/0/1", 30)
                await store.claim("e2", "w1", "t/0/2", 30)
            assert (again.kind, again.record, again.taken_over) == (ClaimKind.NEW, None, False)
            assert (again.store_young, again.maybe_sent) == (True, False)
            assert [(e["event"], e["log_level"], e["age_s"]) for e in logs] == [
                ("dedup_store_emptied", "error", 0)
            ]
            forget_store(redis_url)  # emptied a second time: said again, once
            with capture_logs() as logs:
                await store.claim("e3", "w1", "t/0/3", 30)
                await store.claim("e4", "w1", "t/0/4", 30)
            assert [e["event"] for e in logs] == ["dedup_store_emptied"]


async def test_the_epoch_goes_through_the_replicas_wait_as_the_claim_does(
    own_redis: OwnRedis, replica_of_own_redis: subprocess.Popen[bytes]
) -> None:
    """Written by the claim script, the epoch is acknowledged with the claim
    (``dedup_redis_min_replicas``): a replica promoted after a failover knows the store's age. A
    claim refused for want of replicas, asked again, is still young: it replaced nothing."""
    primary = redis.Redis(port=own_redis.port)
    args = list(replica_of_own_redis.args)
    replica = redis.Redis(port=int(args[args.index("--port") + 1]))
    guarded = RedisStore(own_redis.url, min_replicas=1, forgotten_window_s=WINDOW_S)
    try:
        await until(
            lambda: primary.info("replication").get("slave0", {}).get("state") == "online",
            what="the replica in sync",
        )
        first = await guarded.claim("e1", "w1", "t/0/1", 30)
        assert (first.kind, first.store_young) == (ClaimKind.NEW, True)
        assert replica.get("coc:dedup:@epoch") == primary.get("coc:dedup:@epoch") is not None

        replica_of_own_redis.terminate()
        await until(lambda: primary.info("replication")["connected_slaves"] == 0, what="the replica gone")
        with pytest.raises(DedupUnavailable, match="reached 0 of 1 replicas"):
            await guarded.claim("e2", "w1", "t/0/2", 30)  # written on the primary all the same
        guarded._min_replicas = 0  # as if the replica were back: the claim again
        again = await guarded.claim("e2", "w1", "t/0/2", 30)
        assert (again.kind, again.taken_over, again.store_young, again.maybe_sent) == (
            ClaimKind.NEW,
            False,
            True,
            False,
        )
    finally:
        primary.close()
        replica.close()
        await guarded.close()
