"""``make demo``: the whole system on one machine, a scripted scenario, a readable report, exit 0.

Starts a real Kafka-protocol broker (Tansu), the COC API simulator with seeded tickets and the
worker (sqlite dedup in a temporary directory, the embedded default), then plays:

* a deploy system (Argo CD) starting, ending and succeeding a change;
* another (Spinnaker) starting and cancelling one;
* a monitoring system (Alertmanager) reporting a failed change with its rollback;
* one duplicate and one malformed message;
* and a short burst to measure events per second.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from worker.app import Worker
from worker.logs import configure
from worker.sandbox import TansuBroker, create_topics, produce, read_topic
from worker.settings import WorkerSettings
from worker.simulator import SimulatorConfig, SimulatorServer

AK, SK = "demo-ak", "demo-sk-0123456789abcdef"
TOPICS = {"input": "coc.change-events", "results": "coc.change-outcomes", "dlq": "coc.change-events.dlq"}
#: Sub-ticket ids as the API gives them (UUIDs, not the regions' names).
SUB_1, SUB_2, SUB_3 = (
    "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
    "3b1c0d7e-5a42-4f0e-9d6b-8c2e1f4a7b90",
    "9f8e7d6c-1b2a-4c3d-8e9f-0a1b2c3d4e5f",
)
SEED: dict[str, list[dict[str, Any]]] = {
    "tickets": [
        {"ticket_id": "CM202511280001", "sub_tickets": [SUB_1]},
        {"ticket_id": "CM202511280002", "sub_tickets": [SUB_2]},
        {"ticket_id": "CM202511280003", "sub_tickets": [SUB_3]},
    ]
}
BURST_TICKETS, BURST_PER_TICKET = 300, 3
BURST_EVENTS = BURST_TICKETS * BURST_PER_TICKET
#: How long the scenario's outcomes are waited for.
OUTCOMES_TIMEOUT_S = 60.0
BURST_TIMEOUT_S = 120.0


def _scenario() -> list[tuple[str, dict[str, Any] | bytes]]:
    """(who, event) in the order the systems emit them."""
    t1, t2, t3 = (str(t["ticket_id"]) for t in SEED["tickets"])
    success = {
        "event_id": "argo-7f3a-result",
        "type": "change.succeeded",
        "ticket_id": t1,
        "sub_ticket_id": SUB_1,
        "source": "argo-cd",
        "result": {"is_verified_in_change_time": True, "comment": "Rollout healthy."},
    }
    return [
        ("argo-cd", _ev("argo-7f3a-start", "change.started", t1, SUB_1, "argo-cd")),
        ("argo-cd", _ev("argo-7f3a-end", "change.ended", t1, SUB_1, "argo-cd")),
        ("argo-cd", success),
        ("spinnaker", _ev("spin-91-start", "change.started", t2, SUB_2, "spinnaker")),
        (
            "spinnaker",
            {
                **_ev("spin-91-cancel", "change.cancelled", t2, SUB_2, "spinnaker"),
                "result": {"comment": "Pipeline aborted by operator."},
            },
        ),
        ("argo-cd", _ev("argo-c4-start", "change.started", t3, SUB_3, "argo-cd")),
        ("argo-cd", _ev("argo-c4-end", "change.ended", t3, SUB_3, "argo-cd")),
        (
            "alertmanager",
            {
                **_ev("am-fp-8c1d2e", "change.failed", t3, SUB_3, "alertmanager"),
                "result": {
                    "comment": "HighErrorRate firing after the change.",
                    "change_fail_type": "fr_dependent_service_issue",
                    "rollback_start_time": 1764300000000,
                    "rollback_end_time": 1764300300000,
                    "is_rollback_success": True,
                    "is_monitor_found": True,
                },
            },
        ),
        ("argo-cd (retry)", success),
        ("broken script", b'{"event_id": "oops", "type": "change.started", "ticket_id": "CM/../x"'),
    ]


def _ev(event_id: str, kind: str, ticket: str, sub: str, source: str) -> dict[str, Any]:
    return {"event_id": event_id, "type": kind, "ticket_id": ticket, "sub_ticket_id": sub, "source": source}


def _encode(item: dict[str, Any] | bytes) -> tuple[bytes | None, bytes, None]:
    if isinstance(item, bytes):
        return None, item, None
    return item["ticket_id"].encode(), json.dumps(item).encode(), None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


async def run_demo(verbose: bool = False) -> int:
    configure("INFO" if verbose else "WARNING", "console")
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="coc-demo-") as tmp,
        TansuBroker(log_path=Path(tmp) / "tansu.log") as broker,
    ):
        await create_topics(broker.bootstrap, list(TOPICS.values()), partitions=6)
        config = SimulatorConfig(credentials={AK: SK}, seed=SEED, auto_create=True, rng_seed=1)
        config.faults = config.faults.updated(latency_ms=5, latency_jitter_ms=10)
        async with SimulatorServer(config) as sim:
            settings = demo_settings(
                kafka_bootstrap_servers=broker.bootstrap,
                input_topic=TOPICS["input"],
                results_topic=TOPICS["results"],
                dlq_topic=TOPICS["dlq"],
                api_endpoint=sim.url,
                api_ak=AK,
                api_sk=SK,
                dedup_url=f"sqlite:///{tmp}/dedup.sqlite3",
                http_host="127.0.0.1",
                http_port=0,
                kafka_session_timeout_ms=2000,
                kafka_heartbeat_interval_ms=300,
                kafka_fetch_max_wait_ms=20,
                worker_id="demo-worker",
                shutdown_grace_s=5.0,  # a demo that went wrong must not hold the terminal for long
            )
            worker = Worker(settings)
            task = asyncio.create_task(worker.run())
            try:
                await _until(lambda: worker.ready or task.done(), 30)
                if task.done():
                    task.result()
                print(
                    f"broker {broker.bootstrap} | simulator {sim.url} | worker /metrics on :{worker.http_port}"
                    " (while the demo runs)\n"
                )
                scenario = _scenario()
                await produce(broker.bootstrap, TOPICS["input"], [_encode(item) for _, item in scenario])
                outcomes = await _outcomes(broker.bootstrap, len(scenario))
                if len(outcomes) < len(scenario):
                    return _incomplete(f"{len(outcomes)} of {len(scenario)} outcomes", OUTCOMES_TIMEOUT_S)
                _print_scenario(scenario, outcomes)
                _print_tickets(sim)
                dead = await read_topic(
                    broker.bootstrap, TOPICS["dlq"], until=lambda r: len(r) >= 1, timeout_s=10
                )
                print(f"\nDead-letter topic: {len(dead)} record(s): ", end="")
                print(
                    ", ".join(
                        f"{(r.header('coc-dlq-reason') or b'').decode()}"
                        f" ({(r.header('coc-dlq-error') or b'').decode()[:90]})"
                        for r in dead
                    )
                )
                done, rate = await _burst(broker.bootstrap, len(scenario))
                if done < BURST_EVENTS:
                    return _incomplete(f"{done} of the burst's {BURST_EVENTS} outcomes", BURST_TIMEOUT_S)
                print(
                    f"\nBurst: {BURST_EVENTS} events on {BURST_TICKETS} tickets "
                    f"(API latency 5-15 ms) -> {rate:,.0f} events/s end to end"
                )
            finally:
                worker.stop()
                await asyncio.wait_for(task, 60)
    print(f"\nDemo finished in {time.monotonic() - started:.1f}s; everything stopped.")
    return 0


class _OwnValuesOnly(WorkerSettings):
    """Settings from the values given, never from the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def demo_settings(**values: Any) -> WorkerSettings:
    """The demo's worker runs on its own broker, simulator and values: a ``COC_WORKER_*`` variable
    left in the user's shell (the README's SASL example, a Redis URL) pointed it elsewhere, or
    stopped it as an unknown setting."""
    return _OwnValuesOnly(**values)


def _incomplete(what: str, timeout_s: float) -> int:
    """The demo's exit status when the worker did not finish its part: it must not pass as a run."""
    print(
        f"\nDemo incomplete: {what} within {timeout_s:g} s. Run `coc-worker demo --verbose` for the"
        " worker's log.",
        file=sys.stderr,
    )
    return 1


async def _until(predicate: Any, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("the demo worker did not become ready")
        await asyncio.sleep(0.05)


async def _outcomes(bootstrap: str, count: int) -> list[dict[str, Any]]:
    records = await read_topic(
        bootstrap, TOPICS["results"], until=lambda r: len(r) >= count, timeout_s=OUTCOMES_TIMEOUT_S
    )
    return [json.loads(r.value or b"{}") for r in records]


def _print_scenario(
    scenario: list[tuple[str, dict[str, Any] | bytes]], outcomes: list[dict[str, Any]]
) -> None:
    by_source = {(o["source"]["partition"], o["source"]["offset"]): o for o in outcomes}
    ordered = sorted(by_source.values(), key=lambda o: o["received_at"])
    senders: dict[str, list[str]] = {}
    for who, item in scenario:
        if isinstance(item, dict):
            senders.setdefault(item["event_id"], []).append(who)
    rows = []
    for o in ordered:
        queue = senders.get(o["event_id"] or "", [])
        who = queue.pop(0) if queue else "broken script"
        detail = o["reason"] or ""
        if o["status"] == "applied":
            detail = f"HTTP {o['http_status']}"
        elif o["error_msg"]:
            detail = f"{o['reason']}: {o['error_msg'][:60]}"
        target = f"{o['ticket_id'] or '-'}/{o['sub_ticket_id'] or '-'}"
        rows.append([who, o["type"] or "?", target, o["status"], str(o["attempts"]), detail])
    print("Outcomes (one per message, from the results topic):")
    print(_table(rows, ["from", "event", "ticket/sub-ticket", "status", "calls", "detail"]))


def _print_tickets(sim: SimulatorServer) -> None:
    rows = []
    for ticket_id in (str(t["ticket_id"]) for t in SEED["tickets"]):
        ticket = sim.state.tickets[ticket_id]
        for sub in ticket.sub_tickets.values():
            rows.append([ticket_id, sub.ticket_id, str(sub.state), str(sub.change_result or "")])
    print("\nSimulator's final ticket states:")
    print(_table(rows, ["ticket", "sub-ticket", "state", "change_result"]))


async def _burst(bootstrap: str, already: int) -> tuple[int, float]:
    """(outcomes of the burst read within the time allowed, its events per second)"""
    events = []
    for n in range(BURST_TICKETS):
        ticket = f"CMBURST{n:05d}"
        for kind in ("change.started", "change.ended", "change.succeeded")[:BURST_PER_TICKET]:
            events.append(_encode(_ev(f"burst-{n}-{kind}", kind, ticket, "region-1", "demo")))
    t0 = time.monotonic()
    await produce(bootstrap, TOPICS["input"], events)
    total = already + len(events)
    records = await read_topic(
        bootstrap, TOPICS["results"], until=lambda r: len(r) >= total, timeout_s=BURST_TIMEOUT_S
    )
    return len(records) - already, len(events) / (time.monotonic() - t0)
