"""Reliability scenarios: the real worker process under crashes, API faults, outages, cuts, rebalances, load.

Each scenario runs at a reduced size in ``make test`` and at full size in ``make soak``
(``--run-soak -m soak``), which also writes ``docs/reliability.md`` from the results. The harness
(worker processes, TCP proxy, stream, ledger) is in ``tests/faults/``.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from faults import report
from faults.harness import AK, SK, ProxiedBroker, ReadyWatch, Rig, timeline
from faults.ledger import LedgerResult
from faults.proxy import CutMode, TcpProxy
from faults.stream import StreamEvent, make_stream
from waiting import until

from worker.sandbox import TansuBroker, free_port
from worker.settings import WorkerSettings
from worker.simulator import SimulatorConfig, SimulatorServer

REPORT_PATH = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
SIZES = [pytest.param("reduced", id="reduced"), pytest.param("full", id="full", marks=pytest.mark.soak)]
_ORDER = [
    "crash",
    "api-faults",
    "auth-and-outage",
    "broker-and-redis-cut",
    "rebalance-storm",
    "slow-consumer",
]


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> Iterator[list[LedgerResult]]:
    """Every scenario's ledger; at full size (``--run-soak``) written to docs/reliability.md."""
    collected: list[LedgerResult] = []
    yield collected
    full = [r for r in collected if r.size == "full"]
    if request.config.getoption("--run-soak") and full:
        full.sort(key=lambda r: (_ORDER.index(r.scenario.split(" ")[0]), r.scenario))
        report.write(full, REPORT_PATH, repo=REPORT_PATH.parents[1])


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    """The simulator on a fixed port, so a scenario can stop it and start it again at the same URL."""
    config = SimulatorConfig(
        port=free_port(), credentials={AK: SK}, auto_create=True, request_log_size=2_000_000, rng_seed=7
    )
    async with SimulatorServer(config) as server:
        yield server


def chunks(stream: list[StreamEvent], n: int) -> list[list[StreamEvent]]:
    size = -(-len(stream) // n)
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def record(results: list[LedgerResult], result: LedgerResult, size: str, faults: str) -> LedgerResult:
    result.size = size
    result.faults = faults
    results.append(result)  # before any assertion: a failed scenario is reported too
    return result


def assert_ledger(result: LedgerResult, rig: Rig, *, allow: dict[str, str] | None = None) -> None:
    """The ledger holds, but for ``allow`` (figures this scenario only reports). A failure shows the
    timeline of an example event per problem."""
    allow = allow or {}
    result.expected.update(allow)
    print(result.summary())  # shown with -s and in the failure report
    problems = [p for p in result.problems() if p.split("=")[0] not in allow]
    if not problems:
        return
    kinds = {p.split("=")[0] for p in problems}
    evidence = []
    for kind, events in result.example_events.items():
        if kind in kinds and events:
            evidence.append(f"--- {kind}: {events[0]}\n{timeline(rig, events[0])}")
    raise AssertionError(f"ledger broken: {problems}\n{result.summary()}\n" + "\n".join(evidence))


def assert_pauses(result: LedgerResult, rig: Rig, *, injected: tuple[str, ...] = ()) -> None:
    """The worker pauses (``/readyz`` 503) only for the systemic faults the scenario injected
    (this caught the Redis client's pool running dry under a burst of jobs: a healthy store
    declared away)."""
    pauses = rig.pauses()
    if pauses:
        result.notes.append(
            "pauses: " + ", ".join(f"{n}x {why}" for why, n in sorted(pauses.items(), key=lambda kv: -kv[1]))
        )
    unexpected = {why: n for why, n in pauses.items() if why.split(":")[0] not in injected}
    assert not unexpected, f"the worker paused for faults nobody injected: {unexpected}"


def assert_all_applied(
    result: LedgerResult, rig: Rig, *, allow: dict[str, str] | None = None, injected: tuple[str, ...] = ()
) -> None:
    """The ledger holds (but for ``allow``), every message was applied, and the worker paused only
    for the ``injected`` faults."""
    assert_ledger(result, rig, allow=allow)
    assert set(result.outcomes) == {"applied"}, result.outcomes
    assert_pauses(result, rig, injected=injected)


#: Expected ledger problems, by kind, with why (shown in docs/reliability.md).
CRASH_WINDOW_FIGURE = {
    "applied_twice": "re-application inside a crash window (the API applied a ticket.update, the worker was "
    "SIGKILLed before recording it, the redelivered event was sent again): the honest figure, reported",
}


#: A dead owner's claims expire in 8 s (not 30 s), so redelivered events are not held up for long;
#: the worker requires the lease to outlast 2 x (connect + request timeout) + 2 s.
SHORT_LEASE = {
    "COC_WORKER_DEDUP_LEASE_S": "8",
    "COC_WORKER_API_CONNECT_TIMEOUT_S": "1",
    "COC_WORKER_API_REQUEST_TIMEOUT_S": "2",
}


# --- 1. crash -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrashSize:
    tickets: int
    kills: int
    timeout_s: float


CRASH = {"reduced": CrashSize(tickets=160, kills=3, timeout_s=120), "full": CrashSize(1200, 12, 600)}
KILL_MODES = ("random moment", "in the API handler", "after the answer")


@pytest.mark.parametrize(
    ("size", "backend"),
    [
        pytest.param("reduced", "redis", id="reduced-redis"),
        pytest.param("full", "redis", id="full-redis", marks=pytest.mark.soak),
        pytest.param("full", "sqlite", id="full-sqlite", marks=pytest.mark.soak),
    ],
)
async def test_crash_sigkill_at_random_moments(
    size: str,
    backend: str,
    broker: TansuBroker,
    sim: SimulatorServer,
    redis_url: str,
    tmp_path: Path,
    results: list[LedgerResult],
) -> None:
    """SIGKILL the worker again and again (in API calls, inside the API handler after the change
    was applied, and between the answer and the outcome write); restart it each time."""
    cfg = CRASH[size]
    rng = random.Random(11)
    dedup = redis_url if backend == "redis" else f"sqlite:///{tmp_path}/dedup.sqlite3"
    sim.state.set_faults(latency_ms=20, latency_jitter_ms=60)  # so calls are in flight when we kill
    stream = make_stream(cfg.tickets, run=f"crash{backend}", seed=1, subs_per_ticket=2)
    parts = chunks(stream, cfg.kills + 1)
    env = {"COC_WORKER_MAX_IN_FLIGHT": "64", **SHORT_LEASE}
    kills: Counter[str] = Counter()
    recoveries: list[float] = []
    async with Rig(
        f"crash ({backend})",
        bootstrap=broker.bootstrap,
        simulator=sim,
        dedup_url=dedup,
        tmp_path=tmp_path,
        env=env,
    ) as rig:
        await rig.produce(parts[0])
        worker = await rig.spawn()
        for n in range(cfg.kills):
            # let it work a little first, so every kill lands in the middle of the stream
            await rig.wait_applied(rig.applied_count() + 15, cfg.timeout_s)
            mode = KILL_MODES[n % len(KILL_MODES)]
            if mode == "random moment":
                await asyncio.sleep(rng.uniform(0.0, 0.4))  # a random point in time, calls in flight
                worker.kill()
            elif mode == "in the API handler":
                await asyncio.wait_for(rig.kill_on_next_apply(worker), cfg.timeout_s)
            else:
                await asyncio.wait_for(
                    rig.kill_on_next_apply(worker, rng.uniform(0.001, 0.03)), cfg.timeout_s
                )
            rc = await worker.wait(30)
            assert rc == -signal.SIGKILL, (
                f"{worker.name} exited {rc} before the kill ({mode}):\n{worker.tail()}"
            )
            killed = time.monotonic()
            kills[mode] += 1
            await rig.snapshot_commits(f"after kill {n + 1} ({mode})")
            if n + 1 < len(parts):
                await rig.produce(parts[n + 1])
            worker = await rig.restart(worker)
            await rig.wait_applied(rig.applied_count() + 1, cfg.timeout_s)
            recoveries.append(time.monotonic() - killed)  # restart, rejoin, apply again
        for part in parts[cfg.kills + 1 :]:
            await rig.produce(part)
        await rig.wait_finished(cfg.timeout_s)
        await rig.stop_all()
        result = await rig.ledger()
    faults = f"{sum(kills.values())} SIGKILLs (" + ", ".join(f"{v}x {k}" for k, v in kills.items()) + ")"
    record(results, result, size, faults)
    result.recovery_s = max(recoveries)
    result.notes.append(
        f"{backend} dedup store: {result.resent_after_apply} events re-sent to the API after it had "
        f"applied them (crash windows), {result.reapplied_after_outcome} of them after their applied "
        f"outcome was written; kill -> restarted worker applying again: median "
        f"{statistics.median(recoveries):.1f} s, max {max(recoveries):.1f} s (session timeout 2 s)"
    )
    # re-application inside a crash window is the reported figure, not a failure
    assert_all_applied(result, rig, allow=CRASH_WINDOW_FIGURE)


# --- 2. API faults --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiFaultSize:
    tickets: int
    retry_after_s: float
    timeout_s: float


API_FAULTS = {"reduced": ApiFaultSize(200, 0.2, 180), "full": ApiFaultSize(2000, 1.0, 900)}
MAX_ATTEMPTS = 6


@pytest.mark.parametrize("size", SIZES)
async def test_api_faults_every_event_applied_or_failed_after_its_budget(
    size: str, broker: TansuBroker, sim: SimulatorServer, tmp_path: Path, results: list[LedgerResult]
) -> None:
    cfg = API_FAULTS[size]
    faults = {
        "error_ratio": 0.3,
        "throttle_ratio": 0.05,
        "retry_after_s": cfg.retry_after_s,
        "latency_ms": 5,
        "latency_jitter_ms": 20,
        "spike_ratio": 0.05,
        "spike_ms": 1500,  # past the request timeout: a read timeout, fate unknown
        "hang_ratio": 0.02,
        "hang_s": 30,
        "drop_ratio": 0.03,
        "drop_after_apply_ratio": 0.03,
    }
    sim.state.set_faults(**faults)
    stream = make_stream(cfg.tickets, run="api", seed=2, subs_per_ticket=2)
    env = {
        "COC_WORKER_API_REQUEST_TIMEOUT_S": "1",
        "COC_WORKER_RETRY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "COC_WORKER_RETRY_MAX_ELAPSED_S": "120",
    }
    dedup = f"sqlite:///{tmp_path}/dedup.sqlite3"
    async with Rig(
        "api-faults", bootstrap=broker.bootstrap, simulator=sim, dedup_url=dedup, tmp_path=tmp_path, env=env
    ) as rig:
        await rig.produce(stream)
        await rig.spawn()
        await rig.wait_finished(cfg.timeout_s)
        await rig.stop_all()
        await sim.stop()  # releases the hung requests, so the request log has every attempt
        result = await rig.ledger()
        outcomes = [o for o in map(_json, rig.outcomes.records) if not o.get("redelivered")]
    injected = dict(sim.state.fault_counts)
    record(
        results,
        result,
        size,
        f"30% 5xx, 5% 429 (Retry-After {cfg.retry_after_s}s), 5% 1.5 s spikes, 2% hangs, 3% drops, "
        f"3% drops after apply; request timeout 1 s, {MAX_ATTEMPTS} attempts; injected: "
        + ", ".join(f"{k} {v}" for k, v in sorted(injected.items())),
    )
    # the retry budget: never more PUTs for one event than attempts allowed, and `failed` only when spent
    puts = Counter(q.event_id for q in sim.state.requests if q.method == "PUT" and q.event_id)
    # an event's first retry is logged at info (the later ones at debug; some of them start by
    # reading the ticket to settle a lost answer)
    retries = Counter(line["event_id"] for w in rig.workers for line in w.events("api_retry"))
    assert max(puts.values()) <= MAX_ATTEMPTS, puts.most_common(3)
    by_ticket: dict[str, list[dict[str, Any]]] = {}
    for o in sorted(outcomes, key=lambda o: o["event_id"]):
        by_ticket.setdefault(o["ticket_id"], []).append(o)
    for o in outcomes:
        if o["status"] == "failed":
            # the worker says it spent the budget and its log shows it retried (that the API saw
            # no more is the max(puts) check above: a request whose client timed out during a
            # latency spike is never recorded)
            assert o["attempts"] == MAX_ATTEMPTS, o
            assert retries[o["event_id"]] >= 1, o
        elif o["status"] == "rejected":
            # only the refusal of a step whose predecessor (same ticket) failed: the state machine's
            earlier = [p for p in by_ticket[o["ticket_id"]] if _seq(p) < _seq(o)]
            assert any(p["status"] in ("failed", "rejected") for p in earlier), o
        else:
            assert o["status"] == "applied", o
    result.notes.append(
        f"failed after the full budget of {MAX_ATTEMPTS} attempts: {result.outcomes['failed']}; "
        f"rejected only as the state machine's refusal after a failed predecessor: {result.outcomes['rejected']}; "
        f"max PUTs for one event: {max(puts.values())}"
    )
    assert_ledger(result, rig)
    assert_pauses(result, rig, injected=("api_unreachable",))


def _json(record_: Any) -> dict[str, Any]:
    return json.loads(record_.value)


def _seq(outcome: dict[str, Any]) -> int:
    return int(outcome["event_id"].rsplit(":", 1)[1])


# --- 3. credentials revoked, API unreachable ------------------------------------------------------------
@dataclass(frozen=True)
class OutageSize:
    tickets: int
    storm_s: float
    outage_s: float
    unreachable_threshold_s: float
    timeout_s: float


OUTAGE = {"reduced": OutageSize(150, 3, 5, 1.5, 120), "full": OutageSize(1000, 30, 30, 10, 600)}


@pytest.mark.parametrize("size", SIZES)
async def test_credentials_revoked_and_api_unreachable_pause_and_resume(
    size: str,
    broker: TansuBroker,
    sim: SimulatorServer,
    redis_url: str,
    tmp_path: Path,
    results: list[LedgerResult],
) -> None:
    cfg = OUTAGE[size]
    sim.state.set_faults(latency_ms=5, latency_jitter_ms=20)
    stream = make_stream(cfg.tickets, run="outage", seed=3, subs_per_ticket=2)
    a, b, c = chunks(stream, 3)
    env = {"COC_WORKER_API_UNREACHABLE_THRESHOLD_S": str(cfg.unreachable_threshold_s)}
    async with Rig(
        "auth-and-outage",
        bootstrap=broker.bootstrap,
        simulator=sim,
        dedup_url=redis_url,
        tmp_path=tmp_path,
        env=env,
    ) as rig:
        await rig.produce(a)
        worker = await rig.spawn()
        await rig.wait_applied(20, cfg.timeout_s)
        with ReadyWatch(worker, rig.http) as watch:
            # 401 storm: every credential refused
            start = time.monotonic()
            sim.state.revoke(True)
            paused = await rig.wait_ready(worker, False, 30)
            await rig.produce(b)
            await asyncio.sleep(cfg.storm_s)  # hold the fault
            before = rig.applied_count()
            sim.state.revoke(False)
            fixed = time.monotonic()
            ready_at = await rig.wait_ready(worker, True, 60)
            await rig.wait_applied(before + 1, 60)
            auth_recovery = max(ready_at, time.monotonic()) - fixed
            auth = (paused - start, watch.not_ready_s(paused, fixed), fixed - paused)

            # the API unreachable: the server is gone, connections refused
            await rig.wait_applied(before + 20, cfg.timeout_s)
            await sim.stop()
            start = time.monotonic()
            await rig.produce(c)
            paused = await rig.wait_ready(worker, False, cfg.unreachable_threshold_s + 30)
            await asyncio.sleep(max(0.0, cfg.outage_s - (time.monotonic() - start)))  # hold the fault
            before = rig.applied_count()
            await sim.start()  # same port, same state
            fixed = time.monotonic()
            ready_at = await rig.wait_ready(worker, True, 120)
            await rig.wait_applied(before + 1, 120)
            outage_recovery = max(ready_at, time.monotonic()) - fixed
            down = (paused - start, watch.not_ready_s(paused, fixed), fixed - paused)

        await rig.wait_finished(cfg.timeout_s)
        assert worker.alive, "the worker must resume by itself"
        assert len(rig.workers) == 1, "the worker must resume without a restart"
        await rig.stop_all()
        result = await rig.ledger()
    record(
        results,
        result,
        size,
        f"credentials revoked {cfg.storm_s:.0f} s (401 storm), API server down {cfg.outage_s:.0f} s "
        f"(unreachable threshold {cfg.unreachable_threshold_s} s)",
    )
    result.recovery_s = max(auth_recovery, outage_recovery)
    for name, (detect, not_ready, window), recovery in (
        ("401 storm", auth, auth_recovery),
        ("API down", down, outage_recovery),
    ):
        result.notes.append(
            f"{name}: /readyz 503 {detect:.1f} s after the fault began and for {not_ready:.1f} s of the "
            f"{window:.1f} s after that; ready and applying {recovery:.1f} s after the fault ended, no restart"
        )
        assert not_ready >= window - 1.0, f"/readyz did not stay 503 during the {name}"
    assert_all_applied(result, rig, injected=("api_auth", "api_unreachable"))
    assert result.dlq_records == 0


# --- 4. broker connection cut, dedup store cut ----------------------------------------------------------
@dataclass(frozen=True)
class CutSize:
    tickets: int
    broker_cut_s: float
    redis_cut_s: float
    #: "refuse": connections closed, new ones refused; "blackhole": nothing forwarded, no error
    modes: tuple[CutMode, ...]
    timeout_s: float


CUT = {
    "reduced": CutSize(150, 5, 4, ("refuse",), 120),
    "full": CutSize(1000, 20, 20, ("refuse", "blackhole"), 600),
}


@pytest.mark.parametrize("size", SIZES)
async def test_broker_and_dedup_store_cut_recover_without_restart(
    size: str, sim: SimulatorServer, redis_url: str, tmp_path: Path, results: list[LedgerResult]
) -> None:
    cfg = CUT[size]
    sim.state.set_faults(latency_ms=5, latency_jitter_ms=20)
    stream = make_stream(cfg.tickets, run="cut", seed=4, subs_per_ticket=2)
    parts = iter(chunks(stream, 1 + 3 * len(cfg.modes)))
    real_redis = urlsplit(redis_url)
    redis_proxy = TcpProxy(real_redis.hostname or "127.0.0.1", real_redis.port or 6379)
    recoveries: dict[str, float] = {}
    notes: list[str] = []
    async with ProxiedBroker(tmp_path / "tansu.log") as pb, redis_proxy:
        dedup = redis_url.replace(f"{real_redis.hostname}:{real_redis.port}", redis_proxy.address)
        async with Rig(
            "broker-and-redis-cut", bootstrap=pb.bootstrap, simulator=sim, dedup_url=dedup, tmp_path=tmp_path
        ) as rig:
            await rig.produce(next(parts))
            worker = await rig.spawn()
            await rig.wait_applied(20, cfg.timeout_s)
            assert pb.proxy.stats.bytes_down > 0, "Kafka traffic must cross the proxy"
            assert redis_proxy.stats.bytes_down > 0, "Redis traffic must cross the proxy"
            with ReadyWatch(worker, rig.http) as watch:
                for mode in cfg.modes:
                    # the broker cut off
                    cut = time.monotonic()
                    await pb.proxy.cut(mode)
                    await asyncio.sleep(cfg.broker_cut_s)  # hold the fault
                    await pb.proxy.restore()
                    fixed, fixed_wall = time.monotonic(), time.time()
                    await rig.produce(next(parts))
                    await rig.wait_ready(worker, True, 120)
                    await _wait_outcome_after(rig, fixed_wall, 180)
                    recoveries[f"broker {mode}"] = time.monotonic() - fixed
                    notes.append(
                        f"broker {mode} {cfg.broker_cut_s:.0f} s: /readyz 503 for "
                        f"{watch.not_ready_s(cut, fixed):.1f} s of it, recovered in "
                        f"{recoveries[f'broker {mode}']:.1f} s"
                    )

                    # the dedup store cut off while there is work: pause, never apply without it
                    await rig.produce(next(parts))
                    await rig.wait_applied(rig.applied_count() + 10, cfg.timeout_s)
                    cut = time.monotonic()
                    await redis_proxy.cut(mode)
                    await rig.produce(next(parts))
                    await rig.wait_ready(worker, False, 30)
                    await _api_calls_answered(sim)  # calls that had their claim may still land
                    settled = rig.applied_count()
                    await asyncio.sleep(max(0.0, cfg.redis_cut_s - 1.0))  # hold the fault
                    applied_while_away = rig.applied_count() - settled
                    await redis_proxy.restore()
                    fixed = time.monotonic()
                    await rig.wait_ready(worker, True, 120)
                    await rig.wait_applied(rig.applied_count() + 1, 120)
                    recoveries[f"Redis {mode}"] = time.monotonic() - fixed
                    notes.append(
                        f"Redis {mode} {cfg.redis_cut_s:.0f} s: /readyz 503 for {watch.not_ready_s(cut, fixed):.1f} s "
                        f"of it, applied while away (once the calls in flight were answered): {applied_while_away}, "
                        f"recovered in {recoveries[f'Redis {mode}']:.1f} s"
                    )
                    assert applied_while_away == 0, f"applied events while the dedup store was away ({mode})"

            await rig.wait_finished(cfg.timeout_s)
            assert worker.alive, "the worker must survive the cuts"
            assert len(rig.workers) == 1, "recovery must not need a restart"
            await rig.stop_all()
            result = await rig.ledger()
    record(
        results,
        result,
        size,
        f"TCP proxy cuts ({', '.join(cfg.modes)}): broker {cfg.broker_cut_s:.0f} s, Redis {cfg.redis_cut_s:.0f} s, "
        "without restarting the worker",
    )
    result.recovery_s = max(recoveries.values())
    result.notes.extend(notes)
    assert_all_applied(result, rig, injected=("broker_unavailable", "dedup_unavailable"))


async def _api_calls_answered(sim: SimulatorServer, timeout_s: float = 30.0) -> None:
    """Wait until the API calls the worker made before it paused have landed: no request in progress
    at the simulator (counted on arrival, recorded once answered), and none arrived since the look
    before (0.1 s earlier: a request on its way there at one look is seen at the next). Paused, the
    worker sends nothing new: every call waits at its gate, and the dedup store's probe is not a call
    to the API."""
    state = sim.state
    last = -1

    def quiet() -> bool:
        nonlocal last
        arrived, before = state.arrived, last
        last = arrived
        return arrived == before == state.stats()["requests_total"]

    await until(quiet, timeout_s, 0.1, what="the API calls in flight to be answered")


async def _wait_outcome_after(rig: Rig, wall: float, timeout_s: float) -> None:
    def newer() -> bool:
        return any(
            datetime.fromisoformat(_json(r)["finished_at"]).timestamp() > wall
            for r in rig.outcomes.records[-50:]
        )

    await rig.outcomes.until(newer, timeout_s, "an outcome written after the fault")


# --- 5. rebalance storm ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StormSize:
    tickets: int
    actions: int
    timeout_s: float


STORM = {"reduced": StormSize(300, 8, 180), "full": StormSize(2000, 40, 900)}


@pytest.mark.parametrize("size", SIZES)
async def test_rebalance_storm_workers_join_and_leave(
    size: str,
    broker: TansuBroker,
    sim: SimulatorServer,
    redis_url: str,
    tmp_path: Path,
    results: list[LedgerResult],
) -> None:
    cfg = STORM[size]
    rng = random.Random(5)
    sim.state.set_faults(latency_ms=10, latency_jitter_ms=40)
    stream = make_stream(cfg.tickets, run="storm", seed=5, subs_per_ticket=2)
    parts = chunks(stream, cfg.actions + 1)
    env = {"COC_WORKER_MAX_IN_FLIGHT": "64", **SHORT_LEASE}
    actions: Counter[str] = Counter()
    exits: list[asyncio.Task[int]] = []
    async with Rig(
        "rebalance-storm",
        bootstrap=broker.bootstrap,
        simulator=sim,
        dedup_url=redis_url,
        tmp_path=tmp_path,
        partitions=8,
        env=env,
    ) as rig:
        await rig.produce(parts[0])
        await rig.spawn()
        await rig.spawn(wait_assigned=False)
        for n in range(cfg.actions):
            await asyncio.sleep(rng.uniform(1.0, 3.0))  # let the group settle a little, or not
            alive = rig.alive
            if len(alive) < 3 and (len(alive) == 1 or rng.random() < 0.4):
                await rig.spawn(wait_assigned=False)
                actions["joined"] += 1
            else:
                victim = rng.choice(alive)
                if rng.random() < 0.5:
                    victim.terminate()
                    exits.append(asyncio.create_task(victim.wait(60)))
                    actions["left (SIGTERM)"] += 1
                else:
                    victim.kill()
                    await victim.wait(30)
                    actions["killed (SIGKILL)"] += 1
            if n + 1 < len(parts):
                await rig.produce(parts[n + 1])
        if not rig.alive:
            await rig.spawn(wait_assigned=False)
        await rig.wait_finished(cfg.timeout_s)
        codes = await asyncio.gather(*exits)
        await rig.snapshot_commits("after the storm")
        await rig.stop_all()
        result = await rig.ledger()
    record(
        results,
        result,
        size,
        f"{sum(actions.values())} membership changes among up to 3 workers ("
        + ", ".join(f"{v}x {k}" for k, v in sorted(actions.items()))
        + ")",
    )
    assert all(code == 0 for code in codes), codes
    # the SIGKILLs open crash windows: the same reported figure as scenario 1, when hit
    assert_all_applied(result, rig, allow=CRASH_WINDOW_FIGURE)


# --- 6. slow consumer -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BacklogSize:
    messages: int
    latency_ms: float
    slow_for_s: float | None  # None: slow to the end
    timeout_s: float


BACKLOG = {
    "reduced": BacklogSize(8_000, 100, 10, 240),
    "full": BacklogSize(100_000, 100, None, 1200),
}
RSS_LIMIT_BYTES = 400 * 2**20
MAX_IN_FLIGHT = 256
BUFFER_LIMIT = WorkerSettings(max_in_flight=MAX_IN_FLIGHT).buffer_limit  # the worker runs with the defaults


@pytest.mark.parametrize("size", SIZES)
async def test_slow_consumer_backlog_keeps_memory_bounded(
    size: str,
    broker: TansuBroker,
    sim: SimulatorServer,
    redis_url: str,
    tmp_path: Path,
    results: list[LedgerResult],
) -> None:
    cfg = BACKLOG[size]
    sim.state.set_faults(latency_ms=cfg.latency_ms, latency_jitter_ms=cfg.latency_ms / 2)
    stream = make_stream(cfg.messages // 4, run="backlog", seed=6)[: cfg.messages]
    async with Rig(
        "slow-consumer",
        bootstrap=broker.bootstrap,
        simulator=sim,
        dedup_url=redis_url,
        tmp_path=tmp_path,
        partitions=8,
    ) as rig:
        await rig.produce(stream)
        worker = await rig.spawn()
        started = time.monotonic()
        in_flight_peak = running_peak = 0
        slow_until = time.monotonic() + (cfg.slow_for_s if cfg.slow_for_s is not None else 1e9)
        deadline = time.monotonic() + cfg.timeout_s
        rss_while_slow = 0
        while rig.finished() < len(stream):
            assert time.monotonic() < deadline, f"backlog not drained in {cfg.timeout_s}s: {rig.finished()}"
            answer = await worker.ready(rig.http)
            if answer is not None:
                in_flight_peak = max(in_flight_peak, int(answer[1].get("in_flight", 0)))
                running_peak = max(running_peak, int(answer[1].get("running", 0)))
            if time.monotonic() < slow_until:
                rss_while_slow = worker.peak_rss
            elif sim.state.faults.latency_ms:
                sim.state.set_faults(latency_ms=0, latency_jitter_ms=0)  # drain the rest quickly
            await rig.outcomes.poll(200)
        await rig.stop_all()
        result = await rig.ledger()
        durations = sorted(_json(r)["duration_ms"] / 1000 for r in rig.outcomes.records)
        elapsed = time.monotonic() - started
    slow = "the whole run" if cfg.slow_for_s is None else f"the first {cfg.slow_for_s:.0f} s"
    record(
        results,
        result,
        size,
        f"{cfg.messages} messages backlog, API latency {cfg.latency_ms:.0f}-{cfg.latency_ms * 1.5:.0f} ms for {slow}",
    )
    result.notes.append(
        f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB (while slow {rss_while_slow / 2**20:.0f} MiB), "
        f"peak taken {in_flight_peak} (max {BUFFER_LIMIT}), running {running_peak} (max {MAX_IN_FLIGHT}); "
        f"{len(stream) / elapsed:.0f} msg/s; time from "
        f"fetch to outcome p50 {durations[len(durations) // 2]:.2f} s, p99 {durations[len(durations) * 99 // 100]:.2f} s, "
        f"max {durations[-1]:.2f} s"
    )
    assert in_flight_peak <= BUFFER_LIMIT
    assert 0 < running_peak <= MAX_IN_FLIGHT
    assert result.peak_rss_bytes < RSS_LIMIT_BYTES
    assert_all_applied(result, rig)
