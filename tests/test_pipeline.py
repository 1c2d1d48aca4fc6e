"""``Pipeline.process`` for one message, against the simulator over HTTP: what an earlier attempt at
the same event makes the next one do. The outcome publisher is a recorder (the broker's side is
covered by the integration tests); the store, client, gate and caller are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from services import forget_store, redis_store, store_redis
from structlog.testing import capture_logs
from waiting import until

from schemas.asyncapi import asyncapi_document
from schemas.events import CHANGE_EVENT_ADAPTER
from schemas.outcomes import OutcomeEvent
from worker.api_client import CocApiClient
from worker.apply import ApiCaller, ApplyResult
from worker.cancel import cancel_and_wait
from worker.consumer import Message
from worker.decode import decode_or_salvage, salvage_identity
from worker.dedup import Claim, ClaimKind, DedupRecord, DedupStore, MemoryStore, RedisStore, open_store
from worker.errors import (
    BrokerUnavailable,
    DeadLetterUnwritable,
    DedupUnavailable,
    InvalidEvent,
)
from worker.gate import Gate
from worker.logs import REDACTED, bind_message_context, configure, get_logger, register_secrets
from worker.mapping import event_target
from worker.metrics import Metrics
from worker.pipeline import Job, Pipeline
from worker.publisher import DeadLetter
from worker.ratelimit import AdaptiveConcurrency
from worker.redis_config import key_prefix
from worker.retry import RetryPolicy
from worker.settings import WorkerSettings
from worker.simulator import SimulatorConfig, SimulatorServer
from worker.tracing import from_headers

AK = "AK-PIPELINE-TEST-1"
SK = "sk-pipeline-test-secret-01"
SEED: dict[str, Any] = {
    "tickets": [{"ticket_id": "CM1", "sub_tickets": ["s-1"]}, {"ticket_id": "CM2", "sub_tickets": ["s-2"]}]
}
STARTED = {"event_id": "ev-1", "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": "s-1"}
TICKET_UPDATE = {
    "event_id": "ev-1",
    "type": "ticket.update",
    "ticket_id": "CM1",
    "ticket_info": {"phase": "phase_change_close"},
}


@dataclass
class Recorder:
    """Stands in for ``Publisher``: keeps what would have been written. ``refuse_letters`` /
    ``refuse_outcomes``: that many dead letters / outcomes fail while the other part goes through."""

    outcomes: list[dict[str, Any]] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)  # each written outcome's
    letters: list[DeadLetter] = field(default_factory=list)
    refuse_letters: int = 0
    refuse_outcomes: int = 0

    async def publish(
        self,
        key: bytes | None,
        outcome: bytes | None,
        status: str,
        letter: DeadLetter | None,
        traceparent: str,
    ) -> None:
        if outcome is not None and self.refuse_outcomes:
            self.refuse_outcomes -= 1
            if letter is not None:
                self.letters.append(letter)
            error = BrokerUnavailable("outcome not confirmed")
            error.dead_letter_confirmed = letter is not None
            raise error
        if outcome is not None:
            written = json.loads(outcome)
            # the pipeline serializes the fields itself (dump_outcome): the model's, in its order
            assert list(written) == list(OutcomeEvent.model_fields)
            assert OutcomeEvent.model_validate(written).status.value == status
            self.outcomes.append(written)
            self.keys.append(key)
        if letter is not None:
            if self.refuse_letters:
                self.refuse_letters -= 1
                raise DeadLetterUnwritable("topic missing")
            self.letters.append(letter)

    async def ping(self) -> None:
        return None

    async def ping_dead_letters(self) -> None:
        return None


@dataclass
class Rig:
    sim: SimulatorServer
    pipeline: Pipeline
    published: Recorder
    store: DedupStore  # a MemoryStore unless the test gave another
    settings: WorkerSettings


def job(raw: dict[str, Any], offset: int = 7) -> Job:
    message = Message("in", 0, offset, raw["ticket_id"].encode(), json.dumps(raw).encode(), [], 0)
    event = CHANGE_EVENT_ADAPTER.validate_python(raw)
    return Job(message, event, None, from_headers([]), datetime.now(UTC), time.monotonic())


@contextlib.asynccontextmanager
async def make_rig(
    policy: RetryPolicy,
    settle_s: float = 0.0,
    concurrency: int = 1 << 30,
    abandon_s: float = 0.0,
    store: DedupStore | None = None,
    **settings_: Any,
) -> AsyncIterator[Rig]:
    """``concurrency``: the API requests the caller lets out at once; ``abandon_s``: how long a
    request of a cancelled job may still land; ``store``: the dedup store (a new MemoryStore
    unless given; the caller closes one it gives); ``settings_``: the worker's settings."""
    metrics = Metrics()
    gate = Gate(metrics, probe_base_s=0.01, probe_max_s=0.05)
    async with SimulatorServer(SimulatorConfig(port=0, credentials={AK: SK}, seed=SEED)) as sim:
        settings = WorkerSettings(api_endpoint=sim.url, api_ak=AK, api_sk=SK, worker_id="w1", **settings_)
        client = CocApiClient(settings, metrics)
        await client.start()
        published = Recorder()
        limit = AdaptiveConcurrency(concurrency, metrics)
        caller = ApiCaller(
            client, policy, gate, metrics, 60.0, concurrency=limit, settle_s=settle_s, abandon_s=abandon_s
        )
        store = store or MemoryStore()
        try:
            yield Rig(
                sim, Pipeline(settings, store, caller, published, gate, metrics), published, store, settings
            )
        finally:
            await client.close()
            await gate.close()


@contextlib.asynccontextmanager
async def another_worker(rig: Rig, policy: RetryPolicy) -> AsyncIterator[Pipeline]:
    """Another worker's pipeline (another claimant) on the rig's simulator and dedup store."""
    metrics = Metrics()
    gate = Gate(metrics, probe_base_s=0.01, probe_max_s=0.05)
    settings = rig.settings.model_copy(update={"worker_id": "w2"})
    client = CocApiClient(settings, metrics)
    await client.start()
    caller = ApiCaller(client, policy, gate, metrics, 60.0)
    try:
        yield Pipeline(settings, rig.store, caller, rig.published, gate, metrics)
    finally:
        await client.close()
        await gate.close()


#: Long backoff: after its first attempt a job sleeps until it is cancelled.
_SLOW_RETRIES = RetryPolicy(max_attempts=5, max_elapsed_s=100, base_delay_s=30, max_delay_s=30)


async def cancel_once_applied_with_its_answer_lost(rig: Rig, raw: dict[str, Any]) -> None:
    """Process ``raw`` with every answer dropped after the change is applied; cancel the job
    (a revoke or a stop past its grace) once the change is in; answer again from then on."""
    state = rig.sim.state
    state.set_faults(drop_after_apply_ratio=1.0)
    first = asyncio.create_task(rig.pipeline.process(job(raw)))
    await until(lambda: bool(state.applied_log))
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    state.set_faults(drop_after_apply_ratio=0.0)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with make_rig(_SLOW_RETRIES) as made:
        yield made


@pytest.mark.parametrize("raw", [STARTED, TICKET_UPDATE], ids=["started", "ticket_update"])
async def test_a_job_cancelled_after_sending_is_checked_before_its_owner_sends_again(
    raw: dict[str, Any],
) -> None:
    """A revocation (or shutdown) past its grace cancels a job whose change reached the API; the
    claim it leaves is this worker's own. When the same message comes back to the same worker, the
    ticket is read first: the change is in place, so nothing is sent again and the outcome is
    ``applied``, not a state-machine refusal (or, for ``ticket.update``, a second application)."""
    # The first job's own read of the ticket waits the settle time, so the cancel comes first (with
    # none, a loaded machine let it read and reconcile before the test's poll saw the change).
    async with make_rig(_SLOW_RETRIES, settle_s=1.0) as rig:
        state = rig.sim.state
        await cancel_once_applied_with_its_answer_lost(rig, raw)

        await rig.pipeline.process(job(raw))

        assert len(state.applied_for("ev-1")) == 1
        assert [r.method for r in state.requests] == ["PUT", "GET"]
        assert [(o["status"], o["attempts"]) for o in rig.published.outcomes] == [("applied", 0)]
        assert rig.published.letters == []


async def test_a_job_cancelled_before_it_sent_anything_gives_its_claim_back() -> None:
    """A stop or a revoke past its grace cancels a job that holds its claim and has sent nothing
    yet (here it waits for a free API slot). The claim is deleted: another worker's copy of the
    message starts afresh at once, instead of waiting out the lease (30 s) and reading the ticket."""
    async with make_rig(_SLOW_RETRIES, concurrency=1) as rig:
        limit = rig.pipeline._caller._concurrency
        await limit.acquire()  # the only slot, taken
        first = asyncio.create_task(rig.pipeline.process(job(STARTED)))
        await until(lambda: rig.store._get("ev-1") is not None, what="the claim")
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        limit.release()

        assert rig.store._get("ev-1") is None
        async with another_worker(rig, _SLOW_RETRIES) as other:
            await asyncio.wait_for(other.process(job(STARTED)), 10)  # not the 30 s lease

        assert [r.method for r in rig.sim.state.requests] == ["PUT"]  # no read of the ticket first
        assert [(o["status"], o["reason"]) for o in rig.published.outcomes] == [("applied", None)]


async def test_a_job_cancelled_after_its_answer_was_lost_hands_its_claim_on_once_the_request_has_landed() -> (
    None
):
    """The cancelled job's change reached the API and its answer was lost (or had not come yet):
    the request may still land for a while (1 s here, whether the job was cancelled in the send
    or in its settle wait after it). Its claim is not deleted: it expires once that time is out,
    not after the lease (30 s). Another worker then takes it over, reads the ticket first and
    finds the change in place: one PUT in all, the outcome ``applied`` (reconciled)."""
    async with make_rig(_SLOW_RETRIES, settle_s=1.0, abandon_s=1.0) as rig:
        state = rig.sim.state
        await cancel_once_applied_with_its_answer_lost(rig, STARTED)

        taken = await rig.store.claim("ev-1", "w3/probe", "in/0/7", 30.0)
        assert taken.kind is ClaimKind.HELD  # the request may still land
        async with another_worker(rig, _SLOW_RETRIES) as other:
            await asyncio.wait_for(other.process(job(STARTED)), 10)  # not the 30 s lease

        assert [r.method for r in state.requests] == ["PUT", "GET"]
        assert len(state.applied_for("ev-1")) == 1
        assert [(o["status"], o["reason"]) for o in rig.published.outcomes] == [("applied", "reconciled")]


@pytest.mark.parametrize("raw", [STARTED, TICKET_UPDATE], ids=["started", "ticket_update"])
async def test_an_event_applied_before_a_redis_restart_is_read_not_sent_again(
    raw: dict[str, Any], redis_url: str
) -> None:
    """A Redis without persistence restarts empty after the event was applied and before its
    offset was committed: its message comes back to a store with no record of it. The store is
    young again, so the ticket is read first: the change is in place, nothing is sent twice. (Its
    first pass, in a store as young, read the ticket too: one GET more per event in the window.)"""
    async with redis_store(redis_url, 600.0) as store, make_rig(_SLOW_RETRIES, store=store) as rig:
        state = rig.sim.state
        await rig.pipeline.process(job(raw))
        forget_store(redis_url)

        await rig.pipeline.process(job(raw))

        assert len(state.applied_for("ev-1")) == 1
        assert [r.method for r in state.requests] == ["GET", "PUT", "GET"]
        assert [(o["status"], o["reason"]) for o in rig.published.outcomes] == [
            ("applied", None),
            ("applied", "reconciled"),
        ]


async def test_a_refusal_in_a_young_store_is_an_ordinary_one(redis_url: str) -> None:
    """A young store's claims read the ticket first, but no answer of ours was lost: a refusal of
    the send that follows is the API's ordinary one. It was reported ``*_maybe_applied`` ("refused
    after an earlier attempt's answer was lost"), for every refusal in the 10 minutes after an
    install or an upgrade, and a redelivery repeated it."""
    ended = {**STARTED, "type": "change.ended"}  # refused: s-1 was never started
    async with redis_store(redis_url, 600.0) as store, make_rig(_SLOW_RETRIES, store=store) as rig:
        await rig.pipeline.process(job(ended))

        assert [r.method for r in rig.sim.state.requests] == ["GET", "PUT"]
        [outcome] = rig.published.outcomes
        assert outcome["status"] == "rejected"
        assert not outcome["reason"].endswith("_maybe_applied")
        assert "answer was lost" not in (outcome["error_msg"] or "")


async def test_a_job_cancelled_before_sending_in_a_young_store_leaves_the_next_owner_a_read(
    redis_url: str,
) -> None:
    """Cancelled while it waits for an API slot, having sent nothing: its claim replaced no record,
    but in a young store that says nothing (the event may have been applied and forgotten). The
    claim is not deleted but expires, and the next owner takes it over and reads the ticket, even
    once the window is over."""
    async with (
        redis_store(redis_url, 600.0) as store,
        make_rig(_SLOW_RETRIES, concurrency=1, store=store) as rig,
    ):
        prefix, client = key_prefix(redis_url), store_redis(redis_url)
        limit = rig.pipeline._caller._concurrency
        await limit.acquire()  # the only slot, taken
        first = asyncio.create_task(rig.pipeline.process(job(STARTED)))
        try:
            # Past its claim (a cancel during the claim keeps the claim anyway, and one landing on
            # the claim's answer may be lost on Python 3.11: worker/cancel.py), waiting to read.
            await until(lambda: limit.waiting == 1, what="the job waiting for a slot")
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            limit.release()
            await rig.pipeline.handed_on()
            assert client.exists(prefix + "ev-1")  # kept, not deleted
            client.set(prefix + "@epoch", f"{time.time() - 3600:.6f}")  # the window over
        finally:
            client.close()
        async with another_worker(rig, _SLOW_RETRIES) as other:
            await asyncio.wait_for(other.process(job(STARTED)), 10)

        assert [r.method for r in rig.sim.state.requests] == ["GET", "PUT"]
        assert [(o["status"], o["reason"]) for o in rig.published.outcomes] == [("applied", None)]


_LOST_ANSWER_POLICY = RetryPolicy(max_attempts=5, max_elapsed_s=0.5, base_delay_s=0.01, max_delay_s=0.01)
_LOST_ANSWER_TIMEOUTS = {"api_connect_timeout_s": 0.2, "api_request_timeout_s": 0.3}


async def test_a_job_cancelled_after_failing_on_a_lost_answer_keeps_its_claim_while_the_request_may_land() -> (
    None
):
    """The budget ran out before the settle wait of a send whose answer was lost (the API applies
    it 0.8 s after it arrived; the client gave up at 0.3 s): ``failed``, and that request may land
    for 1 s more. The job is cancelled while it waits for that, before its record is written. Its
    claim expired at once, so another worker read the ticket before the change landed and sent it
    again: applied twice. Now the claim is held until the request can no longer land."""
    async with make_rig(_LOST_ANSWER_POLICY, settle_s=1.0, abandon_s=1.0, **_LOST_ANSWER_TIMEOUTS) as rig:
        state = rig.sim.state
        state.set_faults(latency_ms=800)
        first = asyncio.create_task(rig.pipeline.process(job(STARTED)))
        await until(lambda: state.arrived == 1, what="the PUT")
        state.set_faults(latency_ms=0)
        with capture_logs() as logs:
            await until(
                lambda: any(e["event"] == "api_waiting_for_lost_answer" for e in logs),
                what="the budget spent, the lost answer's request still landing",
            )
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

        taken = await rig.store.claim("ev-1", "w3/probe", "in/0/7", 30.0)
        assert taken.kind is ClaimKind.HELD  # the request may still land
        async with another_worker(rig, _LOST_ANSWER_POLICY) as other:
            await asyncio.wait_for(other.process(job(STARTED)), 10)
        await until(lambda: len(state.requests) == state.arrived, what="every request answered")

        assert [r.method for r in state.requests] == ["PUT", "GET"]
        assert len(state.applied_for("ev-1")) == 1
        assert [(o["status"], o["reason"]) for o in rig.published.outcomes] == [("applied", "reconciled")]


async def test_a_failed_events_record_waits_until_its_lost_request_can_no_longer_land() -> None:
    """The same ``failed`` event, not cancelled: its record came at once, and a copy of the event
    waiting at another worker (a DLQ replay, a copy on another partition) then claimed it, read the
    ticket before the late request landed, and sent the change again. Now the record waits until
    that request can no longer land: the copy reads the change in place and sends nothing."""
    async with make_rig(_LOST_ANSWER_POLICY, settle_s=1.0, abandon_s=1.0, **_LOST_ANSWER_TIMEOUTS) as rig:
        state = rig.sim.state
        state.set_faults(latency_ms=800)
        first = asyncio.create_task(rig.pipeline.process(job(STARTED, offset=7)))
        await until(lambda: state.arrived == 1, what="the PUT")
        state.set_faults(latency_ms=0)
        async with another_worker(rig, _LOST_ANSWER_POLICY) as other:
            copy = asyncio.create_task(other.process(job(STARTED, offset=8)))
            await asyncio.wait_for(asyncio.gather(first, copy), 10)
        await until(lambda: len(state.requests) == state.arrived, what="every request answered")

        assert [r.method for r in state.requests] == ["PUT", "GET"]
        assert len(state.applied_for("ev-1")) == 1
        assert sorted((o["status"], o["reason"]) for o in rig.published.outcomes) == [
            ("applied", "reconciled"),
            ("failed", "retries_exhausted_maybe_applied"),
        ]


async def test_a_replay_of_a_failed_event_is_checked_before_it_is_sent() -> None:
    """The first message's answer was lost and the ticket unreadable until its budget ran out:
    ``failed``, "it may have been applied". Its replay (the same event, another message) reads the
    ticket before sending, finds the change in place, and ends ``applied`` without a second PUT."""
    policy = RetryPolicy(max_attempts=3, max_elapsed_s=0.5, base_delay_s=0.01, max_delay_s=0.05)
    async with make_rig(policy) as rig:
        state = rig.sim.state
        state.set_faults(drop_after_apply_ratio=1.0)

        async def unreadable_once_applied() -> None:
            await until(lambda: bool(state.applied_log))
            state.set_faults(drop_after_apply_ratio=0.0, error_ratio=1.0)

        flipper = asyncio.create_task(unreadable_once_applied())
        await rig.pipeline.process(job(STARTED, offset=7))
        await flipper
        state.set_faults(error_ratio=0.0)
        puts_before = sum(r.method == "PUT" for r in state.requests)

        await rig.pipeline.process(job(STARTED, offset=8))  # e.g. `coc-worker dlq replay`

        assert [(o["status"], o["reason"]) for o in rig.published.outcomes] == [
            ("failed", "retries_exhausted_maybe_applied"),  # the reason says so, not only the text
            ("applied", "reconciled"),
        ]
        assert "may have been applied" in rig.published.outcomes[0]["error_msg"]
        assert sum(r.method == "PUT" for r in state.requests) == puts_before
        assert len(state.applied_for("ev-1")) == 1


async def test_one_event_id_in_two_lanes_at_once_is_decided_as_if_one_came_after(rig: Rig) -> None:
    """Two messages with one ``event_id`` but different tickets run in different lanes, so at the
    same time. The second must not take the first's unfinished claim for one of its own cancelled
    jobs (read the ticket, send): it waits for the first to finish and is then decided exactly as
    when it arrives later: the id was reused for another change. One PUT, not two."""
    other_ticket = {**STARTED, "ticket_id": "CM2", "sub_ticket_id": "s-2"}

    await asyncio.gather(
        rig.pipeline.process(job(STARTED)), rig.pipeline.process(job(other_ticket, offset=8))
    )

    state = rig.sim.state
    assert [r.method for r in state.requests] == ["PUT"]
    assert sorted(o["status"] for o in rig.published.outcomes) == ["applied", "invalid"]
    assert [o["ticket_id"] for o in rig.published.outcomes if o["status"] == "applied"] == ["CM1"]


@pytest.mark.parametrize(
    "second",
    [
        {**STARTED, "ticket_id": "CM2", "sub_ticket_id": "s-2"},  # a CI matrix sharing one id
        {**STARTED, "type": "change.ended"},  # one id for a change's start and its end
    ],
    ids=["other_ticket", "other_type"],
)
async def test_an_event_id_reused_for_another_change_is_invalid_not_a_duplicate(
    rig: Rig, second: dict[str, Any]
) -> None:
    """``duplicate`` would say the second change was done while it was never sent: it ends
    ``invalid`` (``event_id_reused``) with a dead letter that names both, and a redelivery of it
    repeats that outcome. The same change sent again stays a ``duplicate``."""
    await rig.pipeline.process(job(STARTED))
    await rig.pipeline.process(job(second, offset=8))
    await rig.pipeline.process(job(second, offset=8))  # redelivered
    await rig.pipeline.process(job(STARTED, offset=9))  # the first event, sent again

    assert [r.method for r in rig.sim.state.requests] == ["PUT"]
    first, reused, again, copy = rig.published.outcomes
    assert first["status"] == "applied"
    assert (reused["status"], reused["reason"], reused["attempts"]) == ("invalid", "event_id_reused", 0)
    assert (reused["event_id"], reused["ticket_id"], reused["type"]) == (
        "ev-1",
        second["ticket_id"],
        second["type"],
    )
    assert "change.started CM1/s-1" in reused["error_msg"]
    assert f"{second['type']} {second['ticket_id']}/{second['sub_ticket_id']}" in reused["error_msg"]
    assert (again["status"], again["reason"], again["redelivered"]) == ("invalid", "event_id_reused", True)
    assert (copy["status"], copy["reason"]) == ("duplicate", "duplicate_event_id")
    assert [(letter.reason, letter.offset) for letter in rig.published.letters] == [
        ("event_id_reused", 8),
        ("event_id_reused", 8),
    ]


async def test_an_event_id_reused_after_a_refused_first_use_is_invalid_too(rig: Rig) -> None:
    """The first use of the id was refused (its sub-ticket not started): another message may
    retry that change, but not reuse the id for another one. The reuse is never sent, and the
    first message's redelivery repeats its own outcome."""
    ended = {**STARTED, "type": "change.ended"}
    await rig.pipeline.process(job(ended, offset=1))  # refused: s-1 was never started
    await rig.pipeline.process(job(STARTED, offset=2))  # the id reused for another change
    await rig.pipeline.process(job(ended, offset=1))  # the first message, redelivered

    assert [r.method for r in rig.sim.state.requests] == ["PUT"]
    first, reused, again = rig.published.outcomes
    assert first["status"] == "rejected"
    assert (reused["status"], reused["reason"], reused["attempts"]) == ("invalid", "event_id_reused", 0)
    assert (again["status"], again["redelivered"]) == ("rejected", True)


async def test_a_duplicate_read_again_repeats_its_outcome_marked_redelivered(rig: Rig) -> None:
    """A message whose event was applied from another one is a duplicate; read again (a crash or
    a revoke before the commit) its outcome comes again marked ``redelivered``, as the README says
    of every copy (it came unmarked, as a second first answer)."""
    await rig.pipeline.process(job(STARTED, offset=7))
    await rig.pipeline.process(job(STARTED, offset=9))
    await rig.pipeline.process(job(STARTED, offset=9))  # read again

    assert [(o["status"], o["source"]["offset"], o["redelivered"]) for o in rig.published.outcomes] == [
        ("applied", 7, False),
        ("duplicate", 9, False),
        ("duplicate", 9, True),
    ]
    assert rig.published.outcomes[2]["reason"] == "duplicate_event_id"
    assert rig.published.outcomes[2]["error_msg"] == rig.published.outcomes[1]["error_msg"]
    assert [r.method for r in rig.sim.state.requests] == ["PUT"]


async def test_another_message_at_a_position_read_again_gets_its_own_outcome(rig: Rig) -> None:
    """A log cut back (an unclean leader election, a recreated topic) puts another message at an
    offset already finished: an outcome remembered by position is repeated only for the same
    message, else an invalid message would pass as the duplicate before it (no dead letter), or
    a duplicate as the invalid message before it."""
    await rig.pipeline.process(job(STARTED, offset=7))
    await rig.pipeline.process(invalid_job(offset=9))
    await rig.pipeline.process(job(STARTED, offset=9))  # another message at offset 9
    await rig.pipeline.process(job(STARTED, offset=11))
    await rig.pipeline.process(invalid_job(offset=11))  # another message at offset 11
    await rig.pipeline.process(invalid_job(offset=11))  # that one, read again

    assert [(o["status"], o["source"]["offset"], o["redelivered"]) for o in rig.published.outcomes] == [
        ("applied", 7, False),
        ("invalid", 9, False),
        ("duplicate", 9, False),
        ("duplicate", 11, False),
        ("invalid", 11, False),
        ("invalid", 11, True),
    ]
    assert [letter.offset for letter in rig.published.letters] == [9, 11, 11]


async def test_a_record_without_a_target_still_makes_a_duplicate(rig: Rig) -> None:
    """A record written before the target was kept (a rolling update) cannot tell a reuse from a
    copy: the message is a ``duplicate``, as it was then."""
    store = rig.pipeline._store
    record = DedupRecord("applied", "w0", "in/0/1", "applied", 1, 200)
    await store.mark_applied("ev-1", record, 60)

    await rig.pipeline.process(job({**STARTED, "ticket_id": "CM2", "sub_ticket_id": "s-2"}))

    assert list(rig.sim.state.requests) == []
    assert [(o["status"], o["reason"]) for o in rig.published.outcomes] == [
        ("duplicate", "duplicate_event_id")
    ]


async def test_a_job_waiting_for_another_of_its_event_is_counted_as_held_by_what_holds_that_one(
    rig: Rig,
) -> None:
    """A stop during a pause compares the jobs it holds with those running: a job waiting for
    another job of its event (one event_id on two tickets) is held by that one's wait at the gate."""
    gate = rig.pipeline._gate

    async def still_down() -> None:
        raise DedupUnavailable("still away")

    gate.trip(DedupUnavailable("away"), still_down)
    other_ticket = {**STARTED, "ticket_id": "CM2", "sub_ticket_id": "s-2"}
    first = asyncio.create_task(rig.pipeline.process(job(STARTED, offset=7)))
    await until(lambda: gate.waiting == 1, what="the first job at the gate")
    second = asyncio.create_task(rig.pipeline.process(job(other_ticket, offset=8)))
    await until(lambda: rig.pipeline.waiting_on_other_jobs == 1, what="the second job waiting for the first")
    assert gate.waiting == 1
    first.cancel()
    await until(
        lambda: gate.waiting == 1 and rig.pipeline.waiting_on_other_jobs == 0, what="the second at the gate"
    )
    second.cancel()
    await asyncio.gather(first, second, return_exceptions=True)


async def test_a_job_waiting_for_an_api_slot_is_counted_as_held_by_the_slots_holders() -> None:
    """Jobs queued for an API slot (``max_in_flight`` above the slots, or the limit halved after
    429s) are held by the jobs that hold the slots: when those wait at the gate, a stop during the
    pause waited out the grace, these not being counted."""
    async with make_rig(_SLOW_RETRIES, concurrency=1) as rig:
        limit = rig.pipeline._caller._concurrency
        await limit.acquire()  # the only slot, held by a job elsewhere
        queued = asyncio.create_task(rig.pipeline.process(job(STARTED)))
        await until(lambda: rig.pipeline.waiting_on_other_jobs == 1, what="the job queued for the slot")
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        limit.release()
        assert rig.pipeline.waiting_on_other_jobs == 0


async def test_a_job_waiting_for_the_same_event_id_goes_on_when_the_first_is_cancelled(rig: Rig) -> None:
    """The job holding the event is cancelled (a revocation past its grace): the waiting one is not
    left waiting. It finds the cancelled job's claim, of another change (the id reused for another
    ticket): it ends ``event_id_reused`` without a call, and leaves the claim to the first message,
    whose redelivery reads its own ticket and finds its change applied. Before, the second took
    the claim over and sent its change too; the first was then refused as the reuse, though its
    change was in place."""
    state = rig.sim.state
    state.set_faults(drop_after_apply_ratio=1.0)  # the first job's answer is lost: it backs off 30 s
    other_ticket = {**STARTED, "ticket_id": "CM2", "sub_ticket_id": "s-2"}
    first = asyncio.create_task(rig.pipeline.process(job(STARTED)))
    await until(lambda: bool(state.applied_log))
    second = asyncio.create_task(rig.pipeline.process(job(other_ticket, offset=8)))
    await until(lambda: bool(rig.pipeline._in_hand.get("ev-1")))  # it waits for the first
    state.set_faults(drop_after_apply_ratio=0.0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)

    await asyncio.wait_for(second, 10)
    await asyncio.wait_for(rig.pipeline.process(job(STARTED)), 10)  # the first message, read again

    assert [r.method for r in state.requests] == ["PUT", "GET"]
    assert [(o["ticket_id"], o["status"], o["reason"]) for o in rig.published.outcomes] == [
        ("CM2", "invalid", "event_id_reused"),
        ("CM1", "applied", "reconciled"),
    ]
    assert len(state.applied_for("ev-1")) == 1


def invalid_job(offset: int = 9) -> Job:
    message = Message("in", 0, offset, b"CM1", b"{not json", [], 0)
    salvaged = salvage_identity(message.value, 1 << 20)
    return Job(
        message,
        None,
        InvalidEvent("not_json", "not JSON"),
        from_headers([]),
        datetime.now(UTC),
        0.0,
        salvaged,
    )


async def test_a_dead_letter_refused_is_sent_again_without_its_confirmed_outcome(rig: Rig) -> None:
    """The dead-letter topic refuses the record (missing, writes denied) while the outcome went
    through: the worker pauses until the topic answers and then owes only the record. The outcome
    was written once, not once per try."""
    rig.published.refuse_letters = 3

    await asyncio.wait_for(rig.pipeline.process(invalid_job()), 10)

    assert [o["status"] for o in rig.published.outcomes] == ["invalid"]
    assert len(rig.published.letters) == 1
    # A refused write may have been stored all the same (a timed-out answer): the copy says so.
    assert rig.published.letters[0].redelivered
    assert rig.pipeline._gate.is_open
    assert (
        rig.pipeline._metrics.registry.get_sample_value("coc_worker_pauses_total", {"kind": "dlq_unwritable"})
        == 3
    )


async def test_an_outcome_written_before_a_dead_letter_outage_is_counted_when_written(rig: Rig) -> None:
    """The outcome went through and the dead-letter topic refuses its record for as long as the
    job lives (a stop during the outage cancels it): the results topic holds the outcome, so
    ``coc_worker_outcomes_total`` counts it, as it counts every outcome written. It was counted
    only once the dead letter was in too, and a stop during the outage left it uncounted."""
    rig.published.refuse_letters = 1_000_000

    def outcomes() -> float | None:
        return rig.pipeline._metrics.registry.get_sample_value(
            "coc_worker_outcomes_total", {"status": "invalid"}
        )

    task = asyncio.create_task(rig.pipeline.process(invalid_job()))
    try:
        await until(lambda: bool(rig.published.outcomes), what="the outcome written")
        await until(lambda: outcomes() == 1, what="the outcome counted")
    finally:
        await cancel_and_wait([task])
    assert [o["status"] for o in rig.published.outcomes] == ["invalid"]
    assert outcomes() == 1


async def test_an_outcome_confirmed_is_not_sent_again_whatever_the_dead_letters_write_raises(
    rig: Rig,
) -> None:
    """The outcome is in and the dead letter refused; the next try, of the dead letter alone,
    meets the broker away: the outcome was sent (and counted) a second time."""

    class AwayOnTheSecondTry(Recorder):
        tries = 0

        async def publish(
            self, key: bytes | None, outcome: bytes | None, status: str, letter: DeadLetter | None, tp: str
        ) -> None:
            self.tries += 1
            if self.tries == 1:
                await super().publish(key, outcome, status, None, tp)
                raise DeadLetterUnwritable("topic missing")
            if self.tries == 2:
                raise BrokerUnavailable("broker away")
            await super().publish(key, outcome, status, letter, tp)

    rig.pipeline._publisher = published = AwayOnTheSecondTry()
    await asyncio.wait_for(rig.pipeline.process(invalid_job()), 10)
    assert [o["status"] for o in published.outcomes] == ["invalid"]
    assert len(published.letters) == 1
    registry = rig.pipeline._metrics.registry
    assert registry.get_sample_value("coc_worker_outcomes_total", {"status": "invalid"}) == 1


async def test_an_outcome_refused_is_sent_again_without_its_confirmed_dead_letter(rig: Rig) -> None:
    rig.published.refuse_outcomes = 2

    await asyncio.wait_for(rig.pipeline.process(invalid_job()), 10)

    assert [(o["status"], o["redelivered"]) for o in rig.published.outcomes] == [("invalid", True)]
    assert len(rig.published.letters) == 1


class _Clock:
    """Stands in for ``time`` in worker.pipeline: the test moves it."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now


class _CallerStandIn:
    """What a stand-in for ``ApiCaller`` answers besides ``apply``: no request left behind."""

    def landing_until(self, event_id: str) -> float:
        return 0.0


class _SlowSender(_CallerStandIn):
    """An ApiCaller stand-in: sends twice, the second time ``gap_s`` after the first (a retry)."""

    def __init__(self, clock: _Clock, gap_s: float) -> None:
        self.clock, self.gap_s = clock, gap_s

    async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
        await kwargs["before_send"]()
        self.clock.now += self.gap_s  # the first attempt and its backoff take this long
        await kwargs["before_send"]()
        return ApplyResult("applied", 2, http_status=200)


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.extended = 0

    async def extend(self, event_id: str, owner: str, lease_s: float, token: str = "") -> bool:
        self.extended += 1
        return await super().extend(event_id, owner, lease_s, token)


@pytest.mark.parametrize(("gap_s", "renewals"), [(0.5, 0), (2.2, 1)])
async def test_a_send_renews_the_claim_unless_the_lease_outlasts_a_late_request(
    monkeypatch: pytest.MonkeyPatch, gap_s: float, renewals: int
) -> None:
    """A request may still reach the API up to 2 x (connect + request timeouts) after it is sent
    (5 s here), even when its job is cancelled; another worker may take the event over once the
    lease (7 s) ends. Before, a send renewed the lease only once a third of it had passed (2.33 s),
    so a send 2.2 s after the claim left 4.8 s of lease for a request that may land 5 s later."""
    clock = _Clock()
    monkeypatch.setattr("worker.pipeline.time", clock)
    store = _CountingStore()
    pipeline, gate = _pipeline(
        store,
        _SlowSender(clock, gap_s),
        Recorder(),
        dedup_lease_s=7.0,
        api_connect_timeout_s=1.0,
        api_request_timeout_s=1.5,
    )
    try:
        await pipeline.process(job(STARTED))
    finally:
        await gate.close()
    assert store.extended == renewals  # never for the send just after the claim


class _Answers(_CallerStandIn):
    """An ApiCaller stand-in answering with ``status``; counts its calls."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.calls = 0

    async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
        self.calls += 1
        await kwargs["before_send"]()
        code = "GOM.00001005" if self.status == "rejected" else None
        return ApplyResult(
            self.status, 1, http_status=400 if code else 200, error_code=code, error_msg="pending"
        )


class _AppliedMeanwhile(MemoryStore):
    """A store where another worker applies the event (it took the claim over while this one's
    had run out) just before this worker writes its done-record."""

    async def mark_done(self, key: str, record: Any, ttl_s: float, **claim: str) -> Any:
        applied = DedupRecord("applied", "w2", record.source, "applied", 1, 200, target=record.target)
        await self.mark_applied(key, applied, ttl_s)
        return await super().mark_done(key, record, ttl_s, **claim)


async def test_an_event_applied_elsewhere_before_its_done_record_ends_applied_not_failed() -> None:
    """The late worker's done-record no longer replaces the applied one, but it still published
    its own ``failed`` outcome and dead letter for an event another worker had applied (and a
    redelivery later answered ``applied``). The outcome is now the applied one, repeated."""
    published = Recorder()
    store = _AppliedMeanwhile()
    pipeline, gate = _pipeline(store, _Answers("failed"), published)
    try:
        await pipeline.process(job(STARTED))
    finally:
        await gate.close()
    assert [(o["status"], o["redelivered"]) for o in published.outcomes] == [("applied", True)]
    assert published.letters == []
    record = store._get(STARTED["event_id"])
    assert record is not None
    assert (record.state, record.owner) == ("applied", "w2")


class _StoreAway(MemoryStore):
    """A store whose done-records fail while ``away``."""

    away = False

    async def mark_done(self, key: str, record: Any, ttl_s: float, **claim: str) -> Any:
        if self.away:
            raise DedupUnavailable("store away")
        return await super().mark_done(key, record, ttl_s, **claim)

    async def ping(self) -> None:
        if self.away:
            raise DedupUnavailable("store away")


class _AnswerLostThenClaimLost(_CallerStandIn):
    """Sends, loses the answer and cannot read the ticket (``failed``, maybe applied) while the
    store loses the claim (a Redis failover, an eviction); then applies. Records, per pass,
    whether it was told a request of the event may have landed."""

    def __init__(self, store: MemoryStore, hold: asyncio.Event | None = None) -> None:
        self.store, self.hold = store, hold
        self.ambiguous: list[bool] = []

    async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
        self.ambiguous.append(kwargs["ambiguous"])
        if len(self.ambiguous) == 1:
            await kwargs["before_send"]()
            del self.store._items["ev-1"]
            return ApplyResult("failed", 3, http_status=504, maybe_applied=True)
        if self.hold is not None:
            await self.hold.wait()  # cancelled here, before it sends again
        await kwargs["before_send"]()
        return ApplyResult("applied", 1, http_status=200)


async def test_a_claim_lost_after_a_send_reads_the_ticket_before_sending_again() -> None:
    """The first pass sent and its answer was lost; the store lost its claim meanwhile, so the
    next claim is a fresh one that says nothing of that send. The next pass must still read the
    ticket first (it sent the change a second time, unread)."""
    store, published = MemoryStore(), Recorder()
    caller = _AnswerLostThenClaimLost(store)
    pipeline, gate = _pipeline(store, caller, published)
    try:
        await pipeline.process(job(STARTED))
    finally:
        await gate.close()
    assert caller.ambiguous == [False, True]


async def test_a_job_cancelled_after_its_claim_was_lost_past_a_send_leaves_the_next_owner_a_read() -> None:
    """Cancelled in the second pass, before it sent again: its claim replaced no record, but the
    first pass sent. The claim must expire (the next owner takes it over and reads the ticket),
    not be deleted as if nothing had been sent."""
    store, published, hold = MemoryStore(), Recorder(), asyncio.Event()
    caller = _AnswerLostThenClaimLost(store, hold)
    pipeline, gate = _pipeline(store, caller, published)
    task = asyncio.create_task(pipeline.process(job(STARTED)))
    try:
        await until(lambda: len(caller.ambiguous) == 2, what="the second pass")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        target = event_target(CHANGE_EVENT_ADAPTER.validate_python(STARTED))
        claim = await store.claim("ev-1", "another-worker", "t/0/9", 30.0, target=target)
    finally:
        await gate.close()
    assert claim.kind is ClaimKind.NEW
    assert claim.taken_over


def _pipeline(store: DedupStore, caller: Any, published: Recorder, **settings_: Any) -> tuple[Pipeline, Gate]:
    """A pipeline around stand-ins (no simulator): ``caller`` answers, ``published`` records."""
    settings = WorkerSettings(
        api_endpoint="http://127.0.0.1:1", api_ak=AK, api_sk=SK, worker_id="w1", **settings_
    )
    metrics = Metrics()
    gate = Gate(metrics, probe_base_s=0.01, probe_max_s=0.05)
    return Pipeline(settings, store, caller, published, gate, metrics), gate


class _SlowFirstDone(MemoryStore):
    """A store whose first done-record write waits for ``release`` (a slow store, a zombie owner)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.claims = 0

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        self.claims += 1
        return await super().claim(*args, **kwargs)

    async def mark_done(self, key: str, record: Any, ttl_s: float, **claim: str) -> Any:
        if not self.entered.is_set():
            self.entered.set()
            await self.release.wait()
        return await super().mark_done(key, record, ttl_s, **claim)


async def test_an_invalid_message_in_hand_at_another_worker_is_waited_for_then_repeated() -> None:
    """The previous owner of a partition (a zombie after a rebalance) still holds an invalid
    message's claim; the new owner went ahead all the same, and both published its outcome and
    dead letter unmarked. It waits for the holder, then repeats the outcome marked redelivered."""
    store, published = _SlowFirstDone(), Recorder()
    old, old_gate = _pipeline(store, _Answers("applied"), published)
    new, new_gate = _pipeline(store, _Answers("applied"), published)
    holding = asyncio.create_task(old.process(invalid_job()))
    await store.entered.wait()
    taking = asyncio.create_task(new.process(invalid_job()))
    await until(lambda: store.claims >= 2)  # the new owner has asked for the claim
    store.release.set()
    await asyncio.wait_for(asyncio.gather(holding, taking), 10)
    await old_gate.close()
    await new_gate.close()
    assert [(o["status"], o["redelivered"]) for o in published.outcomes] == [
        ("invalid", False),
        ("invalid", True),
    ]


#: Timeouts as short as settings allow, so that a lease (2 x (0.1 + 0.1) + 2 s at least) runs out soon.
_SHORT_LEASE = {"api_connect_timeout_s": 0.1, "api_request_timeout_s": 0.1, "dedup_lease_s": 2.5}


class _FailsOnceTheOtherApplied(_CallerStandIn):
    """An ApiCaller stand-in for a worker whose lease runs out while it backs off: it sends, then
    waits until ``other_done`` (another worker took the event over and applied it), then gives up."""

    def __init__(self) -> None:
        self.sent, self.other_done = asyncio.Event(), asyncio.Event()

    async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
        await kwargs["before_send"]()
        self.sent.set()
        await self.other_done.wait()
        return ApplyResult("failed", 3, http_status=503, detail="gave up")


async def test_a_worker_whose_claim_ran_out_does_not_overwrite_an_applied_record() -> None:
    """Its lease ran out in a long backoff; another worker took the event over and applied it;
    the first then gave up and wrote ``failed`` over the applied record: the next copy of the
    event went back to the API, and this message had two outcomes, ``applied`` and ``failed``.
    It finds its claim gone now, and repeats the applied outcome (marked redelivered)."""
    store, published = MemoryStore(), Recorder()
    slow = _FailsOnceTheOtherApplied()
    first, first_gate = _pipeline(store, slow, published, **_SHORT_LEASE)
    second, second_gate = _pipeline(store, _Answers("applied"), published, **_SHORT_LEASE)
    running = asyncio.create_task(first.process(job(STARTED)))
    await slow.sent.wait()
    await asyncio.wait_for(second.process(job(STARTED)), 10)  # takes over once the lease is out
    slow.other_done.set()
    await asyncio.wait_for(running, 10)
    await first_gate.close()
    await second_gate.close()
    record = await store.claim("ev-1", "w9", "in/0/99", 30, "change.started CM1/s-1")
    assert (record.kind, record.record.status if record.record else None) == (ClaimKind.APPLIED, "applied")
    assert [(o["status"], o["redelivered"]) for o in published.outcomes] == [
        ("applied", False),
        ("applied", True),
    ]


class _AnswersLate(MemoryStore):
    """A store whose claims and renewals answer ``late_s`` after they are written (a Redis write
    waiting for its replicas); counts the renewals."""

    def __init__(self, late_s: float) -> None:
        super().__init__()
        self.late_s, self.extends = late_s, 0

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        answer = await super().claim(*args, **kwargs)
        await asyncio.sleep(self.late_s)
        return answer

    async def extend(self, *args: Any, **kwargs: Any) -> bool:
        self.extends += 1
        return await super().extend(*args, **kwargs)


class _SendsAfter(_CallerStandIn):
    """An ApiCaller stand-in that sends ``after_s`` into its call."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s

    async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
        await asyncio.sleep(self.after_s)  # the time the call takes before it sends (not a wait for anything)
        await kwargs["before_send"]()
        return ApplyResult("applied", 1, http_status=200)


async def test_the_lease_is_counted_from_when_the_claim_was_asked_for() -> None:
    """The lease runs from the store's write; counted from its answer, up to a second later, a send
    went out with less of the lease left than a request may take to land, and another worker could
    take the event over and send meanwhile. Here 2.5 s of lease, 0.4 s a request may take, the
    answer 1 s late, the send 1.2 s after it: 0.3 s left, so the claim is renewed first."""
    store = _AnswersLate(late_s=1.0)
    pipeline, gate = _pipeline(store, _SendsAfter(1.2), Recorder(), **_SHORT_LEASE)
    await asyncio.wait_for(pipeline.process(job(STARTED)), 10)
    await gate.close()
    assert store.extends == 1


async def test_the_warning_of_an_event_not_applied_says_why() -> None:
    """It said status, attempts and HTTP status; the API's code and words were in the outcome
    only, so an operator reading the log could not tell a bad ticket from a bad mapping."""
    pipeline, gate = _pipeline(MemoryStore(), _Answers("rejected"), Recorder())
    with capture_logs() as logs:
        await pipeline.process(job(STARTED))
    await gate.close()
    [line] = [e for e in logs if e["event"] == "event_not_applied"]
    assert (line["log_level"], line["error_code"], line["detail"]) == ("warning", "GOM.00001005", "pending")


async def test_a_rejected_events_record_is_written_before_its_outcome() -> None:
    """The done-record of a rejected event was written after its outcome: when the store was away
    then and the job was cancelled (a revoke), the message came back to a claim of its own, was sent
    again and got a second, different outcome that did not say ``redelivered``. Now nothing is
    published before the record: the message comes back to nothing published, and gets one outcome."""
    store, published = _StoreAway(), Recorder()
    store.away = True
    first, gate = _pipeline(store, _Answers("rejected"), published, **_SHORT_LEASE)
    running = asyncio.create_task(first.process(job(STARTED)))
    await until(lambda: not gate.is_open)  # the record could not be written: paused
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await gate.close()
    assert published.outcomes == []
    store.away = False
    # the ticket was fixed meanwhile; the cancelled job's claim is taken over once its lease is out
    again, gate = _pipeline(store, _Answers("applied"), published, **_SHORT_LEASE)
    await again.process(job(STARTED))
    await gate.close()
    assert [(o["status"], o["redelivered"]) for o in published.outcomes] == [("applied", False)]


async def test_a_redelivered_rejected_event_repeats_its_outcome_and_its_dead_letter() -> None:
    """The record is written first, so a crash before the publish leaves a record and nothing on
    the topics: the redelivery repeats the outcome and writes the dead letter (both marked
    redelivered), and never calls the API again."""
    store, published = MemoryStore(), Recorder(refuse_outcomes=1)
    answers = _Answers("rejected")
    first, gate = _pipeline(store, answers, published)
    running = asyncio.create_task(first.process(job(STARTED)))
    await until(lambda: not gate.is_open)  # the record is in; the publish failed: paused
    running.cancel()  # the crash
    await asyncio.gather(running, return_exceptions=True)
    await gate.close()
    again, gate = _pipeline(store, answers, published)
    await again.process(job(STARTED))
    await gate.close()
    assert answers.calls == 1
    assert [(o["status"], o["redelivered"], o["error_code"]) for o in published.outcomes] == [
        ("rejected", True, "GOM.00001005")
    ]
    # The letter carries the API's answer as the first one did (a DLQ consumer reads it there).
    assert [
        (d.status, d.redelivered, d.detail, d.http_status, d.error_code) for d in published.letters[-1:]
    ] == [("rejected", True, "pending", 400, "GOM.00001005")]


@pytest.mark.parametrize("second", ["applied", "rejected"])
async def test_a_refused_message_read_again_after_a_retry_of_its_event_repeats_its_own_outcome(
    second: str, store: DedupStore
) -> None:
    """A refused event's record stood under its event_id only, and the next message of that
    event_id (its dead letter replayed, a producer's retry) replaced it. The first message, read
    again after that (a crash while an earlier offset kept its own uncommitted), took the other's
    record for its own: a ``duplicate`` of the retry when that was applied, a second send when it
    was refused too. It now repeats its own outcome, and the retry's record stays."""
    published = Recorder()
    answers = _Answers("rejected")
    pipeline, gate = _pipeline(store, answers, published)
    try:
        await pipeline.process(job(STARTED, offset=7))
        answers.status = second
        await pipeline.process(job(STARTED, offset=8))  # e.g. `coc-worker dlq replay`
        await pipeline.process(job(STARTED, offset=7))  # read again
        await pipeline.process(job(STARTED, offset=8))  # and the retry, read again
        record = await store.claim("ev-1", "w9", "in/0/9", 60.0, event_target(job(STARTED).event), "t")
    finally:
        await gate.close()
    assert answers.calls == 2
    assert [(o["status"], o["source"]["offset"], o["redelivered"]) for o in published.outcomes] == [
        ("rejected", 7, False),
        (second, 8, False),
        ("rejected", 7, True),
        (second, 8, True),
    ]
    first, _, repeat, _ = published.outcomes
    for name in ("reason", "error_code", "error_msg", "http_status", "attempts", "request"):
        assert repeat[name] == first[name], name
    assert [(d.offset, d.redelivered) for d in published.letters] == (
        [(7, False), (7, True)] if second == "applied" else [(7, False), (8, False), (7, True), (8, True)]
    )
    assert (record.kind, record.record.source if record.record else None) == (
        (ClaimKind.APPLIED, "in/0/8") if second == "applied" else (ClaimKind.NEW, "in/0/8")
    )


class _TakenOverWhileLookingUp(MemoryStore):
    """While the worker looks up a message's position, its claim of the event runs out and another
    worker (w2) takes the event over: what a lookup that waits out the lease (a pause) allows."""

    armed = False

    async def claim(self, event_id: str, owner: str, source: str, lease_s: float, *args: Any) -> Claim:
        if self.armed and event_id.startswith("@"):
            self.armed = False
            target = event_target(job(STARTED).event)
            self._put(
                "ev-1",
                DedupRecord(
                    "claimed", "w2/x", "in/0/9", lease_until=time.time() + 60, target=target, token="t2"
                ),
                60,
            )
        return await super().claim(event_id, owner, source, lease_s, *args)


async def test_a_record_given_back_never_replaces_a_claim_taken_over_meanwhile() -> None:
    """The first message, read again after a refused retry, puts the retry's record back over its
    own claim once it has found its outcome by position; written without a look, it replaced the
    claim of a worker that had taken the event over meanwhile, which then lost it and sent again."""
    store, published = _TakenOverWhileLookingUp(), Recorder()
    pipeline, gate = _pipeline(store, _Answers("rejected"), published)
    try:
        await pipeline.process(job(STARTED, offset=7))
        await pipeline.process(job(STARTED, offset=8))
        store.armed = True
        await pipeline.process(job(STARTED, offset=7))  # read again
    finally:
        await gate.close()
    assert [(o["source"]["offset"], o["redelivered"]) for o in published.outcomes][-1] == (7, True)
    record = store._get("ev-1")
    assert record is not None
    assert (record.state, record.owner) == ("claimed", "w2/x")  # the other worker's, untouched


class _ClaimAnswerLost(MemoryStore):
    """A store whose next claim of ``lose`` is written and its answer lost, as a Redis call that
    timed out on its way back after it ran: the pipeline asks again with the same token."""

    lose: str | None = None

    async def claim(self, event_id: str, *args: Any, **kwargs: Any) -> Claim:
        answer = await super().claim(event_id, *args, **kwargs)
        if event_id == self.lose:
            self.lose = None
            raise DedupUnavailable("redis dedup store unreachable: TimeoutError (the claim ran)")
        return answer


@contextlib.asynccontextmanager
async def refused_then_failed_elsewhere(
    store: DedupStore,
) -> AsyncIterator[tuple[Pipeline, _Answers, Recorder]]:
    """A pipeline on ``store`` after message 7 of event ev-1 was refused, then message 8 of the
    same event failed: 8's record stands under the event_id, 7's outcome under its position."""
    published, answers = Recorder(), _Answers("rejected")
    pipeline, gate = _pipeline(store, answers, published)
    try:
        await pipeline.process(job(STARTED, offset=7))
        answers.status = "failed"
        await pipeline.process(job(STARTED, offset=8))
        yield pipeline, answers, published
    finally:
        await gate.close()


def assert_own_outcome_repeated(answers: _Answers, published: Recorder) -> None:
    """Message 7, read again after ``refused_then_failed_elsewhere``, was not sent again: it
    repeated its own outcome."""
    assert answers.calls == 2
    assert [(o["status"], o["source"]["offset"], o["redelivered"]) for o in published.outcomes] == [
        ("rejected", 7, False),
        ("failed", 8, False),
        ("rejected", 7, True),
    ]


async def test_a_message_read_again_whose_claims_answer_was_lost_repeats_its_own_outcome() -> None:
    """Message 7 was refused, message 8 of its event_id failed; 7 read again must repeat its own
    outcome (kept by position), not be sent. Its claim replaced 8's record and the answer was lost;
    asked again, the claim found our own claim and answered "taken over", which hid 8's record:
    the position was never looked at, and 7 was sent again and had a second outcome."""
    store = _ClaimAnswerLost()
    async with refused_then_failed_elsewhere(store) as (pipeline, answers, published):
        store.lose = "ev-1"
        await asyncio.wait_for(pipeline.process(job(STARTED, offset=7)), 10)  # read again
    assert_own_outcome_repeated(answers, published)
    record = store._get("ev-1")
    assert record is not None
    assert (record.state, record.source, record.status) == ("done", "in/0/8", "failed")  # given back


class _ClaimQueued(MemoryStore):
    """A store whose claims of ``queue`` are written, then answered only once ``answer`` is set, as
    sqlite's claims queued for a group commit: a caller cancelled meanwhile never hears of it."""

    queue: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.written, self.answer = asyncio.Event(), asyncio.Event()

    async def claim(self, event_id: str, *args: Any, **kwargs: Any) -> Claim:
        answer = await super().claim(event_id, *args, **kwargs)
        if event_id == self.queue:
            self.written.set()
            await self.answer.wait()
        return answer


async def test_a_message_read_again_after_its_job_was_cancelled_in_its_claim_repeats_its_own_outcome() -> (
    None
):
    """As above, but message 7's job (read again) was cancelled while its claim was queued (a
    revoke): the claim was written over 8's record all the same, and the job's hand-on let it run
    out. The next reading took our own claim over and sent 7 again, never looking at 7's position.
    It sees through a claim of its own message to what that claim replaced now."""
    store = _ClaimQueued()
    async with refused_then_failed_elsewhere(store) as (pipeline, answers, published):
        store.queue = "ev-1"
        cancelled = asyncio.create_task(pipeline.process(job(STARTED, offset=7)))
        await asyncio.wait_for(store.written.wait(), 10)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        store.queue = None
        store.answer.set()
        await asyncio.wait_for(pipeline.process(job(STARTED, offset=7)), 10)  # read again
    assert_own_outcome_repeated(answers, published)


class _TakenOverBeforeTheRecord(MemoryStore):
    """While the worker finishes an event it could not apply, its claim runs out and another
    worker (w2) takes the event over: what a done-record that waits out the lease (a pause) meets."""

    async def mark_done(self, key: str, record: Any, ttl_s: float, **claim: str) -> Any:
        if key == "ev-1":
            taker = DedupRecord(
                "claimed", "w2/x", "in/0/9", lease_until=time.time() + 60, target=record.target, token="t2"
            )
            self._put(key, taker, 60)
        return await super().mark_done(key, record, ttl_s, **claim)


async def test_a_done_record_leaves_the_claim_of_a_worker_that_took_the_event_over() -> None:
    """The late worker's done-record replaced the other worker's live claim: the event's next
    message was claimed as new while that worker was sending. The claim stays now; the late job
    ends as it did, with its own outcome (and its record by position), without a pause."""
    store, published = _TakenOverBeforeTheRecord(), Recorder()
    pipeline, gate = _pipeline(store, _Answers("rejected"), published)
    try:
        with capture_logs() as logs:
            await asyncio.wait_for(pipeline.process(job(STARTED)), 10)
        assert gate.is_open
    finally:
        await gate.close()
    assert [(o["status"], o["redelivered"]) for o in published.outcomes] == [("rejected", False)]
    record = store._get("ev-1")
    assert record is not None
    assert (record.state, record.owner, record.token) == ("claimed", "w2/x", "t2")
    assert store._get("@in/0/7") is not None  # its outcome, by position
    [line] = [e for e in logs if e["event"] == "dedup_record_left_to_claim"]
    assert (line["key"], line["holder"]) == ("ev-1", "w2/x")


async def test_a_redis_key_of_another_type_fails_its_job_without_pausing_the_worker(redis_url: str) -> None:
    """A hash under the event's key (WRONGTYPE in the claim script) counted as the store away: the
    worker paused, the probe (another key) passed, the gate reopened, and the same claim paused it
    again, without end, every other job waiting at the gate. The job fails now, with the server's
    words, and the gate never closes."""
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    await store._client.hset(store._key("ev-1"), "x", "1")
    published = Recorder()
    pipeline, gate = _pipeline(store, _Answers("applied"), published)
    try:
        await asyncio.wait_for(pipeline.process(job(STARTED)), 10)
        assert gate.is_open
    finally:
        await gate.close()
        await store.close()
    [outcome] = published.outcomes
    assert (outcome["status"], outcome["reason"]) == ("failed", "internal_error")
    assert "WRONGTYPE" in outcome["error_msg"]


async def test_a_retry_of_a_refused_event_is_sent_and_leaves_no_claim_at_its_position() -> None:
    """The retry's own position is looked at (it may be a message read again) and given back when
    empty: a claim left there would make the message's next reading wait out its lease."""
    store, published = MemoryStore(), Recorder()
    answers = _Answers("rejected")
    pipeline, gate = _pipeline(store, answers, published)
    try:
        await pipeline.process(job(STARTED, offset=7))
        answers.status = "applied"
        await pipeline.process(job(STARTED, offset=8))
    finally:
        await gate.close()
    assert answers.calls == 2
    assert [o["status"] for o in published.outcomes] == ["rejected", "applied"]
    assert store._get("@in/0/8") is None
    assert store._get("@in/0/7") is not None  # the refusal, by position


class _EchoesTheSecret(_Answers):
    """An API that answers a refusal with the caller's secret key as its error code."""

    async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
        await kwargs["before_send"]()
        return ApplyResult("rejected", 1, http_status=400, error_code=SK, error_msg="refused")


async def _the_outcome(caller: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """The one outcome of ``raw`` through a pipeline around ``caller``, with ``SK`` a known secret."""
    register_secrets([SK])
    published = Recorder()
    pipeline, gate = _pipeline(MemoryStore(), caller, published)
    try:
        await pipeline.process(job(raw))
    finally:
        await gate.close()
    [outcome] = published.outcomes
    return outcome


async def test_an_error_code_that_echoes_a_secret_is_redacted_in_the_outcome() -> None:
    """``error_code`` is the API's text, checked only against a format (letters, digits, ``._-``)
    that a secret key matches too: it reached the outcome event as it came."""
    outcome = await _the_outcome(_EchoesTheSecret("rejected"), STARTED)
    assert outcome["status"] == "rejected"
    assert SK not in json.dumps(outcome)
    assert outcome["error_code"] == REDACTED


async def test_the_dead_letter_carries_the_apis_status_and_its_redacted_code() -> None:
    """``coc-dlq-http-status`` and ``coc-dlq-error-code`` come from the same answer as the
    outcome's, the code redacted as there: the API's text may echo a secret."""
    register_secrets([SK])
    published = Recorder()
    pipeline, gate = _pipeline(MemoryStore(), _EchoesTheSecret("rejected"), published)
    try:
        await pipeline.process(job(STARTED))
    finally:
        await gate.close()
    [letter] = published.letters
    assert (letter.http_status, letter.error_code) == (400, REDACTED)


def succeeded_with(comment: str, ticket_id: str = "CM1") -> dict[str, Any]:
    """A change.succeeded event whose comment, the producer's text, the outcome echoes."""
    return {
        "event_id": "ev-s",
        "type": "change.succeeded",
        "ticket_id": ticket_id,
        "sub_ticket_id": "s-1",
        "result": {"comment": comment},
    }


async def test_a_secret_quoted_in_the_events_own_text_is_redacted_in_the_outcome() -> None:
    """The outcome echoes the request, whose comment is the producer's text: a secret quoted there
    (a pipeline's log pasted into the comment) went to the results topic as it was."""
    outcome = await _the_outcome(_Answers("applied"), succeeded_with(f"deployed with key {SK}"))
    assert outcome["status"] == "applied"
    assert SK not in json.dumps(outcome)
    assert REDACTED in json.dumps(outcome["request"])


async def test_a_non_ascii_secret_with_a_quote_is_redacted_in_the_outcome() -> None:
    """The outcome's serialiser writes non-ASCII as it is and escapes a quote: a secret with both
    (a password chosen by a person) matched none of the forms the redactor knew, and a comment
    quoting it went to the results topic as it was."""
    secret = 'Grüße"Kafka-2024'
    register_secrets([secret])
    outcome = await _the_outcome(_Answers("applied"), succeeded_with(f"deployed with pw {secret}"))
    assert outcome["request"]["sub_tickets"][0]["comment"] == f"deployed with pw {REDACTED}"


async def test_a_secret_used_as_a_ticket_id_is_kept_out_of_the_outcome_and_its_key() -> None:
    """A secret key has the shape of an id (letters and digits), so a producer that put one in
    ``ticket_id`` by mistake had it written to the results topic, in the outcome and as its key."""
    register_secrets([SK])
    secret = "sk1234567890abcdefghij1234567890ABCDEFGH"
    register_secrets([secret])
    published = Recorder()
    pipeline, gate = _pipeline(MemoryStore(), _Answers("applied"), published)
    try:
        await pipeline.process(job({**STARTED, "ticket_id": secret}))  # valid: sent, then applied
        raw = json.dumps({"event_id": "ev-x", "ticket_id": secret}).encode()  # invalid: no type
        _, invalid, salvaged = decode_or_salvage(raw, 1 << 20)
        message = Message("in", 0, 8, None, raw, [], 0)
        await pipeline.process(
            Job(message, None, invalid, from_headers([]), datetime.now(UTC), time.monotonic(), salvaged)
        )
    finally:
        await gate.close()
    assert [o["status"] for o in published.outcomes] == ["applied", "invalid"]
    assert [o["ticket_id"] for o in published.outcomes] == [REDACTED, REDACTED]
    assert published.keys == [REDACTED.encode()] * 2
    assert secret not in json.dumps(published.outcomes, default=str)
    # The documented key allows it: the AsyncAPI key binding refused this key, a consumer's
    # contract check with it would have refused the record.
    key_schema = asyncapi_document()["components"]["messages"]["OutcomeEvent"]["bindings"]["kafka"]["key"]
    assert all(re.match(key_schema["pattern"], key.decode()) for key in published.keys if key)


async def test_an_id_that_merely_contains_a_short_registered_value_is_kept() -> None:
    """Only an id holding a secret of 8 characters or more is replaced, and whole: a short access
    key of a test set-up turned a ticket holding it ("CMZq9x7001") into "CM**redacted**001", its
    outcome's key with it, while the comment quoting the SK still had to be scrubbed."""
    register_secrets(["Zq9x7", SK])  # no other test's text holds it: the registry is per process
    outcome = await _the_outcome(_Answers("applied"), succeeded_with(SK, ticket_id="CMZq9x7001"))
    assert outcome["ticket_id"] == "CMZq9x7001"
    assert outcome["request"]["sub_tickets"][0]["comment"] == REDACTED


async def test_each_jobs_log_lines_carry_its_message_and_event(rig: Rig) -> None:
    """Every line a job logs names its message and event (``logs.bind_message_context``), also in
    jobs running at the same time, and a line's own value of a key is kept."""
    out = io.StringIO()
    configure("DEBUG", "json", out)
    second = {**STARTED, "event_id": "ev-2", "ticket_id": "CM2", "sub_ticket_id": "s-2"}
    await asyncio.gather(
        asyncio.create_task(rig.pipeline.process(job(STARTED, offset=7))),
        asyncio.create_task(rig.pipeline.process(job(second, offset=8))),
    )
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    applied = {line["event_id"]: line for line in lines if line["event"] == "event_applied"}
    assert {k: applied["ev-1"][k] for k in ("topic", "partition", "offset", "ticket_id")} == {
        "topic": "in",
        "partition": 0,
        "offset": 7,
        "ticket_id": "CM1",
    }
    assert (applied["ev-2"]["offset"], applied["ev-2"]["ticket_id"]) == (8, "CM2")
    log = get_logger("test")
    bind_message_context({"offset": 1, "ticket_id": "CM9"})
    log.info("own_value", offset=2)
    last = json.loads(out.getvalue().splitlines()[-1])
    assert (last["offset"], last["ticket_id"]) == (2, "CM9")


async def test_an_invalid_messages_log_lines_name_what_it_still_tells(rig: Rig) -> None:
    """Its outcome and dead letter named the ticket and event id salvaged from the value, its log
    lines null (on-call review): an operator could not find the line for the dead letter."""
    out = io.StringIO()
    configure("DEBUG", "json", out)
    raw = b'{"event_id": "inv-1", "ticket_id": "CM7", "type": "change.started"}'  # no sub_ticket_id
    event, invalid, salvaged = decode_or_salvage(raw, 1 << 20, key=b"CM7")
    assert event is None
    message = Message("in", 0, 3, b"CM7", raw, [], 0)
    await rig.pipeline.process(
        Job(message, None, invalid, from_headers([]), datetime.now(UTC), time.monotonic(), salvaged)
    )
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    [line] = [line for line in lines if line["event"] == "event_invalid"]
    assert (line["event_id"], line["ticket_id"], line["offset"]) == ("inv-1", "CM7", 3)


async def test_two_processes_with_one_worker_id_do_not_both_send_the_change() -> None:
    """A claim of the same owner is taken for a cancelled job of one's own and taken over at once.
    Two processes given one COC_WORKER_WORKER_ID (or one restarted while its request may still
    land) each did that with the other's live claim, and both sent the change."""
    answers: list[ClaimKind] = []

    class Recording(MemoryStore):
        async def claim(
            self, event_id: str, owner: str, source: str, lease_s: float, target: str = "", token: str = ""
        ) -> Claim:
            answer = await super().claim(event_id, owner, source, lease_s, target, token)
            answers.append(answer.kind)
            return answer

    store, published = Recording(), Recorder()
    release = asyncio.Event()

    class Slow(_Answers):
        async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
            await release.wait()
            return await super().apply(ticket_id, payload, **kwargs)

    first_caller, second_caller = Slow("applied"), _Answers("applied")
    first, first_gate = _pipeline(store, first_caller, published)
    second, second_gate = _pipeline(store, second_caller, published)  # the same worker_id, "w1"
    try:
        sending = asyncio.create_task(first.process(job(STARTED)))
        await until(lambda: answers == [ClaimKind.NEW])
        again = asyncio.create_task(second.process(job(STARTED)))  # the same message, redelivered
        await until(lambda: len(answers) == 2)
        assert answers[1] is ClaimKind.HELD  # was NEW, taken over as its own
        assert second_caller.calls == 0
        release.set()
        await asyncio.wait_for(asyncio.gather(sending, again), 10)
    finally:
        await first_gate.close()
        await second_gate.close()
    assert (first_caller.calls, second_caller.calls) == (1, 0)
    assert [o["redelivered"] for o in published.outcomes] == [False, True]


class _Blocks(_CallerStandIn):
    """An ApiCaller stand-in that blocks (until cancelled or ``go`` is set), before its send or
    just after it (``sent``: then a cancelled job's claim is expired, not deleted)."""

    def __init__(self, sent: bool) -> None:
        self.sent_first, self.go, self.calls = sent, asyncio.Event(), 0

    async def apply(self, ticket_id: str, payload: bytes, **kwargs: Any) -> ApplyResult:
        self.calls += 1
        if self.sent_first:
            await kwargs["before_send"]()
        await self.go.wait()
        if not self.sent_first:
            await kwargs["before_send"]()
        return ApplyResult("applied", 1, http_status=200)


class _LateHandOns(MemoryStore):
    """A store whose releases and renewals at lease 0 (``Pipeline._let_go``'s) land only once
    ``land`` is set, whether their caller still waits or not, as Redis runs a command already
    sent after its client gave up. Records the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.land = asyncio.Event()
        self.claimed: list[str] = []
        self.handed_on: list[tuple[str, str]] = []  # (release or extend, token)
        self.landed: list[asyncio.Task[Any]] = []

    async def claim(
        self, event_id: str, owner: str, source: str, lease_s: float, target: str = "", token: str = ""
    ) -> Claim:
        self.claimed.append(token)
        return await super().claim(event_id, owner, source, lease_s, target, token)

    async def _late(self, call: Any) -> Any:
        landing = asyncio.create_task(self._after_land(call))
        self.landed.append(landing)
        return await asyncio.shield(landing)

    async def _after_land(self, call: Any) -> Any:
        await self.land.wait()
        return await call()

    async def release(self, event_id: str, owner: str, token: str = "") -> None:
        self.handed_on.append(("release", token))
        await self._late(lambda: MemoryStore.release(self, event_id, owner, token))

    async def extend(self, event_id: str, owner: str, lease_s: float, token: str = "") -> bool:
        if lease_s:  # a renewal before a send
            return await super().extend(event_id, owner, lease_s, token)
        self.handed_on.append(("extend", token))
        return bool(await self._late(lambda: MemoryStore.extend(self, event_id, owner, lease_s, token)))


@pytest.mark.parametrize("sent", [False, True], ids=["released", "expired"])
async def test_a_late_hand_on_of_a_cancelled_jobs_claim_leaves_the_claim_of_its_redelivery_alone(
    monkeypatch: pytest.MonkeyPatch, sent: bool
) -> None:
    """A cancelled job hands its claim on (deleted when nothing was sent, expired otherwise); the
    store does not answer within the bound, and the call lands later all the same, after the
    message came back to this worker and was claimed again (our own claim: taken over at once).
    It deleted or expired that new claim, and another worker could take the event and send the
    change while the redelivery sent it too. The hand-on names its claim's token now."""
    monkeypatch.setattr("worker.pipeline._LET_GO_TIMEOUT_S", 0.05)
    store, published, caller = _LateHandOns(), Recorder(), _Blocks(sent)
    pipeline, gate = _pipeline(store, caller, published)
    try:
        first = asyncio.create_task(pipeline.process(job(STARTED)))
        await until(lambda: caller.calls == 1, what="the first job in its call")
        with capture_logs() as logs:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        assert "claim_kept" in [e["event"] for e in logs]  # the store did not answer in time
        redelivered = asyncio.create_task(pipeline.process(job(STARTED)))
        await until(lambda: caller.calls == 2, what="the redelivery in its call")
        store.land.set()
        await asyncio.gather(*store.landed)

        first_token, second_token = store.claimed
        assert first_token != second_token
        assert store.handed_on == [("extend" if sent else "release", first_token)]
        held = await store.claim("ev-1", "w9", "in/0/7", 30)
        assert held.kind is ClaimKind.HELD  # another worker must not take it: the redelivery sends
        assert held.record is not None
        assert held.record.token == second_token
        caller.go.set()
        await asyncio.wait_for(redelivered, 10)
    finally:
        await gate.close()
    assert [o["status"] for o in published.outcomes] == ["applied"]


class _SlowHandOn(MemoryStore):
    """A store whose release (``Pipeline._let_go``'s, its job's change unsent) waits for
    ``answer``; cancelled meanwhile, it does nothing (a Redis call cut before it was sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.releasing, self.answer = asyncio.Event(), asyncio.Event()

    async def release(self, event_id: str, owner: str, token: str = "") -> None:
        self.releasing.set()
        await self.answer.wait()
        await super().release(event_id, owner, token)


async def test_a_claim_is_still_handed_on_when_its_job_is_cancelled_again_meanwhile() -> None:
    """A revoke cancels a job, which begins to hand its claim on; a stop then cancels it again (the
    lanes cancel what is still running). The second cancellation cut the store call, and the claim
    stayed for its whole lease. The hand-on goes on now; the job ends at once all the same."""
    store, published, caller = _SlowHandOn(), Recorder(), _Blocks(sent=False)
    pipeline, gate = _pipeline(store, caller, published)
    try:
        running = asyncio.create_task(pipeline.process(job(STARTED)))
        await until(lambda: caller.calls == 1, what="the job in its call")
        running.cancel()  # the revoke's
        await asyncio.wait_for(store.releasing.wait(), 10)
        running.cancel()  # the stop's
        await asyncio.gather(running, return_exceptions=True)
        assert running.cancelled()
        assert store._get("ev-1") is not None  # its hand-on still waits for the store
        store.answer.set()
        await asyncio.wait_for(pipeline.handed_on(), 5)
    finally:
        await gate.close()
    assert store._get("ev-1") is None
    assert published.outcomes == []


class _ClaimAnswersOnlyOnce(MemoryStore):
    """A store whose claim is written and then answers only once ``answer`` is set (a slow
    store): a job cancelled meanwhile does not know it holds the claim."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.answer = asyncio.Event(), asyncio.Event()

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        answer = await super().claim(*args, **kwargs)
        self.written.set()
        await self.answer.wait()
        return answer


async def test_an_invalid_message_cancelled_while_its_claim_is_written_hands_the_claim_on() -> None:
    """The outcome of an invalid message (or a duplicate) is kept under the message's position;
    its job, cancelled while that claim was being written, left it for its whole lease (30 s):
    the message's next owner waited that long before it could publish the outcome."""
    store, published = _ClaimAnswersOnlyOnce(), Recorder()
    pipeline, gate = _pipeline(store, _Answers("applied"), published)
    try:
        running = asyncio.create_task(pipeline.process(invalid_job()))
        await asyncio.wait_for(store.written.wait(), 10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    finally:
        await gate.close()
    store.answer.set()
    taken = await store.claim("@in/0/9", "w9", "in/0/9", 30)
    assert (taken.kind, taken.taken_over) == (ClaimKind.NEW, True)  # expired, not left to its lease
    assert published.outcomes == []


@pytest.mark.parametrize("beneath", ["two of this message", "another message's"])
async def test_a_message_read_again_looks_beneath_unfinished_claims_to_its_events_record(
    beneath: str,
) -> None:
    """Message 7 was refused, message 8 of the same event then failed; unfinished claims were left
    over message 8's record (two of message 7's, interrupted readings; or another message's, a
    replay that crashed). Message 7 read again looked only one claim of its own deep: it missed
    message 8's record, skipped its position, was sent again and published a second outcome."""
    store = MemoryStore()
    async with refused_then_failed_elsewhere(store) as (pipeline, answers, published):
        done = store._get("ev-1")
        assert done is not None
        assert (done.state, done.source) == ("done", "in/0/8")
        past = time.time() - 100
        source = "in/0/7" if beneath == "two of this message" else "in/0/9"
        left = DedupRecord(
            "claimed", "w2/x", source, lease_until=past, target=done.target, token="t1", replaced=done
        )
        if beneath == "two of this message":
            left = DedupRecord(
                "claimed", "w3/y", "in/0/7", lease_until=past, target=done.target, token="t2", replaced=left
            )
        store._put("ev-1", left, 600)
        await asyncio.wait_for(pipeline.process(job(STARTED, offset=7)), 10)
    assert_own_outcome_repeated(answers, published)
