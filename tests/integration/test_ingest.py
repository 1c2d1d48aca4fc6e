"""The HTTP ingress against the real broker: auth, limits, validation, production; and
``coc-worker ingest`` as a process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from faults.harness import ProxiedBroker
from helpers import event
from structlog.testing import capture_logs
from waiting import until

from worker.health import HealthServer
from worker.ingest import Ingress, serve
from worker.metrics import Metrics
from worker.sandbox import TansuBroker, create_topics, free_port, read_topic
from worker.settings import WorkerSettings, load_settings
from worker.tools.kafka_io import Delivered, EventProducer, OutRecord, TopicReader

TOKENS = ("ingest-token-one-7f3a", "ingest-token-two-9b2c")


@pytest.fixture
def settings(broker: TansuBroker, topics: dict[str, str], tmp_path: Path) -> WorkerSettings:
    tokens = tmp_path / "tokens"
    tokens.write_text(",".join(TOKENS) + "\n")
    return load_settings(
        kafka_bootstrap_servers=broker.bootstrap,
        input_topic=topics["input"],
        http_host="127.0.0.1",
        http_port=0,
        ingest_tokens_file=str(tokens),
        ingest_max_body_bytes=4096,
        ingest_max_batch=3,
    )


@pytest.fixture
async def ingress(settings: WorkerSettings) -> AsyncIterator[str]:
    """The ingress on its own server, as ``coc-worker ingest`` runs it; yields its base URL."""
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, port.set_result))
    try:
        yield f"http://127.0.0.1:{await asyncio.wait_for(port, 20)}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def size(settings: WorkerSettings) -> int:
    async with TopicReader(settings, settings.input_topic) as reader:
        return sum((await reader.end_offsets()).values())


async def post(
    url: str, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as http:
        data = raw if raw is not None else json.dumps(body).encode()
        async with http.post(
            url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        ) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None), text


async def test_bearer_tokens_are_required_and_never_echoed(ingress: str, settings: WorkerSettings) -> None:
    one = event("change.started", "CM-I", "s1")
    for headers in ({}, bearer("nope"), {"Authorization": f"Basic {TOKENS[0]}"}, {"Authorization": "Bearer"}):
        status, body, text = await post(f"{ingress}/v1/events", one, headers)
        assert status == 401
        assert body["error"] == "unauthorized"
        assert not any(token in text for token in TOKENS)
    status, _, _ = await post(f"{ingress}/v1/alertmanager", {"version": "4", "alerts": []})
    assert status == 401
    assert await size(settings) == 0
    for token in TOKENS:  # either configured token works
        status, body, _ = await post(
            f"{ingress}/v1/events", event("change.started", "CM-I", "s1"), bearer(token)
        )
        assert status == 202
    assert await size(settings) == 2


async def test_a_bearer_token_that_is_not_utf8_is_unauthorized(
    ingress: str, settings: WorkerSettings
) -> None:
    """Header bytes that are not UTF-8 are a wrong token (401), not a server error."""
    host, port = ingress.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status_line.split()[1] == b"401"
    assert await size(settings) == 0


async def test_an_emptied_tokens_file_lets_nobody_in(ingress: str, settings: WorkerSettings) -> None:
    """Before, an empty (or momentarily truncated) tokens file turned authentication off: 202 for
    anyone. Tokens may also be one per line."""
    assert settings.ingest_tokens_file is not None
    one = event("change.started", "CM-E", "s1")
    settings.ingest_tokens_file.write_text("")
    for headers in ({}, bearer(TOKENS[0])):
        status, body, _ = await post(f"{ingress}/v1/events", one, headers)
        assert (status, body["error"]) == (401, "unauthorized")
    settings.ingest_tokens_file.write_text("\n".join(TOKENS) + "\n")
    for token in TOKENS:
        status, _, _ = await post(f"{ingress}/v1/events", one, bearer(token))
        assert status == 202
    settings.ingest_tokens_file.write_bytes(b"\xff\xfe")
    status, body, _ = await post(f"{ingress}/v1/events", one, bearer(TOKENS[0]))
    assert (status, body["error"]) == (503, "auth_unavailable")
    # A readable file with a token too short (a "# tokens" comment line is two): the log says why,
    # not only that the tokens could not be read; and never the token.
    settings.ingest_tokens_file.write_text("# tokens\n" + "\n".join(TOKENS) + "\n")
    with capture_logs() as logs:
        status, body, _ = await post(f"{ingress}/v1/events", one, bearer(TOKENS[0]))
    assert (status, body["error"]) == (503, "auth_unavailable")
    [said] = [e for e in logs if e["event"] == "ingest_tokens_unreadable"]
    assert "a value of 1 characters" in said["detail"]
    assert await size(settings) == 2


async def test_what_is_not_a_json_body_is_refused_and_counted(ingress: str, settings: WorkerSettings) -> None:
    """A text/plain post (a browser's cross-site form needs no preflight) is 415; a body whose gzip
    is broken is 400 (before: a 500 with a traceback, and not counted in the metrics)."""
    one = json.dumps(event("change.started", "CM-T", "s1")).encode()
    async with aiohttp.ClientSession() as http:
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            async with http.post(
                f"{ingress}/v1/events", data=one, headers={**bearer(TOKENS[0]), "Content-Type": content_type}
            ) as r:
                assert r.status == 415
        broken = {**bearer(TOKENS[0]), "Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with http.post(f"{ingress}/v1/events", data=b"not gzip at all", headers=broken) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "bad_body"
        async with http.get(f"{ingress}/metrics") as r:
            metrics = await r.text()
    assert 'coc_worker_ingest_requests_total{code="415",route="events"} 2.0' in metrics
    assert 'coc_worker_ingest_requests_total{code="400",route="events"} 1.0' in metrics
    assert await size(settings) == 0


@pytest.fixture
async def quick_ingress(settings: WorkerSettings) -> AsyncIterator[tuple[Ingress, int]]:
    """The ingress with short timeouts (idle connection, body) and broker checks."""
    metrics = Metrics()
    ingress = Ingress(settings, metrics.registry, body_timeout_s=0.5, broker_check_s=0.05)
    server = HealthServer(settings, metrics.registry, ingress.status, ingress.routes(), idle_timeout_s=0.5)
    await ingress.start()
    await server.start()
    assert server.port is not None
    try:
        yield ingress, server.port
    finally:
        await server.stop()
        await ingress.stop()


async def test_slow_and_silent_clients_are_let_go(quick_ingress: tuple[Ingress, int]) -> None:
    """Before, a connection that sent half a request was kept for aiohttp's hour (every such client
    holds one of the worker's file descriptors), and a body that never finished was waited for."""
    _, port = quick_ingress
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKENS[0].encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"408"
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
    writer.close()


async def test_body_and_batch_limits(ingress: str, settings: WorkerSettings) -> None:
    auth = bearer(TOKENS[0])
    big = event("change.succeeded", "CM-L", "s1", result={"comment": "x" * 1900})
    status, body, _ = await post(f"{ingress}/v1/events", [big, big, big], auth)  # > 4096 bytes
    assert (status, body["error"]) == (413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b" " * 1024

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{ingress}/v1/events", data=chunks(), headers={**auth, "Content-Type": "application/json"}
        ) as response,
    ):
        assert response.status == 413
    four = [event("change.started", "CM-L", f"s{n}") for n in range(4)]
    status, body, _ = await post(f"{ingress}/v1/events", four, auth)
    assert (status, body["error"]) == (413, "too_many_events")
    assert await size(settings) == 0


async def test_a_batch_is_produced_whole_or_not_at_all(
    ingress: str, settings: WorkerSettings, broker: TansuBroker, topics: dict[str, str]
) -> None:
    auth = bearer(TOKENS[1])
    good = event("change.started", "CM-B", "s1")
    missing_sub = event("change.ended", "CM-B", None)
    hostile = {**event("change.started", "CM-B", "s1"), "ticket_id": "../../etc/passwd", "extra": 1}
    status, body, text = await post(f"{ingress}/v1/events", [good, missing_sub, hostile], auth)
    assert status == 400
    assert body["error"] == "invalid_events"
    assert [item["index"] for item in body["invalid"]] == [1, 2]
    paths = {e["path"] for item in body["invalid"] for e in item["errors"]}
    assert paths == {"$[1].sub_ticket_id", "$[2].ticket_id", "$[2].extra"}
    assert "etc/passwd" not in text  # input values are never echoed
    assert await size(settings) == 0

    status, body, _ = await post(f"{ingress}/v1/events", {"type": "change.started"}, auth)  # one object
    assert status == 400
    assert {e["path"] for e in body["invalid"][0]["errors"]} == {
        "$.event_id",
        "$.ticket_id",
        "$.sub_ticket_id",
    }
    status, body, _ = await post(f"{ingress}/v1/events", None, auth, raw=b'{"a": 1, "a": 2}')
    assert (status, body["error"]) == (400, "bad_json")

    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    other = event("change.started", "CM-C", "s1")
    status, body, _ = await post(f"{ingress}/v1/events", [good, other], {**auth, "traceparent": trace})
    assert (status, body) == (202, {"event_ids": [good["event_id"], other["event_id"]]})
    records = await read_topic(broker.bootstrap, topics["input"], until=lambda r: len(r) >= 2, timeout_s=10)
    assert {r.key: json.loads(r.value or b"") for r in records} == {b"CM-B": good, b"CM-C": other}
    for record in records:
        assert (record.header("traceparent") or b"").decode().split("-")[
            1
        ] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_refusal_lists_a_bounded_number_of_errors(settings: WorkerSettings) -> None:
    """Listing every error of every event of a large batch kept the event loop busy for seconds
    (one pydantic error per unknown key): the answer lists the first 20 invalid events, the
    first 20 errors of each, and counts the rest."""
    settings = settings.model_copy(update={"ingest_max_body_bytes": 1 << 20, "ingest_max_batch": 500})
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, port.set_result))
    wide = {**event("change.started", "CM-W", "s1"), **{f"k{i}": 0 for i in range(100)}}
    batch = [wide] * 30 + [event("change.started", "CM-W", "s2")] + [{"type": "nope"}] * 5
    try:
        url = f"http://127.0.0.1:{await asyncio.wait_for(port, 20)}/v1/events"
        status, body, text = await post(url, batch, bearer(TOKENS[1]))
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert status == 400
    assert body["error"] == "invalid_events"
    assert body["invalid_count"] == 35
    assert [item["index"] for item in body["invalid"]] == list(range(20))
    assert all(len(item["errors"]) == 20 and item["more_errors"] == 80 for item in body["invalid"])
    assert len(text) < 64 * 1024
    assert await size(settings) == 0


async def test_alertmanager_payload_checks(ingress: str, settings: WorkerSettings) -> None:
    auth = bearer(TOKENS[0])
    status, body, _ = await post(f"{ingress}/v1/alertmanager", {"version": "3", "alerts": []}, auth)
    assert (status, body["error"]) == (400, "unsupported_version")
    status, body, _ = await post(
        f"{ingress}/v1/alertmanager", {"version": "4", "alerts": [{"labels": 1}]}, auth
    )
    assert (status, body["error"]) == (400, "not_an_alertmanager_notification")
    assert {e["path"] for e in body["errors"]} == {"$.alerts[0].status", "$.alerts[0].labels"}
    resolved = {
        "status": "resolved",
        "labels": {"ticket_id": "CM-R", "sub_ticket_id": "s1"},
        "annotations": {},
        "startsAt": "2025-11-28T03:00:00Z",
        "endsAt": "2025-11-28T03:05:00Z",
        "fingerprint": "ab12",
    }
    status, body, _ = await post(
        f"{ingress}/v1/alertmanager", {"version": "4", "status": "resolved", "alerts": [resolved]}, auth
    )
    assert (status, body) == (
        202,
        {"event_ids": [], "skipped": [{"index": 0, "reason": "resolved", "fingerprint": "ab12"}]},
    )
    assert await size(settings) == 0


async def test_coc_worker_ingest_runs_alone(broker: TansuBroker, topics: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COC_WORKER_")}
    env["COC_WORKER_INGEST_TOKENS"] = TOKENS[0]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "ingest",
        "--kafka-bootstrap-servers",
        broker.bootstrap,
        "--input-topic",
        topics["input"],
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--log-format",
        "json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        base = match.group(1)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with http.get(f"{base}/readyz") as response:
                assert (await response.json())["ready"] is True
        status, _, _ = await post(
            f"{base}/v1/events", event("change.started", "CM-P", "s1"), bearer(TOKENS[0])
        )
        assert status == 202
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as response:
            exported = await response.text()
        assert 'coc_worker_ingest_events_total{route="events"} 1.0' in exported
        # Only the ingress's own: the worker's (outcomes, lag, pauses) all at 0 told a dashboard
        # that a worker was there and idle.
        assert "coc_worker_outcomes" not in exported
        assert "coc_worker_paused" not in exported
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert TOKENS[0] not in (line + out.decode() + err.decode())


async def test_standalone_readiness_sees_the_broker_go(tmp_path: Path) -> None:
    """Served alone, /readyz follows the broker: 200 while it answers, 503 (``broker`` false) while
    it is cut off, 200 again once it is back. Before, it said ready from start to stop, broker or
    not. The check must reach the broker: a metadata lookup of a topic already seen answers from
    the client's cache, so readiness stayed green with the broker gone (a proxy cut here)."""
    async with ProxiedBroker(tmp_path / "tansu.log") as pb:
        await create_topics(pb.bootstrap, ["in-ready"], partitions=1)
        settings = load_settings(
            kafka_bootstrap_servers=pb.bootstrap,
            input_topic="in-ready",
            http_host="127.0.0.1",
            http_port=0,
            ingest_allow_anonymous=True,
        )
        metrics = Metrics()
        ingress = Ingress(settings, metrics.registry, broker_check_s=0.1)
        server = HealthServer(settings, metrics.registry, ingress.status, ingress.routes())
        await ingress.start()
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:

                async def readyz() -> tuple[int, dict[str, Any]]:
                    async with http.get(f"http://127.0.0.1:{server.port}/readyz") as r:
                        return r.status, await r.json()

                await until(lambda: ingress.status()["ready"], 10)
                status, body = await readyz()
                assert (status, body["ready"], body["broker"]) == (200, True, True)
                await pb.proxy.cut("refuse")
                await until(lambda: not ingress.status()["ready"], 15)
                status, body = await readyz()
                assert (status, body["ready"], body["broker"]) == (503, False, False)
                await pb.proxy.restore()
                await until(lambda: ingress.status()["ready"], 20)
                status, body = await readyz()
                assert (status, body["ready"], body["broker"]) == (200, True, True)
        finally:
            await server.stop()
            await ingress.stop()


def alert(n: int, *, ticket: str = "CM-AM", status: str = "firing", **labels: str) -> dict[str, Any]:
    """One alert of a notification, its own fingerprint per ``n``."""
    return {
        "status": status,
        "labels": {"alertname": "ProbeFailure", "ticket_id": ticket, "sub_ticket_id": f"s{n}", **labels},
        "annotations": {},
        "startsAt": "2025-11-28T03:00:00Z",
        "fingerprint": f"{n:016x}",
    }


async def test_skipped_alerts_are_counted_and_lost_failures_warned(
    ingress: str, settings: WorkerSettings
) -> None:
    """Before, a firing alert naming a change that made an invalid event, and the alerts
    Alertmanager cut (truncatedAlerts), were answered 202 with no log and no metric: lost without
    a trace, as Alertmanager takes a 2xx as delivered."""
    alerts = [
        alert(1),
        alert(2, ticket="CM 1/x"),
        alert(3, status="resolved"),
        {**alert(4), "labels": {"alertname": "DiskFull"}},
    ]
    with capture_logs() as logs:
        status, body, text = await post(
            f"{ingress}/v1/alertmanager",
            {"version": "4", "status": "firing", "alerts": alerts, "truncatedAlerts": 2},
            bearer(TOKENS[0]),
        )
    assert status == 202
    assert len(body["event_ids"]) == 1
    assert [(s["index"], s["reason"]) for s in body["skipped"]] == [
        (1, "invalid"),
        (2, "resolved"),
        (3, "no_ticket_labels"),
    ]
    assert "CM 1/x" not in text
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [(w["event"], w.get("index"), w.get("truncated")) for w in warnings] == [
        ("ingest_alert_skipped", 1, None),
        ("ingest_alerts_truncated", None, 2),
    ]
    assert warnings[0]["reason"] == "invalid"
    assert warnings[0]["fingerprint"] == f"{2:016x}"
    assert warnings[0]["error_paths"] == ["$.ticket_id"]
    assert "CM 1/x" not in repr(logs)  # a label value is never logged
    async with aiohttp.ClientSession() as http, http.get(f"{ingress}/metrics") as r:
        metrics = await r.text()
    for reason, count in {
        "invalid": 1,
        "resolved": 1,
        "no_ticket_labels": 1,
        "truncated": 2,
        "not_firing": 0,
    }.items():
        assert (
            f'coc_worker_ingest_skipped_total{{reason="{reason}",route="alertmanager"}} {count}.0' in metrics
        )
    assert await size(settings) == 1


async def test_a_group_over_the_batch_limit_is_produced_in_acknowledged_slices(
    settings: WorkerSettings, broker: TansuBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a group of more alerts than INGEST_MAX_BATCH was refused 413, on every repeat too:
    Alertmanager cannot split a group nor retries a 4xx, so those failures were lost for good."""
    settings = settings.model_copy(update={"ingest_max_body_bytes": 1 << 20, "ingest_max_batch": 500})
    slices: list[int] = []
    send_many = EventProducer.send_many

    async def recorded(self: EventProducer, topic: str, records: Sequence[OutRecord]) -> list[Delivered]:
        slices.append(len(records))
        return await send_many(self, topic, records)

    monkeypatch.setattr(EventProducer, "send_many", recorded)
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, port.set_result))
    try:
        url = f"http://127.0.0.1:{await asyncio.wait_for(port, 20)}"
        group = {"version": "4", "status": "firing", "alerts": [alert(n) for n in range(501)]}
        status, body, _ = await post(f"{url}/v1/alertmanager", group, bearer(TOKENS[0]))
        too_many = [event("change.started", "CM-S", f"s{n}") for n in range(501)]
        events_status, events_body, _ = await post(f"{url}/v1/events", too_many, bearer(TOKENS[0]))
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert status == 202, body
    assert body["skipped"] == []
    assert len(set(body["event_ids"])) == 501
    assert slices == [500, 1]  # each slice acknowledged before the next is sent
    records = await read_topic(
        broker.bootstrap, settings.input_topic, until=lambda r: len(r) >= 501, timeout_s=20
    )
    assert sorted(json.loads(r.value or b"")["event_id"] for r in records) == sorted(body["event_ids"])
    # a client of /v1/events can split its batch: still refused there
    assert (events_status, events_body["error"]) == (413, "too_many_events")
    assert await size(settings) == 501


async def test_a_refusal_on_the_alertmanager_route_is_logged(ingress: str, settings: WorkerSettings) -> None:
    """Alertmanager does not retry a 4xx: whatever the route still refuses is lost, so it is logged."""
    auth = bearer(TOKENS[0])
    big = {"version": "4", "alerts": [alert(n, summary="x" * 100) for n in range(40)]}  # > 4096 bytes
    with capture_logs() as logs:
        status, body, _ = await post(f"{ingress}/v1/alertmanager", big, auth)
        assert (status, body["error"]) == (413, "too_large")
        status, body, _ = await post(f"{ingress}/v1/alertmanager", {"version": "3", "alerts": []}, auth)
        assert (status, body["error"]) == (400, "unsupported_version")
    refused = [(e["code"], e["error"]) for e in logs if e["event"] == "ingest_refused"]
    assert refused == [("413", "too_large"), ("400", "unsupported_version")]
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "ingest_refused")
    assert await size(settings) == 0


async def test_coc_worker_ingest_started_before_the_broker_waits_for_it(tmp_path: Path) -> None:
    """Served alone and started while the broker was away, the ingress exited 1 within a second,
    never serving /healthz: a rollout during an outage crash-looped, the kubelet's back-off
    growing, through the outage it is there to carry alerts across. It now waits as the worker
    does (``startup_wait_s``), alive and saying what for, and takes events once the broker
    answers."""
    port, http_port = free_port(), free_port()
    settings = load_settings(
        kafka_bootstrap_servers=f"127.0.0.1:{port}",
        input_topic="in-late",
        http_host="127.0.0.1",
        http_port=http_port,
        startup_wait_s=60,
        ingest_allow_anonymous=True,
    )
    stop = asyncio.Event()
    taking: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, taking.set_result))
    try:
        base = f"http://127.0.0.1:{http_port}"
        async with aiohttp.ClientSession() as http:

            async def readyz() -> tuple[int, dict[str, Any]]:
                async with http.get(f"{base}/readyz") as r:
                    return r.status, await r.json()

            async def waiting() -> bool:
                try:
                    return (await readyz())[1]["waiting_for"] == "broker"
                except aiohttp.ClientConnectionError:  # not serving yet
                    return False

            await until(waiting, 20, 0.05, what="the wait for the broker")
            async with http.get(f"{base}/healthz") as alive:
                assert alive.status == 200
            status, body = await readyz()
            # not "broker": true while the broker never answered yet
            assert (status, body["ready"], body["broker"]) == (503, False, False)
            assert not task.done()
            with TansuBroker(port=port, log_path=tmp_path / "tansu.log") as late:
                await create_topics(late.bootstrap, ["in-late"], partitions=1)

                async def ready() -> bool:
                    return (await readyz())[0] == 200

                await until(ready, 40, 0.1, what="the ingress to start once the broker answers")
                assert (await readyz())[1]["broker"] is True
                assert await asyncio.wait_for(taking, 5) == http_port
                async with http.post(f"{base}/v1/events", json=event("change.started", "CM1", "s-1")) as sent:
                    assert sent.status == 202
                got = await read_topic(late.bootstrap, "in-late", until=lambda r: len(r) >= 1, timeout_s=30)
                assert json.loads(got[0].value or b"{}")["ticket_id"] == "CM1"
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        stop.set()
        if not task.done():
            await asyncio.gather(asyncio.wait_for(task, 30), return_exceptions=True)
