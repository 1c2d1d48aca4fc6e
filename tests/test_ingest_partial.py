"""The HTTP ingress's answer to a write the broker acknowledged only in part.

What is tested is the handler (its 503, the ``written`` / ``not_written`` ids, the metric and the log
line), not the broker: the producer is a stand-in whose ``send_many`` raises ``PartialWrite`` as
``EventProducer.send_many`` does, and no broker is contacted (the settings name a closed port).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs
from waiting import until

from worker.app import Worker
from worker.errors import ConfigError
from worker.health import HealthServer
from worker.ingest import Ingress
from worker.metrics import Metrics
from worker.settings import WorkerSettings, load_settings
from worker.tools.kafka_io import Delivered, OutRecord, PartialWrite

_ids = itertools.count(1)


def event(kind: str, ticket: str, sub: str) -> dict[str, Any]:
    return {"event_id": f"ev-partial-{next(_ids)}", "type": kind, "ticket_id": ticket, "sub_ticket_id": sub}


def alert(n: int) -> dict[str, Any]:
    """One firing alert of a notification, its own fingerprint per ``n``."""
    return {
        "status": "firing",
        "labels": {"alertname": "ProbeFailure", "ticket_id": "CM-AM", "sub_ticket_id": f"s{n}"},
        "annotations": {},
        "startsAt": "2025-11-28T03:00:00Z",
        "fingerprint": f"{n:016x}",
    }


class StandInProducer:
    """What the ingress asks of its producer besides ``send_many``, answered at once."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def ping(self, timeout_s: float = 3.0) -> None:
        pass


class PartlyWriting(StandInProducer):
    """A producer whose ``fail_call``-th ``send_many`` acknowledges only the records ``acked``
    marks True (as ``EventProducer.send_many`` raises on a failed write); the others succeed."""

    def __init__(self, fail_call: int, acked: list[bool]) -> None:
        self.fail_call, self.acked = fail_call, acked
        self.calls: list[int] = []

    async def send_many(self, topic: str, records: Sequence[OutRecord]) -> list[Delivered]:
        self.calls.append(len(records))
        delivered = [Delivered(topic, 0, n) for n in range(len(records))]
        if len(self.calls) == self.fail_call:
            assert len(records) == len(self.acked)
            acked = [d if ok else None for d, ok in zip(delivered, self.acked, strict=True)]
            raise PartialWrite(f"write to {topic!r} failed: KafkaTimeoutError", acked, len(records))
        return delivered


@pytest.fixture
def stub_settings() -> WorkerSettings:
    return load_settings(
        kafka_bootstrap_servers="127.0.0.1:9",
        input_topic="in-stub",
        http_host="127.0.0.1",
        http_port=0,
        ingest_allow_anonymous=True,
    )


@contextlib.asynccontextmanager
async def serving(
    settings: WorkerSettings, producer: StandInProducer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, Metrics]]:
    """The ingress on its HTTP server, writing with ``producer``: its base URL and metrics."""
    monkeypatch.setattr("worker.ingest.EventProducer", lambda settings: producer)
    metrics = Metrics()
    ingress = Ingress(settings, metrics.registry)
    server = HealthServer(settings, metrics.registry, ingress.status, ingress.routes())
    await ingress.start()
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", metrics
    finally:
        await server.stop()
        await ingress.stop()


async def post_with_producer(
    settings: WorkerSettings, producer: PartlyWriting, monkeypatch: pytest.MonkeyPatch, path: str, body: Any
) -> tuple[int, Any, Metrics]:
    async with (
        serving(settings, producer, monkeypatch) as (base, metrics),
        aiohttp.ClientSession() as http,
        http.post(
            base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        ) as r,
    ):
        return r.status, await r.json(), metrics


async def test_a_partly_written_batch_says_which_events_were_written(
    stub_settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the acknowledged records of a failed write were thrown away: a generic 503, not
    counted in coc_worker_ingest_events, no counts in the log."""
    batch = [event("change.started", f"CM-PW{n}", "s1") for n in range(3)]  # three tickets
    ids = [e["event_id"] for e in batch]
    producer = PartlyWriting(1, [True, False, True])
    with capture_logs() as logs:
        status, body, metrics = await post_with_producer(
            stub_settings, producer, monkeypatch, "/v1/events", batch
        )
    assert status == 503
    assert body["error"] == "broker_unavailable"
    assert "retry with the same event ids" in body["detail"]
    assert (body["written"], body["not_written"]) == ([ids[0], ids[2]], [ids[1]])
    assert metrics.registry.get_sample_value("coc_worker_ingest_events_total", {"route": "events"}) == 2
    [line] = [e for e in logs if e["event"] == "ingest_broker_unavailable"]
    assert (line["log_level"], line["written"], line["not_written"], line["events"]) == ("warning", 2, 1, 3)


async def test_an_event_stored_after_its_tickets_unwritten_one_is_reported_not_written(
    stub_settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start of CM-A was not acknowledged, its end was: a retry of the start alone would put it
    behind the end, and the worker would refuse the end (a sub-ticket not yet started) and
    dead-letter it. The end is reported not written too, so the retry sends both, in order; CM-B's
    event, with no gap before it, stays written."""
    batch = [
        event("change.started", "CM-A", "s1"),
        event("change.started", "CM-B", "s1"),
        event("change.ended", "CM-A", "s1"),
    ]
    ids = [e["event_id"] for e in batch]
    producer = PartlyWriting(1, [False, True, True])
    status, body, metrics = await post_with_producer(
        stub_settings, producer, monkeypatch, "/v1/events", batch
    )
    assert status == 503
    assert (body["written"], body["not_written"]) == ([ids[1]], [ids[0], ids[2]])
    # what the broker stored is still counted as stored
    assert metrics.registry.get_sample_value("coc_worker_ingest_events_total", {"route": "events"}) == 2


async def test_a_partly_written_group_counts_the_slices_already_acknowledged(
    stub_settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second slice of a group fails after one record: the first slice and that record are
    written, the rest (and the slice never sent) are not."""
    settings = stub_settings.model_copy(update={"ingest_max_batch": 2})
    producer = PartlyWriting(2, [True, False])
    group = {"version": "4", "alerts": [alert(n) for n in range(5)]}
    status, body, metrics = await post_with_producer(
        settings, producer, monkeypatch, "/v1/alertmanager", group
    )
    ids = [f"am-{n:016x}-1764298800000" for n in range(5)]
    assert status == 503
    assert producer.calls == [2, 2]  # the third slice was not sent
    assert (body["written"], body["not_written"]) == (ids[:3], ids[3:])
    assert metrics.registry.get_sample_value("coc_worker_ingest_events_total", {"route": "alertmanager"}) == 3


@pytest.mark.parametrize("variable", ["COC_WORKER_INGEST_TOKENS", "COC_WORKER_INGEST_TOKENS_FILE"])
async def test_an_empty_tokens_variable_lets_nobody_in(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty variable counted as one not set, and with no tokens set the ingress is open:
    compose's ``${TOKENS:-}`` with ``TOKENS`` unset, or an empty key of a Kubernetes Secret, let
    every request in. Given, even empty, the variable asks for tokens: no token, nobody in."""
    monkeypatch.setenv(variable, "")
    settings = load_settings(
        kafka_bootstrap_servers="127.0.0.1:9", input_topic="in-stub", http_host="127.0.0.1", http_port=0
    )
    producer = PartlyWriting(0, [])
    status, body, _ = await post_with_producer(
        settings, producer, monkeypatch, "/v1/events", [event("change.started", "CM-E", "s1")]
    )
    assert (status, body["error"]) == (401, "unauthorized")
    assert producer.calls == []


def test_an_ingress_without_tokens_does_not_start_unless_told_to_let_anyone_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With neither tokens variable the ingress took any request: a forgotten variable let
    whoever reached the port (0.0.0.0 by default) post events, which the worker sends to the API
    with its own credentials. It now refuses to start, naming the settings, unless told."""
    for variable in ("COC_WORKER_INGEST_TOKENS", "COC_WORKER_INGEST_TOKENS_FILE"):
        monkeypatch.delenv(variable, raising=False)
    base = {"kafka_bootstrap_servers": "127.0.0.1:9", "input_topic": "in-stub"}
    with pytest.raises(ConfigError) as refused:
        Ingress(load_settings(**base))
    assert "COC_WORKER_INGEST_TOKENS" in str(refused.value)
    assert "COC_WORKER_INGEST_ALLOW_ANONYMOUS=true" in str(refused.value)
    with pytest.raises(ConfigError):  # in the worker too
        Worker(load_settings(**base, ingest_enabled=True, dedup_url="memory://"))
    Ingress(load_settings(**base, ingest_allow_anonymous=True))
    Ingress(load_settings(**base, ingest_tokens="a-token-long-enough"))


class Holding(StandInProducer):
    """A producer whose writes wait until ``release`` is set, as in a broker outage."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def send_many(self, topic: str, records: Sequence[OutRecord]) -> list[Delivered]:
        self.waiting += 1
        await self.release.wait()
        return [Delivered(topic, 0, n) for n in range(len(records))]


async def test_requests_over_the_bytes_in_hand_are_answered_503_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a broker outage each request held its body, document and records until the producer gave
    up (30 s), with no bound: 40 concurrent 1 MB notifications took the process from 70 to 526 MB,
    past the README Deployment's 256 Mi limit, and the pod was killed in the outage it was to ride
    out. Bodies in hand are bounded (four times the body limit); a request above it is answered 503
    at once with Retry-After, and Alertmanager sends it again."""
    settings = load_settings(
        kafka_bootstrap_servers="127.0.0.1:9",
        input_topic="in-stub",
        http_host="127.0.0.1",
        http_port=0,
        ingest_allow_anonymous=True,
        ingest_max_body_bytes=4096,
    )
    producer = Holding()

    def body() -> bytes:  # ~3,100 bytes: one fits, and four of them fill the budget of 16,384
        batch = [event("change.started", f"CM-B{n}", "s1") for n in range(30)]
        return json.dumps(batch).encode()

    try:
        async with serving(settings, producer, monkeypatch) as (base, _), aiohttp.ClientSession() as http:

            async def post() -> tuple[int, dict[str, Any], str | None]:
                async with http.post(
                    base + "/v1/events", data=body(), headers={"Content-Type": "application/json"}
                ) as r:
                    return r.status, await r.json(), r.headers.get("Retry-After")

            held = [asyncio.ensure_future(post()) for _ in range(5)]
            await until(lambda: producer.waiting == 5, what="five requests in hand")
            refused = await asyncio.wait_for(post(), 5)  # a sixth, at once: not after the outage
            assert refused[0] == 503
            assert refused[1]["error"] == "busy"
            assert refused[2] == "5"
            producer.release.set()
            answers = await asyncio.wait_for(asyncio.gather(*held), 10)
            assert [status for status, _, _ in answers] == [202] * 5
            assert (await asyncio.wait_for(post(), 5))[0] == 202  # room again
    finally:
        producer.release.set()
