"""The worker's promises, against the real broker, the simulator and the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer import message_accumulator
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from conftest import SettingsFactory, running_worker
from faults.harness import ProxiedBroker
from faults.proxy import CutMode
from helpers import event, read_json, read_records, send
from waiting import until

from schemas.outcomes import OutcomeStatus
from worker.app import Worker
from worker.dedup import ClaimKind, open_store
from worker.kafka_config import record_limit_bytes
from worker.sandbox import TansuBroker, committed_offsets, create_topics, free_port, produce, read_topic
from worker.simulator import SimulatorServer


def ticket_script(ticket: str, subs: int = 2) -> list[dict]:
    """A plausible life of one ticket: each sub-ticket started, ended and given a result."""
    events = []
    for n in range(subs):
        sub = f"{ticket}-s{n}"
        events += [
            event("change.started", ticket, sub),
            event("change.ended", ticket, sub),
            event("change.succeeded", ticket, sub, result={"comment": "ok"})
            if n % 2 == 0
            else event("change.failed", ticket, sub, result={"comment": "bad", "is_monitor_found": True}),
        ]
    return events


async def test_per_ticket_order_under_concurrency(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """40 tickets x 6 ordered events, random API latency: each ticket's events apply in order."""
    simulator.state.set_faults(latency_ms=1, latency_jitter_ms=15)
    scripts = {f"CM{n:04d}": ticket_script(f"CM{n:04d}") for n in range(40)}
    # interleave tickets randomly while keeping each ticket's own order
    rng = random.Random(7)
    queues = {t: list(evs) for t, evs in scripts.items()}
    stream = []
    while queues:
        ticket = rng.choice(sorted(queues))
        stream.append(queues[ticket].pop(0))
        if not queues[ticket]:
            del queues[ticket]
    # Requests the simulator is serving at once, seen as each one is answered: counted on arrival
    # (``arrived``), recorded once answered (``requests_total``); a sequential worker shows 1.
    state = simulator.state
    overlapping: list[int] = []
    record_request = state.record_request

    def answered(*args: Any, **kwargs: Any) -> None:
        overlapping.append(state.arrived - state.stats()["requests_total"])
        record_request(*args, **kwargs)

    state.record_request = answered  # type: ignore[method-assign]
    async with running_worker(make_settings(max_in_flight=32)) as worker:
        await send(broker.bootstrap, topics["input"], stream)
        outcomes = await read_json(broker.bootstrap, topics["results"], len(stream), timeout_s=60)
        assert worker.metrics.api_latency_by_method["PUT"].sum > 0  # API calls were really made
    del state.record_request
    assert len(outcomes) == len(stream)
    assert {o["status"] for o in outcomes} == {"applied"}
    applied = defaultdict(list)
    for entry in simulator.state.applied_log:
        applied[entry["ticket_id"]].append(entry["event_id"])
    for ticket, events in scripts.items():
        assert applied[ticket] == [e["event_id"] for e in events], ticket
    # concurrency really happened: API calls overlapped (another request was being served when
    # one was answered)
    assert len(overlapping) >= len(stream)
    assert max(overlapping) > 1, max(overlapping)


async def test_duplicates_are_applied_once_before_and_after_a_restart(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    first = event("ticket.update", "CM-DUP", None, event_id="dup-1", ticket_info={"work_flow_status": "x"})
    settings = make_settings()
    async with running_worker(settings):
        await send(broker.bootstrap, topics["input"], [first, first])
        outcomes = await read_json(broker.bootstrap, topics["results"], 2)
    assert [o["status"] for o in outcomes] == ["applied", "duplicate"]
    assert outcomes[1]["attempts"] == 0
    async with running_worker(settings):  # same dedup store (sqlite file), new process state
        await send(broker.bootstrap, topics["input"], [first])
        outcomes = await read_json(broker.bootstrap, topics["results"], 3)
    assert [o["status"] for o in outcomes] == ["applied", "duplicate", "duplicate"]
    assert len(simulator.state.applied_for("dup-1")) == 1


async def test_redis_dedup_is_shared(
    broker: TansuBroker,
    topics: dict[str, str],
    simulator: SimulatorServer,
    make_settings: SettingsFactory,
    redis_url: str,
) -> None:
    ev = event("change.started", "CM-R", "s1", event_id="redis-1")
    async with running_worker(make_settings(dedup_url=redis_url, worker_id="w-a")):
        await send(broker.bootstrap, topics["input"], [ev])
        await read_json(broker.bootstrap, topics["results"], 1)
    # the applied record is the event's last one (no done-record follows), with its outcome: asked
    # as another worker would (a claim that finds a record writes nothing)
    store = open_store(redis_url)
    try:
        found = await store.claim("redis-1", "w-other", "t/0/999", lease_s=30)
    finally:
        await store.close()
    assert found.kind is ClaimKind.APPLIED
    assert found.record is not None
    assert (found.record.status, found.record.owner) == ("applied", "w-a")
    async with running_worker(make_settings(dedup_url=redis_url, worker_id="w-b", group_id="other-group")):
        outcomes = await read_json(broker.bootstrap, topics["results"], 2)
    # the second group re-reads the topic from the start: the event is a redelivery of the same
    # message, so its outcome is repeated, not re-applied
    assert [o["status"] for o in outcomes] == ["applied", "applied"]
    assert outcomes[1]["redelivered"] is True
    assert len(simulator.state.applied_for("redis-1")) == 1


async def test_bad_input_becomes_invalid_outcome_and_dead_letter(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    good = event("change.started", "CM-OK", "s1")
    bad_event = event("change.started", "CM-BAD", "s1")
    bad_event["ticket_id"] = "../../etc/passwd"
    inputs: list[dict | bytes] = [
        b"\xff\xfe not utf-8",
        b"{not json",
        json.dumps({"event_id": "x", "type": "change.started"}).encode(),  # missing fields
        bad_event,
        b'{"a": 1, "a": 2}',
        good,
    ]
    async with running_worker(make_settings()) as worker:
        await send(broker.bootstrap, topics["input"], inputs, headers=[("origin", b"test")])
        outcomes = await read_json(broker.bootstrap, topics["results"], len(inputs))
        dead = await read_records(broker.bootstrap, topics["dlq"], len(inputs) - 1)
        assert worker.ready
    by_offset = {(o["source"]["partition"], o["source"]["offset"]): o for o in outcomes}
    assert len(by_offset) == len(inputs)
    statuses = sorted(o["status"] for o in outcomes)
    assert statuses == ["applied"] + ["invalid"] * 5
    reasons = sorted(o["reason"] for o in outcomes if o["status"] == "invalid")
    assert reasons == ["bad_json", "bad_json", "not_utf8", "schema", "schema"]
    traversal = next(o for o in outcomes if o["event_id"] == bad_event["event_id"])
    assert traversal["ticket_id"] is None  # a hostile id never becomes an outcome field or key
    assert "$.ticket_id" in traversal["error_msg"]
    assert len(dead) == 5
    original = {bytes(v) if isinstance(v, bytes) else json.dumps(v).encode() for v in inputs[:5]}
    assert {r.value for r in dead} == original
    for record in dead:
        assert record.header("origin") == b"test"  # original headers kept
        assert record.header("coc-dlq-status") == b"invalid"
        assert record.header("coc-dlq-source-topic") == topics["input"].encode()
        assert record.header("coc-dlq-source-offset") is not None
        assert record.header("coc-dlq-at") is not None
        assert record.header("traceparent") is not None
    assert all("etc/passwd" not in r["path"] for r in simulator.state.request_dicts())


async def test_compressed_input_is_read_whatever_the_codec(
    broker: TansuBroker, topics: dict[str, str], make_settings: SettingsFactory
) -> None:
    """Producers compress their batches (Kafka's gzip, snappy, lz4, zstd); the worker reads them
    all through the real broker. That the image carries the codecs, which it lacked (but gzip),
    is test_dockerfile's check: this environment always had them."""
    codecs = ("gzip", "snappy", "lz4", "zstd")
    sent = {codec: event("change.started", f"CM-{codec.upper()}", "s1") for codec in codecs}
    async with running_worker(make_settings()):
        for codec, item in sent.items():
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, compression_type=codec)
            await producer.start()
            try:
                await producer.send_and_wait(
                    topics["input"], json.dumps(item).encode(), key=item["ticket_id"].encode()
                )
            finally:
                await producer.stop()
        outcomes = await read_json(broker.bootstrap, topics["results"], len(codecs))
    assert {o["event_id"]: o["status"] for o in outcomes} == {
        item["event_id"]: "applied" for item in sent.values()
    }


async def test_a_tombstone_without_a_key_is_dead_lettered_and_its_partition_moves_on(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """A record with neither key nor value (other clients than aiokafka may write one). Before, its
    dead letter was that same empty record, which the producer refuses with an AssertionError: the
    job raised out of the pipeline unseen, the offset was never finished, nothing behind it in the
    partition was committed again, and each restart published two more outcomes."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        batch.append(key=None, value=None, timestamp=None, headers=[])
        after = json.dumps(event("change.started", "CM-TOMB", "s1")).encode()
        batch.append(key=None, value=after, timestamp=None, headers=[])
        await (await producer.send_batch(batch, topics["input"], partition=0))
    finally:
        await producer.stop()
    settings = make_settings()
    async with running_worker(settings):
        outcomes = await read_json(broker.bootstrap, topics["results"], 2)
        [dead] = await read_records(broker.bootstrap, topics["dlq"], 1)

        async def committed_past_it() -> bool:
            return (await committed_offsets(broker.bootstrap, settings.group_id, topics["input"], 1))[0] >= 2

        await until(committed_past_it, timeout_s=20, every_s=0.1)
    assert sorted((o["status"], o["reason"]) for o in outcomes) == [("applied", None), ("invalid", "empty")]
    assert dead.value == b""
    assert dead.header("coc-dlq-tombstone") == b"true"
    assert dead.header("coc-dlq-reason") == b"empty"


class _NotUtf8Key(str):
    """A header key that aiokafka's (Python) record builder writes as bytes that are not UTF-8."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe-key"


async def test_a_record_the_client_cannot_read_is_dead_lettered_and_its_partition_moves_on(
    broker: TansuBroker,
    topics: dict[str, str],
    make_settings: SettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka decodes header keys as UTF-8 and raises on other bytes (a producer not bound to the
    protocol may write them). The error stopped the worker, and every restart met it again: the
    partition never moved past it, and the messages before it in the same fetch had no outcome.
    Three record batches: offsets 0-2 readable; 3 unreadable, and 4 after it in its batch (aiokafka
    cannot get past 3 to read it); 5, in a batch of its own, readable again."""
    values = [json.dumps(event("change.started", f"CM-RAW{n}", "s1")).encode() for n in range(6)]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for offsets in ((0, 1, 2), (3, 4), (5,)):
            with monkeypatch.context() as patched:
                patched.setattr(
                    message_accumulator, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy
                )
                batch = producer.create_batch()
                for n in offsets:
                    headers = [(_NotUtf8Key("k"), b"v")] if n == 3 else [("origin", b"test")]
                    batch.append(key=None, value=values[n], timestamp=None, headers=headers)
            await (await producer.send_batch(batch, topics["input"], partition=0))
    finally:
        await producer.stop()
    settings = make_settings()
    async with running_worker(settings) as worker:
        outcomes = await read_json(broker.bootstrap, topics["results"], 6)
        dead = await read_records(broker.bootstrap, topics["dlq"], 2)

        async def committed_past_it() -> bool:
            return (await committed_offsets(broker.bootstrap, settings.group_id, topics["input"], 1))[0] >= 6

        await until(committed_past_it, timeout_s=20, every_s=0.1)
        assert worker.ready
    by_offset = {o["source"]["offset"]: (o["status"], o["reason"]) for o in outcomes}
    unreadable = ("invalid", "unreadable")
    applied = ("applied", None)
    assert by_offset == {0: applied, 1: applied, 2: applied, 3: unreadable, 4: unreadable, 5: applied}
    assert sorted(int(d.header("coc-dlq-source-offset") or -1) for d in dead) == [3, 4]
    for letter in dead:
        assert letter.value == b""
        assert letter.header("coc-dlq-reason") == b"unreadable"
        assert letter.header("coc-dlq-tombstone") is None


async def test_a_dead_letter_too_big_even_cut_is_written_without_the_inputs_headers(
    broker: TansuBroker, topics: dict[str, str], make_settings: SettingsFactory
) -> None:
    """An invalid input whose own headers alone are over the producer's request limit: cutting its
    value is not enough, so the dead letter leaves those headers out (and says so). Before, every
    try failed, paused the worker as an outage and published the outcome again, for ever."""
    big_headers = [(f"h{i}", b"x" * 100_000) for i in range(12)]  # 1.2 MB, over the 1 MB limit
    await send(broker.bootstrap, topics["input"], [b"not json"], headers=big_headers)
    await send(broker.bootstrap, topics["input"], [event("change.started", "CM-AFTER", "s1")])
    async with running_worker(make_settings()) as worker:
        outcomes = await read_json(broker.bootstrap, topics["results"], 2)
        [dead] = await read_records(broker.bootstrap, topics["dlq"], 1)
        assert worker.ready
    assert sorted(o["status"] for o in outcomes) == ["applied", "invalid"]
    assert dead.value == b"not json"
    assert dead.header("coc-dlq-headers-dropped") == b"12"
    assert dead.header("coc-dlq-status") == b"invalid"
    assert dead.header("h0") is None
    assert worker.metrics.registry.get_sample_value(
        "coc_worker_pauses_total", {"kind": "broker_unavailable"}
    ) in (
        None,
        0.0,
    )


async def test_restart_mid_stream_loses_nothing_and_reapplies_nothing(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    simulator.state.set_faults(latency_ms=5, latency_jitter_ms=10)
    stream = [e for n in range(30) for e in ticket_script(f"CMR{n:03d}", subs=1)]
    settings = make_settings(max_in_flight=8)
    await send(broker.bootstrap, topics["input"], stream)
    async with running_worker(settings):
        await simulator.state.wait_for(lambda: len(simulator.state.applied_log) >= 30, 30)
    first_run = len(simulator.state.applied_log)
    assert first_run < len(stream), "the first run should stop mid-stream"
    async with running_worker(settings):
        outcomes = await read_json(broker.bootstrap, topics["results"], len(stream), timeout_s=60)
        await simulator.state.wait_for(lambda: len(simulator.state.applied_log) >= len(stream), 30)
    by_source = defaultdict(set)
    for o in outcomes:
        by_source[(o["source"]["partition"], o["source"]["offset"])].add(o["status"])
    assert len(by_source) == len(stream)  # every message has an outcome
    assert all(statuses == {"applied"} for statuses in by_source.values())
    event_ids = [entry["event_id"] for entry in simulator.state.applied_log]
    assert sorted(event_ids) == sorted(e["event_id"] for e in stream)  # each applied exactly once


async def test_two_workers_share_the_partitions(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    stream = [e for n in range(40) for e in ticket_script(f"CMT{n:03d}", subs=1)]
    async with (
        running_worker(make_settings(worker_id="w-one")) as one,
        running_worker(make_settings(worker_id="w-two"), assigned=False) as two,
    ):
        await until(
            lambda: bool(one.status()["assigned"]) and bool(two.status()["assigned"]),
            30,
            0.02,
            what="both to get partitions",
        )
        assert not set(one.status()["assigned"]) & set(two.status()["assigned"])
        await send(broker.bootstrap, topics["input"], stream)
        outcomes = await read_json(broker.bootstrap, topics["results"], len(stream), timeout_s=60)
    assert len(outcomes) == len(stream)
    assert len({(o["source"]["partition"], o["source"]["offset"]) for o in outcomes}) == len(stream)
    assert {o["worker"] for o in outcomes} == {"w-one", "w-two"}
    assert {o["status"] for o in outcomes} == {"applied"}
    assert len(simulator.state.applied_log) == len(stream)


async def test_revoked_credentials_pause_and_resume_without_rejecting(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    stream = [e for n in range(10) for e in ticket_script(f"CMA{n:03d}", subs=1)]
    async with running_worker(make_settings()) as worker:
        port = worker.http_port
        simulator.state.revoke(True)
        await send(broker.bootstrap, topics["input"], stream)
        await until(lambda: not worker.ready, 20, 0.02, what="the worker to pause")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 503
                assert "api_auth" in (await resp.json())["paused_by"]
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
                assert "coc_worker_paused 1.0" in text
        await simulator.state.wait_for(lambda: simulator.state.status_counts["401"] >= 3, 20)
        simulator.state.revoke(False)
        outcomes = await read_json(broker.bootstrap, topics["results"], len(stream), timeout_s=60)
        await until(lambda: worker.ready, 20, 0.02, what="the worker to resume")
    assert {o["status"] for o in outcomes} == {"applied"}
    assert len(simulator.state.applied_log) == len(stream)


async def test_a_server_error_storm_longer_than_the_retry_budget_pauses_and_fails_nothing(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """The API answers 503 to everything for longer than an event's retry budget: every event in
    flight failed (dead-lettered) and the tickets' later steps were refused after them. Now the
    worker pauses on ``api_failing`` and applies them all once the API works again."""
    stream = [e for n in range(10) for e in ticket_script(f"CMS{n:03d}", subs=1)]
    settings = make_settings(
        retry_max_elapsed_s=0.5,
        api_unreachable_threshold_s=0.3,
        api_connect_timeout_s=0.1,
        api_request_timeout_s=0.2,
        retry_after_max_s=0.5,
    )
    async with running_worker(settings) as worker:
        simulator.state.set_faults(error_ratio=1.0, error_statuses=[503])
        await send(broker.bootstrap, topics["input"], stream)
        await until(lambda: worker.status()["paused_by"] == ["api_failing"], 20, 0.02, what="the pause")
        await simulator.state.wait_for(lambda: simulator.state.status_counts["503"] >= 50, 20)
        assert worker.status()["paused_by"] == ["api_failing"]  # the probe fails too: still paused
        simulator.state.set_faults(error_ratio=0.0)
        outcomes = await read_json(broker.bootstrap, topics["results"], len(stream), timeout_s=60)
        await until(lambda: worker.ready, 20, 0.02, what="the worker to resume")
    assert {o["status"] for o in outcomes} == {"applied"}
    assert len(simulator.state.applied_log) == len(stream)


async def test_a_worker_stopped_during_an_api_outage_ends_at_once_and_the_next_takes_its_events_over(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """A stop while the API is unreachable waited out the whole grace (60 s here) with every job at
    the gate, and the next worker then waited out each claim's lease (60 s) before it could take
    the events over. Now the stop ends once every job has waited at the gate for 5 s, the cancelled jobs' claims
    expire as they are cancelled, and the next worker applies every event (reading each claimed
    ticket first: the first worker's sends may have landed), each once."""
    stream = [e for n in range(5) for e in ticket_script(f"CMO{n:03d}", subs=1)]
    down = make_settings(
        worker_id="w-down",
        api_endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens: connections refused
        api_unreachable_threshold_s=0.3,
        shutdown_grace_s=60,
        dedup_lease_s=60,
    )
    worker = Worker(down)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: bool(worker.status()["assigned"]), 20, 0.02, what="a partition assignment")
        await send(broker.bootstrap, topics["input"], stream)
        await until(lambda: worker.status()["paused_by"] == ["api_unreachable"], 20, 0.02, what="the pause")
        worker.stop()
        await asyncio.wait_for(task, 20)  # not the 60 s grace
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert simulator.state.applied_log == []
    with contextlib.closing(sqlite3.connect(down.dedup_url.removeprefix("sqlite:///"))) as db:
        left = [json.loads(r) for (r,) in db.execute("SELECT record FROM dedup WHERE event_id NOT LIKE '@%'")]
    assert left  # the first event of each ticket, in hand
    assert {r["state"] for r in left} == {"claimed"}
    async with running_worker(make_settings(worker_id="w-up", dedup_lease_s=60)):
        outcomes = await read_json(broker.bootstrap, topics["results"], len(stream), timeout_s=30)
    assert [o["status"] for o in outcomes] == ["applied"] * len(stream)
    assert sorted(e["event_id"] for e in simulator.state.applied_log) == sorted(e["event_id"] for e in stream)
    # each claim taken over had its ticket read before the send: the first worker's may have landed
    assert sum(r.method == "GET" for r in simulator.state.requests) == len(left)


async def test_health_and_metrics_endpoints(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    async with running_worker(make_settings()) as worker:
        await send(broker.bootstrap, topics["input"], [event("change.started", "CM-H", "s1"), b"junk"])
        await read_json(broker.bootstrap, topics["results"], 2)
        await until(lambda: worker.ready, 10, 0.02, what="readiness")
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{worker.http_port}"
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["ready"] is True
                assert body["broker_reachable"] is True
                assert (body["in_flight"], body["running"], body["buffered_bytes"]) == (0, 0, 0)
            async with http.get(base + "/metrics") as resp:
                text = await resp.text()
    for line in (
        "coc_worker_messages_consumed_total 2.0",
        'coc_worker_outcomes_total{status="applied"} 1.0',
        'coc_worker_outcomes_total{status="invalid"} 1.0',
        'coc_worker_outcomes_total{status="failed"} 0.0',  # every status shows from the start
        'coc_worker_api_requests_total{code="200"} 1.0',
        "coc_worker_dead_letters_total 1.0",
        "coc_worker_in_flight 0.0",
        "coc_worker_buffered_bytes 0.0",
        "coc_worker_paused 0.0",
        "coc_worker_ready 1.0",
        'coc_worker_partitions_held{reason="uncommitted"} 0.0',
        'coc_worker_messages_abandoned_total{kind="stopped"} 0.0',
        'coc_worker_api_requests_total{code="timeout"} 0.0',  # at 0 before the first
    ):
        assert line in text, line
    assert "\nprocess_resident_memory_bytes " in text  # the worker's own registry has them too
    assert "coc_worker_api_request_seconds_bucket" in text


async def test_a_restarted_worker_reports_the_lag_of_partitions_it_has_taken_nothing_from(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """The lag was exported only once this pod had committed a partition itself, which it does only
    after taking a message there: after a restart an idle partition had no lag series (0 was not
    said; the sum across pods jumped whenever one appeared or went). Before its own first commit
    the base is the group's; a backlog then reads as its size."""
    first = [e for n in range(8) for e in ticket_script(f"CML{n:03d}", subs=1)]
    settings = make_settings()
    async with running_worker(settings):
        await send(broker.bootstrap, topics["input"], first)
        await read_json(broker.bootstrap, topics["results"], len(first))

        async def all_committed() -> bool:
            found = await committed_offsets(broker.bootstrap, settings.group_id, topics["input"], 4)
            return sum(max(0, offset) for offset in found.values()) == len(first)

        await until(all_committed, timeout_s=20, every_s=0.1)

    async with running_worker(settings) as worker:
        await until(lambda: set(lag(worker)) == {"0", "1", "2", "3"}, 20, 0.05, what="every partition's lag")
        assert set(lag(worker).values()) == {0.0}
    backlog = [e for n in range(6) for e in ticket_script(f"CMB{n:03d}", subs=1)]
    await send(broker.bootstrap, topics["input"], backlog)
    down = make_settings(api_endpoint=f"http://127.0.0.1:{free_port()}", api_unreachable_threshold_s=0.3)
    async with running_worker(down) as worker:
        await until(lambda: worker.status()["paused_by"] == ["api_unreachable"], 20, 0.02, what="the pause")
        await until(lambda: sum(lag(worker).values()) == len(backlog), 20, 0.05, what="the backlog's lag")
    assert len(simulator.state.applied_log) == len(first)


async def test_a_new_group_reports_the_lag_of_a_backlog_it_cannot_work_off(
    broker: TansuBroker, topics: dict[str, str], make_settings: SettingsFactory
) -> None:
    """A group that never committed a partition (new, or its offsets expired) reads it from the
    log's start. With the API away from the start, the one message taken (a buffer of one) never
    finishes, and the partitions nothing was taken from were never committed: they had no lag
    series at all, a backlog no alert could see. Their base is now the log's start."""
    backlog = [e for n in range(6) for e in ticket_script(f"CMN{n:03d}", subs=1)]
    await send(broker.bootstrap, topics["input"], backlog)
    down = make_settings(
        api_endpoint=f"http://127.0.0.1:{free_port()}",
        api_unreachable_threshold_s=0.3,
        max_in_flight=1,
        max_buffered=1,
    )
    async with running_worker(down) as worker:
        await until(lambda: worker.status()["paused_by"] == ["api_unreachable"], 20, 0.02, what="the pause")
        await until(lambda: sum(lag(worker).values()) == len(backlog), 20, 0.05, what="the backlog's lag")
        assert set(lag(worker)) == {"0", "1", "2", "3"}


def lag(worker: Worker) -> dict[str, float]:
    """The worker's ``coc_worker_consumer_lag`` samples, by partition."""
    [metric] = [m for m in worker.metrics.registry.collect() if m.name == "coc_worker_consumer_lag"]
    return {sample.labels["partition"]: sample.value for sample in metric.samples}


async def test_offsets_are_committed_only_over_finished_work(
    broker: TansuBroker,
    topics: dict[str, str],
    simulator: SimulatorServer,
    make_settings: SettingsFactory,
    unique: str,
) -> None:
    """One message cannot finish (another live worker holds its event's claim) while the messages
    after it in its partition, and those of the other partitions, do: commits go on, but that
    partition's committed offset never passes the unfinished message. Once it finishes, the
    offset moves to the end of the partition."""
    settings = make_settings()
    partitioner = DefaultPartitioner()

    def partition_of(ticket: str) -> int:
        return int(partitioner(ticket.encode(), [0, 1, 2, 3], [0, 1, 2, 3]))

    target = partition_of("CMO-HELD")
    tickets = [f"CMO{n}" for n in range(200)]
    same = [t for t in tickets if partition_of(t) == target]
    elsewhere = [t for t in tickets if partition_of(t) != target]
    held = event("change.started", "CMO-HELD", "s1", event_id=f"ev-held-{unique}")
    # in the held partition: one message before it, ten after it; ten in the other partitions
    stream = [
        event("change.started", same[0], "s1"),
        held,
        *(event("change.started", t, "s1") for t in same[1:11]),
        *(event("change.started", t, "s1") for t in elsewhere[:10]),
    ]
    marker = event("change.started", elsewhere[10], "s1")  # sent once the others have finished
    store = open_store(settings.dedup_url)
    try:
        assert (
            await store.claim(held["event_id"], "another-worker", "elsewhere/0/0", 600)
        ).kind is ClaimKind.NEW
        async with running_worker(settings) as worker:
            await send(broker.bootstrap, topics["input"], stream)
            inputs = await read_records(broker.bootstrap, topics["input"], len(stream))
            ends: dict[int, int] = defaultdict(int)
            for r in inputs:
                ends[r.partition] = max(ends[r.partition], r.offset + 1)
            [(partition, held_at)] = [
                (r.partition, r.offset)
                for r in inputs
                if json.loads(r.value or b"{}")["event_id"] == held["event_id"]
            ]
            assert partition == target
            assert ends[target] == held_at + 11  # ten messages of the partition after it

            async def committed() -> dict[int, int]:
                """The group's committed offsets; never past the held message while it is held."""
                found = await committed_offsets(broker.bootstrap, settings.group_id, topics["input"], 4)
                assert found[target] <= held_at, (found, held_at)
                return found

            applied = worker.metrics.outcome_counts[OutcomeStatus.APPLIED]

            async def all_but_the_held_one_finished() -> bool:
                found = await committed()
                return (
                    applied.value == len(stream) - 1
                    and worker.status()["in_flight"] == 1  # every other message finished
                    and found[target] == held_at  # commits reach the held message, not past it
                    and all(found[p] == end for p, end in ends.items() if p != target)
                )

            await until(all_but_the_held_one_finished, 30, 0.1, what="every other message committed")
            # one more message, finished and committed after all of that: a commit round ran
            # after the ten behind the held one had finished
            await send(broker.bootstrap, topics["input"], [marker])
            marked = partition_of(marker["ticket_id"])

            async def marker_committed() -> bool:
                return (await committed())[marked] > ends[marked]

            await until(marker_committed, 30, 0.1, what="the marker's commit")
            ends[marked] += 1
            outcomes = await read_json(broker.bootstrap, topics["results"], len(stream))
            assert held["event_id"] not in {o["event_id"] for o in outcomes}
            assert simulator.state.applied_for(held["event_id"]) == []

            await store.release(held["event_id"], "another-worker")

            async def everything_committed() -> bool:
                found = await committed_offsets(broker.bootstrap, settings.group_id, topics["input"], 4)
                return all(found[p] == end for p, end in ends.items())

            await until(everything_committed, 30, 0.1, what="the held partition committed to its end")
    finally:
        await store.close()
    committed_at_end = await committed_offsets(broker.bootstrap, f"group-{unique}", topics["input"], 4)
    written: dict[int, int] = defaultdict(int)
    for o in await read_json(broker.bootstrap, topics["results"], len(stream) + 1):
        written[o["source"]["partition"]] = max(written[o["source"]["partition"]], o["source"]["offset"] + 1)
    assert {p: committed_at_end[p] for p in written} == dict(written) == dict(ends)
    assert len(simulator.state.applied_for(held["event_id"])) == 1


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_a_stop_with_the_broker_gone_still_ends(
    make_settings: SettingsFactory, tmp_path: Path, unique: str, mode: CutMode
) -> None:
    """SIGTERM while the broker is unreachable and a finished offset is not committed yet: aiokafka
    would retry the final commit for ever. The shutdown bounds each broker step, so the worker
    ends (the uncommitted message is read again after a restart, and deduplicated)."""
    names = {k: f"{k}-{unique}" for k in ("input", "results", "dlq")}
    async with ProxiedBroker(tmp_path / "tansu.log") as pb:
        await create_topics(pb.bootstrap, list(names.values()), partitions=1)
        await produce(pb.bootstrap, names["input"], [(b"CM1", b"not json", None)])
        settings = make_settings(
            kafka_bootstrap_servers=pb.bootstrap,
            input_topic=names["input"],
            results_topic=names["results"],
            dlq_topic=names["dlq"],
            commit_interval_s=3600,  # nothing committed before the stop
            shutdown_grace_s=1,
        )
        worker = Worker(settings)
        task = asyncio.create_task(worker.run())
        try:
            await read_topic(pb.bootstrap, names["results"], until=lambda got: len(got) >= 1, timeout_s=20)
            await pb.proxy.cut(mode)
            worker.stop()
            await asyncio.wait_for(task, 30)  # before the bound: still waiting after 40 s
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_a_worker_started_before_its_broker_waits_for_it_and_then_works(
    make_settings: SettingsFactory, tmp_path: Path, unique: str
) -> None:
    """Started while the broker was away, the worker exited 1 and was left to the kubelet's
    growing back-off: it came back up to 5 minutes after the broker did. Now it waits (alive, not
    ready, saying what for) and goes to work as soon as the broker answers."""
    names = {k: f"{k}-{unique}" for k in ("input", "results", "dlq")}
    port = free_port()
    settings = make_settings(
        kafka_bootstrap_servers=f"127.0.0.1:{port}",
        input_topic=names["input"],
        results_topic=names["results"],
        dlq_topic=names["dlq"],
        create_topics=True,
        topic_partitions=1,
        startup_wait_s=60,
        ingest_enabled=True,  # its producer waits too, with /healthz served meanwhile
        ingest_allow_anonymous=True,
    )
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.status()["waiting_for"] == "broker", 20, 0.02, what="the wait")
        base = f"http://127.0.0.1:{worker.http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as alive:
                assert alive.status == 200
            async with http.get(f"{base}/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["waiting_for"] == "broker"
            async with http.post(f"{base}/v1/events", json=event("change.started", "CM1", "s-1")) as early:
                assert early.status == 503
                assert (await early.json())["error"] == "not_started"
        assert not task.done()
        with TansuBroker(port=port, log_path=tmp_path / "tansu.log") as late:
            await until(lambda: worker.started.is_set() or task.done(), 30, 0.02, what="the start")
            assert not task.done()
            assert worker.status()["waiting_for"] is None
            await produce(late.bootstrap, names["input"], [(b"CM1", b"not json", None)])
            got = await read_topic(
                late.bootstrap, names["results"], until=lambda got: len(got) >= 1, timeout_s=30
            )
            assert [json.loads(r.value)["status"] for r in got] == ["invalid"]
            worker.stop()
            await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            worker.stop()
            await asyncio.gather(asyncio.wait_for(task, 30), return_exceptions=True)


async def test_a_stuck_message_holds_back_its_partition_not_an_ever_longer_tail(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """One message cannot finish (another live worker holds its event's claim) while the later
    messages of its partition do. Nothing behind it can be committed, so past ``max_uncommitted`` its
    partition stops being fetched (the other partitions go on), and it is fetched again once the
    stuck message is done: memory and a crash's re-reading stay bounded."""
    settings = make_settings(max_uncommitted=20, max_in_flight=8)
    partitioner = DefaultPartitioner()

    def partition_of(ticket: str) -> int:
        return int(partitioner(ticket.encode(), [0, 1, 2, 3], [0, 1, 2, 3]))

    stuck = event("change.started", "CM-STUCK", "s1", event_id="ev-stuck")
    target = partition_of("CM-STUCK")
    tickets = [f"CM-T{n:04d}" for n in range(600)]
    behind = [t for t in tickets if partition_of(t) == target][:100]
    elsewhere = [t for t in tickets if partition_of(t) != target][:30]
    store = open_store(settings.dedup_url)
    try:
        assert (await store.claim("ev-stuck", "another-worker", "elsewhere/0/0", 600)).kind is ClaimKind.NEW
        async with running_worker(settings) as worker:
            key = (topics["input"], target)
            await send(broker.bootstrap, topics["input"], [stuck])
            await send(
                broker.bootstrap,
                topics["input"],
                [event("change.started", t, "s1") for t in behind + elsewhere],
            )
            done = await read_topic(
                broker.bootstrap,
                topics["results"],
                until=lambda records: (
                    set(elsewhere) <= {json.loads(r.value or b"{}")["ticket_id"] for r in records}
                ),
                timeout_s=60,
            )
            await until(
                lambda: f"{key[0]}/{key[1]}" in worker.status()["held"], 30, 0.02, what="the partition held"
            )
            assert worker._offsets.pending_of(key) <= 20 + settings.buffer_limit < len(behind)
            assert len(done) < 1 + len(behind) + len(elsewhere)

            await store.release("ev-stuck", "another-worker")
            outcomes = await read_json(
                broker.bootstrap, topics["results"], 1 + len(behind) + len(elsewhere), 60
            )
            await until(lambda: not worker.status()["held"], 30, 0.02, what="the partition fetched again")
    finally:
        await store.close()
    assert {o["status"] for o in outcomes} == {"applied"}
    assert {o["ticket_id"] for o in outcomes} == {"CM-STUCK", *behind, *elsewhere}


async def test_large_records_waiting_behind_a_stuck_ticket_are_bounded_in_bytes(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """Invalid records of 100 KB each wait behind their ticket's first event, which cannot finish
    (another live worker holds its claim). Bounded in messages only, the buffer took them until the
    partition's share (64 here), 6.4 MB, and with a byte bound on the whole buffer alone (4 MiB
    here) fetching paused for every partition. Their partition is now held at half of
    ``max_buffered_bytes`` (one fetch of it, ~1 MiB, may go past that) while the other
    partitions' events go on, and every record still ends as an outcome once the ticket moves."""
    limit = 4 * 1024 * 1024
    settings = make_settings(max_in_flight=8, max_buffered=128, max_buffered_bytes=limit)
    partitioner = DefaultPartitioner()

    def partition_of(ticket: str) -> int:
        return int(partitioner(ticket.encode(), [0, 1, 2, 3], [0, 1, 2, 3]))

    stuck = event("change.started", "CM-BIG", "s1", event_id="ev-big-stuck")
    large = [event("change.started", "CM-BIG", "s1", pad="x" * 100_000) for _ in range(80)]
    others = [t for t in (f"CM-O{n:03d}" for n in range(200)) if partition_of(t) != partition_of("CM-BIG")][
        :40
    ]
    store = open_store(settings.dedup_url)
    try:
        assert (
            await store.claim("ev-big-stuck", "another-worker", "elsewhere/0/0", 600)
        ).kind is ClaimKind.NEW
        async with running_worker(settings) as worker:
            key = f"{topics['input']}/{partition_of('CM-BIG')}"
            await send(broker.bootstrap, topics["input"], [stuck, *large])
            await until(lambda: key in worker.status()["held"], 30, 0.02, what="the partition held")
            # at most one fetch of it (max_event_bytes and headroom, ~10 records) past its share
            assert worker.status()["buffered_bytes"] <= limit // 2 + record_limit_bytes(settings)
            assert worker.status()["in_flight"] < 40
            await send(broker.bootstrap, topics["input"], [event("change.started", t, "s1") for t in others])
            done = await read_json(broker.bootstrap, topics["results"], len(others), 60)
            assert {o["ticket_id"] for o in done} == set(others)  # the other partitions went on
            assert key in worker.status()["held"]

            await store.release("ev-big-stuck", "another-worker")
            outcomes = await read_json(broker.bootstrap, topics["results"], 1 + len(large) + len(others), 60)
            await until(lambda: worker.status()["buffered_bytes"] == 0, 30, 0.02, what="the buffer empty")
            await until(lambda: not worker.status()["held"], 30, 0.02, what="the partition released")
    finally:
        await store.close()
    assert Counter(o["status"] for o in outcomes) == {"applied": 1 + len(others), "invalid": len(large)}
