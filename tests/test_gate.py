"""The systemic gate: a trip closes it, probers retry with backoff, every cause must clear to reopen."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs
from waiting import until

from worker import gate as gate_module
from worker.errors import ApiAuthError, ApiTransientError, ApiUnreachable, DedupUnavailable
from worker.gate import Gate
from worker.logs import bind_message_context, configure, register_secrets
from worker.metrics import Metrics

BASE_S, CAP_S = 0.01, 0.04


class Probe:
    """A probe that fails until ``heal()``; records when it ran. ``crash`` raises a non-worker error."""

    def __init__(self, crash: int = 0) -> None:
        self.healthy = False
        self.crash = crash
        self.at: list[float] = []

    def heal(self) -> None:
        self.healthy = True

    async def __call__(self) -> None:
        self.at.append(asyncio.get_running_loop().time())
        if len(self.at) <= self.crash:
            raise RuntimeError("probe bug")
        if not self.healthy:
            raise ApiTransientError("still down", connect_failure=True)


def auth_error() -> ApiAuthError:
    return ApiAuthError("HTTP 401: credentials refused (APIGW.0301)", http_status=401)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def gate(metrics: Metrics) -> AsyncIterator[Gate]:
    gate = Gate(metrics, probe_base_s=BASE_S, probe_max_s=CAP_S)
    yield gate
    await gate.close()


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float]]:
    """What the probers ask of their sleep, in order: ``(attempt, seconds)`` as ``backoff_delay``
    computed it (the gate sleeps exactly that long before each probe)."""
    asked: list[tuple[int, float]] = []
    compute = gate_module.backoff_delay

    def recorded(
        attempt: int, base_s: float, cap_s: float, draw: Callable[[], float] = random.random
    ) -> float:
        delay = compute(attempt, base_s, cap_s, draw)
        asked.append((attempt, delay))
        return delay

    monkeypatch.setattr(gate_module, "backoff_delay", recorded)
    return asked


def in_jitter_range(asked: list[float], ceilings: list[float]) -> bool:
    """Each wait in [ceiling/2, ceiling]: the gate's jitter draws from [0.5, 1)."""
    return len(asked) == len(ceilings) and all(c / 2 <= d <= c for d, c in zip(asked, ceilings, strict=True))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def probers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("probe-") and not t.done()]


async def test_an_open_gate_does_not_wait(gate: Gate, metrics: Metrics) -> None:
    assert gate.is_open
    assert gate.causes == []
    assert await gate.wait_open() == 0.0
    assert sample(metrics, "coc_worker_paused") == 0.0


async def test_trip_closes_and_waiters_resume_when_the_probe_passes(gate: Gate, metrics: Metrics) -> None:
    probe = Probe()
    gate.trip(auth_error(), probe)
    assert not gate.is_open
    assert gate.causes == ["api_auth"]
    assert sample(metrics, "coc_worker_paused") == 1.0
    assert sample(metrics, "coc_worker_pauses_total", kind="api_auth") == 1.0

    waiters = [asyncio.create_task(gate.wait_open()) for _ in range(3)]
    await until(lambda: len(probe.at) >= 3)
    assert not any(w.done() for w in waiters)

    probe.heal()
    waited = await asyncio.wait_for(asyncio.gather(*waiters), timeout=2.0)
    assert all(w > 0 for w in waited)
    assert gate.is_open
    assert gate.causes == []
    assert sample(metrics, "coc_worker_paused") == 0.0
    assert probers() == []


async def test_probe_backs_off_up_to_the_cap(gate: Gate, backoffs: list[tuple[int, float]]) -> None:
    probe = Probe()
    tripped = asyncio.get_running_loop().time()
    gate.trip(ApiUnreachable("no connection"), probe)
    await until(lambda: len(probe.at) >= 6)
    probe.heal()
    await asyncio.wait_for(gate.wait_open(), timeout=2.0)
    # Each wait asked is in [ceiling/2, ceiling), the ceiling doubling from BASE_S up to CAP_S
    # (capped: 10, 20, 40, 40, 40, 40 ms), one per probe, after each failed probe.
    assert [attempt for attempt, _ in backoffs[:6]] == [1, 2, 3, 4, 5, 6]
    asked = [delay for _, delay in backoffs[:6]]
    ceilings = [min(CAP_S, BASE_S * 2**n) for n in range(6)]
    assert in_jitter_range(asked, ceilings), (asked, ceilings)
    # ... and each was slept: a probe comes at least that long after the one before it
    gaps = [b - a for a, b in zip([tripped, *probe.at], probe.at, strict=False)][:6]
    assert all(gap >= delay - 0.001 for gap, delay in zip(gaps, asked, strict=True)), (gaps, asked)


async def test_every_cause_must_clear(gate: Gate, metrics: Metrics) -> None:
    auth, dedup = Probe(), Probe()
    gate.trip(auth_error(), auth)
    gate.trip(DedupUnavailable("redis is away"), dedup)
    assert gate.causes == ["api_auth", "dedup_unavailable"]
    waiter = asyncio.create_task(gate.wait_open())

    auth.heal()
    await until(lambda: gate.causes == ["dedup_unavailable"])
    await until(lambda: len(dedup.at) >= 2)
    assert not gate.is_open
    assert not waiter.done()
    assert sample(metrics, "coc_worker_paused") == 1.0

    dedup.heal()
    await asyncio.wait_for(waiter, timeout=2.0)
    assert gate.is_open
    assert sample(metrics, "coc_worker_paused") == 0.0
    assert sample(metrics, "coc_worker_pauses_total", kind="api_auth") == 1.0
    assert sample(metrics, "coc_worker_pauses_total", kind="dedup_unavailable") == 1.0


async def test_a_second_trip_of_an_open_cause_changes_nothing(gate: Gate, metrics: Metrics) -> None:
    first, second = Probe(), Probe()
    gate.trip(auth_error(), first)
    gate.trip(auth_error(), second)
    assert len(probers()) == 1
    await until(lambda: len(first.at) >= 2)
    first.heal()
    await asyncio.wait_for(gate.wait_open(), timeout=2.0)
    assert second.at == []
    assert sample(metrics, "coc_worker_pauses_total", kind="api_auth") == 1.0


async def test_the_same_cause_can_pause_again_after_resuming(gate: Gate, metrics: Metrics) -> None:
    for round_ in (1, 2):
        probe = Probe()
        gate.trip(auth_error(), probe)
        assert not gate.is_open
        probe.heal()
        await asyncio.wait_for(gate.wait_open(), timeout=2.0)
        assert sample(metrics, "coc_worker_pauses_total", kind="api_auth") == round_
    assert sample(metrics, "coc_worker_paused") == 0.0


async def test_a_crashing_probe_does_not_kill_its_prober(gate: Gate) -> None:
    probe = Probe(crash=2)
    with capture_logs() as logs:
        gate.trip(auth_error(), probe)
        await until(lambda: len(probe.at) >= 3)
        probe.heal()
        await asyncio.wait_for(gate.wait_open(), timeout=2.0)
    events = [(e["event"], e.get("error")) for e in logs if e["event"] != "probe_failed"]
    assert events == [
        ("worker_paused", None),
        ("probe_crashed", "RuntimeError"),
        ("probe_crashed", "RuntimeError"),
        ("worker_resumed", None),
    ]
    crashes = [e for e in logs if e["event"] == "probe_crashed"]
    assert {e["log_level"] for e in crashes} == {"error"}
    # with its cause (only the class name was logged), and its traceback the first time
    assert [(e["detail"], e["exc_info"]) for e in crashes] == [("probe bug", True), ("probe bug", False)]
    assert len(probe.at) >= 3


async def test_a_crashed_probes_detail_is_redacted_before_it_is_cut(metrics: Metrics) -> None:
    """The detail is cut at 300 characters; cut first, a secret across the cut was no longer whole
    where the log line is redacted, and its first characters were written as they were."""
    secret = "sk-gate-test-0123456789abcdefghij"
    register_secrets([secret])
    out = io.StringIO()
    configure("DEBUG", "json", out)
    gate = Gate(metrics, probe_base_s=BASE_S, probe_max_s=CAP_S)
    calls = 0

    async def probe() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("x" * 280 + f" token={secret} and more")

    try:
        gate.trip(DedupUnavailable("down"), probe)
        await asyncio.wait_for(gate.wait_open(), timeout=2.0)
    finally:
        await gate.close()
    [line] = [json.loads(text) for text in out.getvalue().splitlines() if "probe_crashed" in text]
    assert line["detail"] == ("x" * 280 + " token=**redacted** and more")[:300]
    assert secret[:8] not in out.getvalue()


async def test_close_cancels_the_probers(metrics: Metrics) -> None:
    gate = Gate(metrics, probe_base_s=BASE_S, probe_max_s=CAP_S)
    auth, unreachable = Probe(), Probe()
    gate.trip(auth_error(), auth)
    gate.trip(ApiUnreachable("no connection"), unreachable)
    await until(lambda: len(auth.at) >= 1 and len(unreachable.at) >= 1)
    tasks = probers()
    assert len(tasks) == 2
    await gate.close()
    assert all(t.cancelled() for t in tasks)
    assert gate.causes == []
    await gate.close()  # idempotent


async def pause_once(gate: Gate, probe: Probe) -> float:
    """Trip the gate with a probe that passes while the work does not: how long the pause lasted."""
    loop = asyncio.get_running_loop()
    tripped = loop.time()
    gate.trip(DedupUnavailable("writes refused (OOM)"), probe)
    await asyncio.wait_for(gate.wait_open(), timeout=2.0)
    return loop.time() - tripped


async def test_a_cause_back_as_soon_as_its_probe_passed_goes_on_backing_off(
    gate: Gate, backoffs: list[tuple[int, float]]
) -> None:
    """A full Redis answers PING but refuses writes; a topic's metadata answers but writes to it are
    refused. The work fails again the moment the gate opens: each pause then goes on from the last
    one's backoff, so the pauses grow to the cap instead of flapping at the first step."""
    probe = Probe()
    probe.heal()
    pauses = [await pause_once(gate, probe) for _ in range(4)]
    # one probe per pause, each pause's wait at the next step of the backoff (not at the first)
    assert [attempt for attempt, _ in backoffs] == [1, 2, 3, 4]
    asked = [delay for _, delay in backoffs]
    ceilings = [min(CAP_S, BASE_S * 2**n) for n in range(4)]
    assert in_jitter_range(asked, ceilings), (asked, ceilings)
    assert all(p >= d - 0.001 for p, d in zip(pauses, asked, strict=True)), (pauses, asked)


async def test_a_cause_that_stayed_away_starts_its_backoff_over(metrics: Metrics) -> None:
    gate = Gate(metrics, probe_base_s=BASE_S, probe_max_s=CAP_S, flap_window_s=0.05)
    try:
        probe = Probe()
        probe.heal()
        for _ in range(3):
            await pause_once(gate, probe)
        assert gate._cleared["dedup_unavailable"][0] == 3  # back at once: it went on from there
        loop = asyncio.get_running_loop()
        cleared = loop.time()
        await until(lambda: loop.time() - cleared > 0.06)  # the cause stays away past the window
        await pause_once(gate, probe)
        assert gate._cleared["dedup_unavailable"][0] == 1  # one probe, at the first step again
    finally:
        await gate.close()


async def test_the_probers_lines_do_not_carry_the_context_of_the_job_that_tripped_it(gate: Gate) -> None:
    """The probe runs for the outage, not for the job that met it first: its lines must not name
    that job's message (``logs.bind_message_context``)."""
    out = io.StringIO()
    configure("INFO", "json", out)
    probe = Probe()

    async def job() -> None:
        bind_message_context({"topic": "in", "partition": 0, "offset": 7, "event_id": "ev-1"})
        gate.trip(ApiUnreachable("no connection"), probe)

    await asyncio.create_task(job())
    await until(lambda: len(probe.at) >= 2)
    probe.heal()
    await gate.wait_open()
    lines = {line["event"]: line for line in map(json.loads, out.getvalue().splitlines())}
    assert lines["worker_paused"]["event_id"] == "ev-1"  # the job's own line names it
    assert "event_id" not in lines["probe_failed"]
    assert "offset" not in lines["worker_resumed"]


async def test_probe_now_wakes_only_a_cause_paused_on_that_probe(metrics: Metrics) -> None:
    """The health check wakes the broker pause it made as soon as the broker answers. A pause the
    publisher made (metadata answers, the topic's writes fail) was woken too, at every check: its
    probe passed, the next write failed, and it flapped on a fixed 2 s cycle past its backoff."""
    slow = Gate(metrics, probe_base_s=60.0, probe_max_s=60.0)  # no prober wakes by itself here
    ours, theirs = Probe(), Probe()
    ours.heal()
    theirs.heal()
    try:
        slow.trip(DedupUnavailable("store away"), theirs)
        slow.probe_now(DedupUnavailable.kind, ours)
        assert not slow._causes[DedupUnavailable.kind].wake.is_set()  # still in its backoff
        slow.probe_now(DedupUnavailable.kind, theirs)
        await asyncio.wait_for(slow.wait_open(), 5)
        assert len(theirs.at) == 1
        assert ours.at == []
    finally:
        await slow.close()
