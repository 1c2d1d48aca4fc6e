"""``ApiCaller.apply``: retries, the budget, the systemic gate and reconciliation, against the simulator.

Real client, real gate, real metrics; only the retry delays are shrunk to milliseconds. Faults are
switched from ``before_attempt`` (called before every HTTP attempt), so which attempt meets which
fault is exact rather than a race.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import socket
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from egress_proxy import clear_proxy_env, serving_proxy
from huaweicloudsdkcoc.v1 import CocTicketDetailInfoResponseData, CocTicketDetailInfoResponseDataSubTickets
from structlog.testing import capture_logs
from waiting import until

import worker.apply as apply_module
from schemas.api import UpdateTicketResponse
from schemas.events import CHANGE_EVENT_ADAPTER, AnyChangeEvent
from worker.api_client import ApiResponse, CocApiClient
from worker.apply import UNNAMED_TICKET, ApiCaller, ApplyResult
from worker.errors import ApiAuthError, ApiTransientError
from worker.gate import Gate
from worker.mapping import already_applied, to_request_body
from worker.metrics import Metrics
from worker.ratelimit import AdaptiveConcurrency, TokenBucket
from worker.retry import RetryPolicy
from worker.settings import WorkerSettings
from worker.simulator import SimulatorConfig, SimulatorServer, SubState
from worker.simulator.tickets import ILLEGAL_TRANSITION, SubTicket, Ticket, apply_update

AK = "AK-APPLY-TEST-01"
SK = "sk-apply-test-secret-0001"
SEED: dict[str, Any] = {"tickets": [{"ticket_id": "CM1", "sub_tickets": ["s-1", "s-2", "s-3"]}]}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FAST = RetryPolicy(
    max_attempts=5, max_elapsed_s=10.0, base_delay_s=0.002, max_delay_s=0.01, retry_after_max_s=1.0
)
PATIENT = RetryPolicy(
    max_attempts=10_000, max_elapsed_s=60.0, base_delay_s=0.002, max_delay_s=0.01, retry_after_max_s=1.0
)


def started(sub: str = "s-1", event_id: str = "ev-start") -> AnyChangeEvent:
    return CHANGE_EVENT_ADAPTER.validate_python(
        {"event_id": event_id, "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": sub}
    )


def wire(event: AnyChangeEvent) -> bytes:
    return json.dumps(to_request_body(event).to_wire(), separators=(",", ":")).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Attempts:
    """A ``before_attempt`` hook: records when each attempt starts and runs per-attempt actions."""

    actions: dict[int, Callable[[], object]] = field(default_factory=dict)
    at: list[float] = field(default_factory=list)

    async def __call__(self) -> None:
        self.at.append(time.monotonic())
        action = self.actions.get(len(self.at))
        if action is not None:
            action()


@dataclass
class Rig:
    sim: SimulatorServer
    client: CocApiClient
    gate: Gate
    metrics: Metrics

    def caller(
        self, policy: RetryPolicy = FAST, unreachable_threshold_s: float = 60.0, **kw: Any
    ) -> ApiCaller:
        return ApiCaller(self.client, policy, self.gate, self.metrics, unreachable_threshold_s, **kw)

    async def apply(
        self,
        caller: ApiCaller,
        event: AnyChangeEvent | None = None,
        hook: Callable[[], Awaitable[None]] | None = None,
        confirm: Callable[[dict[str, Any]], bool] | None = None,
        ambiguous: bool = False,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> ApplyResult:
        event = event or started()
        return await caller.apply(
            event.ticket_id,
            wire(event),
            event_id=event.event_id,
            traceparent=TRACEPARENT,
            before_attempt=hook or Attempts(),
            before_send=before_send,
            confirm=confirm,
            ambiguous=ambiguous,
        )

    async def leave_a_request_behind(self, caller: ApiCaller, latency_ms: float) -> None:
        """A job whose PUT the API holds for ``latency_ms`` is cancelled once the PUT has arrived:
        the HTTP client still delivers it (a revocation or shutdown past its grace)."""
        state = self.sim.state
        state.set_faults(latency_ms=latency_ms)
        first = asyncio.create_task(self.apply(caller))
        await until(lambda: state.arrived == 1)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        state.set_faults(latency_ms=0)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def puts(self) -> list[tuple[int | None, str | None]]:
        return [(r.status, r.fault) for r in self.sim.state.requests if r.method == "PUT"]


def make_sim(port: int = 0) -> SimulatorServer:
    return SimulatorServer(SimulatorConfig(port=port, credentials={AK: SK}, seed=SEED))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    metrics = Metrics()
    gate = Gate(metrics, probe_base_s=0.01, probe_max_s=0.05)
    async with make_sim() as sim:
        client = CocApiClient(WorkerSettings(api_endpoint=sim.url, api_ak=AK, api_sk=SK), metrics)
        await client.start()
        try:
            yield Rig(sim, client, gate, metrics)
        finally:
            await gate.close()
            await client.close()


# --------------------------------------------------------------------------- retries and budget


async def test_transient_503s_then_success(rig: Rig) -> None:
    rig.sim.state.set_faults(error_ratio=1.0, error_statuses=[503])

    class CountingLimit:
        acquired = 0

        async def acquire(self) -> float:
            self.acquired += 1
            return float("inf")

        async def give_back(self, until: float) -> None:
            self.acquired -= 1

        async def close(self) -> None:
            return None

    limit = CountingLimit()
    hook = Attempts({3: lambda: rig.sim.state.set_faults(error_ratio=0.0)})
    result = await rig.apply(rig.caller(rate_limit=limit), hook=hook)
    assert (result.status, result.calls, result.http_status, result.reconciled) == ("applied", 3, 200, False)
    assert result.response is not None
    assert result.response.body.succeeded
    assert rig.puts() == [(503, "error"), (503, "error"), (200, None)]
    assert len(rig.sim.state.applied_for("ev-start")) == 1
    assert rig.sample("coc_worker_api_retries_total") == 2.0
    assert limit.acquired == 3  # every attempt passes the rate limit
    assert rig.gate.is_open


async def test_retry_after_is_honoured(rig: Rig) -> None:
    rig.sim.state.set_faults(throttle_ratio=1.0, retry_after_s=0.2)
    hook = Attempts({2: lambda: rig.sim.state.set_faults(throttle_ratio=0.0)})
    result = await rig.apply(rig.caller(), hook=hook)
    assert (result.status, result.calls) == ("applied", 2)
    assert rig.puts() == [(429, "throttle"), (200, None)]
    assert hook.at[1] - hook.at[0] >= 0.2  # the backoff alone is at most 10 ms


async def test_illegal_transition_is_rejected_without_retry(rig: Rig) -> None:
    confirmations: list[dict[str, Any]] = []

    def confirm(detail: dict[str, Any]) -> bool:
        confirmations.append(detail)
        return True

    assert (await rig.apply(rig.caller(), started(event_id="ev-1"))).status == "applied"
    result = await rig.apply(rig.caller(), started(event_id="ev-2"), confirm=confirm)
    assert (result.status, result.calls, result.http_status, result.error_code) == (
        "rejected",
        1,
        400,
        ILLEGAL_TRANSITION,
    )
    assert result.error_msg is not None
    assert "needs pending" in result.error_msg
    assert confirmations == []  # nothing was ambiguous: the refusal stands without asking
    assert rig.puts() == [(200, None), (400, None)]
    assert rig.sample("coc_worker_api_retries_total") == 0.0


async def test_budget_of_attempts_runs_out(rig: Rig) -> None:
    rig.sim.state.set_faults(error_ratio=1.0, error_statuses=[503])
    policy = RetryPolicy(max_attempts=4, max_elapsed_s=10.0, base_delay_s=0.001, max_delay_s=0.005)
    result = await rig.apply(rig.caller(policy))
    assert (result.status, result.calls, result.http_status, result.error_code) == (
        "failed",
        4,
        503,
        "GOM.00009503",
    )
    assert result.detail is not None
    assert result.detail.startswith("gave up after 4 attempts")
    assert rig.puts() == [(503, "error")] * 4
    assert rig.sample("coc_worker_api_retries_total") == 3.0
    assert rig.sim.state.applied_log == []
    assert rig.gate.is_open


@pytest.mark.parametrize(
    "faults",
    [{"error_ratio": 1.0, "error_statuses": [503]}, {"drop_ratio": 1.0}],
    ids=["http-503", "connection-dropped"],
)
async def test_a_failed_event_leaves_no_cyclic_garbage_behind(rig: Rig, faults: dict[str, Any]) -> None:
    """A failure the retry loop keeps (``error``) must not keep its frames: with the worker's
    raised GC threshold (``worker/cli.py``), cycles of frames holding request bodies would pile up
    between collections under an API outage."""
    rig.sim.state.set_faults(**faults)
    policy = RetryPolicy(max_attempts=3, max_elapsed_s=10.0, base_delay_s=0.001, max_delay_s=0.005)
    caller = rig.caller(policy)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable is kept in gc.garbage
    try:
        for n in range(5):
            result = await rig.apply(caller, started(event_id=f"ev-fail-{n}"))
            assert result.status == "failed"
        gc.collect()
        ours = {
            obj.f_code.co_name
            for obj in gc.garbage
            if isinstance(obj, types.FrameType)
            and obj.f_code.co_filename.endswith(("worker/apply.py", "worker/api_client.py"))
        }
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == set()


class _Sleeps:
    """``worker.apply``'s ``asyncio``, recording what the caller asks of ``asyncio.sleep``."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.asked.append(delay)
        await asyncio.sleep(delay)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> _Sleeps:
    recorder = _Sleeps()
    monkeypatch.setattr("worker.apply.asyncio", recorder)
    return recorder


async def test_budget_of_elapsed_time_runs_out(rig: Rig, sleeps: _Sleeps) -> None:
    rig.sim.state.set_faults(error_ratio=1.0, error_statuses=[502])
    policy = RetryPolicy(max_attempts=10_000, max_elapsed_s=0.15, base_delay_s=0.02, max_delay_s=0.05)
    begun = time.monotonic()
    result = await rig.apply(rig.caller(policy))
    elapsed = time.monotonic() - begun
    assert result.status == "failed"
    assert 1 < result.calls < 100
    # A wait between each two calls, none after the last: it stops when the next wait would pass
    # the budget, so the waits it took (at most 50 ms each) stay within it.
    assert len(sleeps.asked) == result.calls - 1
    assert all(0 <= delay <= 0.05 for delay in sleeps.asked), sleeps.asked
    assert sum(sleeps.asked) <= 0.15 + 1e-9, sleeps.asked
    # It ran the budget down (it stopped with under 50 ms of it left); the upper bound only
    # catches a hang, not a slow machine.
    assert 0.1 <= elapsed < 10.0
    assert len(rig.puts()) == result.calls


async def test_retry_after_beyond_the_elapsed_budget_fails_at_once(rig: Rig, sleeps: _Sleeps) -> None:
    rig.sim.state.set_faults(throttle_ratio=1.0, retry_after_s=0.5)
    policy = RetryPolicy(max_attempts=10, max_elapsed_s=0.3, base_delay_s=0.001, max_delay_s=0.005)
    begun = time.monotonic()
    result = await rig.apply(rig.caller(policy))
    assert (result.status, result.calls, result.http_status) == ("failed", 1, 429)
    assert sleeps.asked == []  # not the 0.5 s Retry-After, nor any wait, before failing
    assert time.monotonic() - begun < 3.0  # only catches a hang


async def test_before_send_runs_once_the_limits_let_the_request_through(rig: Rig) -> None:
    """The claim's lease is renewed in ``before_send``: after a wait for a concurrency slot (or a
    rate-limit token) of any length, not before it, so the request it covers is really next."""
    limit = AdaptiveConcurrency(1, rig.metrics)
    await limit.acquire()  # another call holds the only slot
    seen: list[str] = []

    async def before_attempt() -> None:
        seen.append("round")

    async def before_send() -> None:
        seen.append("send")

    task = asyncio.create_task(
        rig.apply(rig.caller(concurrency=limit), hook=before_attempt, before_send=before_send)
    )
    await until(lambda: rig.sample("coc_worker_rate_limit_waits_total", limit="concurrency") == 1.0)
    assert seen == ["round"]  # waiting for the slot; nothing renewed yet
    limit.release()
    result = await asyncio.wait_for(task, 5)
    assert seen == ["round", "send"]
    assert result.status == "applied"


# --------------------------------------------------------------------------- the systemic gate


async def test_401_storm_pauses_without_spending_the_budget(rig: Rig) -> None:
    state = rig.sim.state
    state.revoke()
    # After the pause: one 503 then success. With max_attempts=2 that fits only if the 401 cost nothing.
    hook = Attempts(
        {
            2: lambda: state.set_faults(error_ratio=1.0, error_statuses=[503]),
            3: lambda: state.set_faults(error_ratio=0.0),
        }
    )
    policy = RetryPolicy(max_attempts=2, max_elapsed_s=10.0, base_delay_s=0.001, max_delay_s=0.005)
    task = asyncio.create_task(rig.apply(rig.caller(policy), hook=hook))
    try:
        await until(lambda: not rig.gate.is_open)
        # The prober keeps trying (GET, refused) while the message waits at the gate.
        await state.wait_for(
            lambda: [r.status for r in state.requests if r.method == "GET"][:2] == [401, 401], 3.0
        )
        assert not task.done()
        assert rig.gate.causes == ["api_auth"]
        assert rig.puts() == [(401, None)]
        assert len(hook.at) == 1
        assert rig.sample("coc_worker_paused") == 1.0
        assert rig.sample("coc_worker_pauses_total", kind="api_auth") == 1.0

        state.revoke(False)
        result = await asyncio.wait_for(task, timeout=5.0)
    finally:
        task.cancel()
    assert (result.status, result.calls) == ("applied", 3)
    assert rig.puts() == [(401, None), (503, "error"), (200, None)]
    assert len(state.applied_for("ev-start")) == 1
    assert rig.gate.is_open
    assert rig.sample("coc_worker_paused") == 0.0


async def test_a_write_refused_while_reads_pass_ends_rejected(rig: Rig) -> None:
    """Credentials that may read but not write (an IAM policy without the update permission): the
    first 403 pauses at the gate like any auth failure; its probe reads a ticket and passes, so a
    second 403 is this request's own. The event ends ``rejected`` instead of pausing forever."""
    state = rig.sim.state
    state.restrict_to_reads()
    result = await asyncio.wait_for(rig.apply(rig.caller()), timeout=5.0)
    assert (result.status, result.calls, result.http_status, result.error_code) == (
        "rejected",
        2,
        403,
        "APIGW.0302",
    )
    assert "not permitted" in (result.detail or "")
    assert rig.puts() == [(403, None), (403, None)]
    assert [r.status for r in state.requests if r.method == "GET"] == [200]  # the gate's one probe
    assert rig.sample("coc_worker_pauses_total", kind="api_auth") == 1.0
    assert rig.gate.is_open
    assert state.applied_log == []


async def test_credentials_that_may_write_but_not_read_resume_after_a_401(rig: Rig) -> None:
    """The reference names only the update permission for this call, so a least-privilege key may
    change tickets and not read them. One 401 (a clock skew, a secret rotated mid-flight) paused
    the worker, and the gate's probe, a read, met 403 on every try: paused for ever, though every
    change would pass. The probe now falls back to a change that changes nothing."""
    state = rig.sim.state
    state.restrict_to_writes()
    state.revoke()
    job = asyncio.ensure_future(rig.apply(rig.caller()))
    await until(lambda: any(r.method == "GET" and r.status == 401 for r in state.requests))  # probing
    assert not rig.gate.is_open
    state.revoke(False)
    result = await asyncio.wait_for(job, 5)
    assert (result.status, result.calls) == ("applied", 2)
    assert rig.gate.is_open
    probes = [(r.method, r.status) for r in state.requests if r.path.endswith(f"/{UNNAMED_TICKET}")]
    assert ("PUT", 400) in probes  # "no such ticket": the key may write
    assert not state.tickets.get(UNNAMED_TICKET)
    assert len(state.applied_for("ev-start")) == 1


async def test_credentials_refused_for_writes_too_stay_paused(rig: Rig) -> None:
    """The write probe must not open the gate for a key the API refuses to change tickets with."""
    state = rig.sim.state
    state.restrict_to_writes()
    state.restrict_to_reads()  # both: nothing permitted
    job = asyncio.ensure_future(rig.apply(rig.caller()))
    await until(
        lambda: sum(r.path.endswith(f"/{UNNAMED_TICKET}") and r.method == "PUT" for r in state.requests) >= 2
    )
    assert not job.done()
    assert not rig.gate.is_open
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)


async def test_a_lost_answer_with_reads_not_permitted_is_settled_by_the_send(rig: Rig) -> None:
    """A lost answer is settled by reading the ticket; with reads not permitted that read's 403
    paused the whole worker (an auth failure) and its probe never passed. The send decides now."""
    state = rig.sim.state
    state.restrict_to_writes()
    state.set_faults(drop_ratio=1.0)  # dropped before it was applied
    hook = Attempts({2: lambda: state.set_faults(drop_ratio=0.0)})
    event = started()
    result = await asyncio.wait_for(
        rig.apply(rig.caller(), event, hook, confirm=lambda detail: already_applied(event, detail)), 5
    )
    assert (result.status, result.calls, result.reconciled) == ("applied", 2, False)
    assert [(r.method, r.status) for r in state.requests] == [("PUT", None), ("GET", 403), ("PUT", 200)]
    assert rig.sample("coc_worker_pauses_total", kind="api_auth") == 0.0


@pytest.mark.parametrize(
    ("policy", "threshold_s"),
    [
        pytest.param(PATIENT, 0.1, id="threshold"),
        pytest.param(
            RetryPolicy(max_attempts=3, max_elapsed_s=60.0, base_delay_s=0.001, max_delay_s=0.005),
            60.0,
            id="budget",
        ),
    ],
)
async def test_unreachable_api_pauses_and_resumes(policy: RetryPolicy, threshold_s: float) -> None:
    metrics = Metrics()
    gate = Gate(metrics, probe_base_s=0.01, probe_max_s=0.05)
    sim = make_sim(free_port())  # not started yet: nothing listens on its port
    client = CocApiClient(
        WorkerSettings(api_endpoint=f"http://127.0.0.1:{sim.config.port}", api_ak=AK, api_sk=SK), metrics
    )
    await client.start()
    rig = Rig(sim, client, gate, metrics)
    task = asyncio.create_task(rig.apply(rig.caller(policy, threshold_s)))
    try:
        with capture_logs() as logs:
            await until(lambda: gate.causes == ["api_unreachable"])
        # The pause names where it tried and the setting that says so (on-call review).
        [paused] = [e for e in logs if e["event"] == "worker_paused"]
        assert f"(http://127.0.0.1:{sim.config.port}: COC_WORKER_API_ENDPOINT or _REGION)" in paused["detail"]
        connect_errors = rig.sample("coc_worker_api_requests_total", code="connect_error")
        await until(
            lambda: rig.sample("coc_worker_api_requests_total", code="connect_error") > connect_errors
        )
        assert not task.done()  # the prober fails too, and the event is neither failed nor rejected
        assert rig.sample("coc_worker_pauses_total", kind="api_unreachable") == 1.0

        await sim.start()
        result = await asyncio.wait_for(task, timeout=5.0)
        assert (result.status, result.http_status) == ("applied", 200)
        assert len(sim.state.applied_for("ev-start")) == 1
        assert gate.is_open
    finally:
        task.cancel()
        await gate.close()
        await client.close()
        await sim.stop()


async def test_a_pause_behind_an_egress_proxy_names_the_proxy_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a forward proxy that refuses the requests (its password rotated): its 407 was taken
    for the API's refusal of the event (``rejected``, dead-lettered, one event after another). It
    pauses the worker as unreachable, naming the proxy's variable beside the API's settings, with
    the proxy's reason and not its password, and the probe does not take a 407 for an answer."""
    password = "egress-proxy-password-0001"
    clear_proxy_env(monkeypatch)
    metrics = Metrics()
    gate = Gate(metrics, probe_base_s=0.01, probe_max_s=0.05)
    sim = make_sim(free_port())
    async with serving_proxy("coc-worker", password) as proxy, sim:
        monkeypatch.setenv(
            "HTTP_PROXY", proxy.url.replace("http://", "http://coc-worker:stale-password-0002@")
        )
        client = CocApiClient(
            WorkerSettings(api_endpoint=f"http://127.0.0.1:{sim.config.port}", api_ak=AK, api_sk=SK), metrics
        )
        await client.start()
        rig = Rig(sim, client, gate, metrics)
        task = asyncio.create_task(rig.apply(rig.caller(FAST, 0.0)))
        try:
            with capture_logs() as logs:
                await until(lambda: gate.causes == ["api_unreachable"])
            [paused] = [e for e in logs if e["event"] == "worker_paused"]
            assert paused["detail"] == (
                "a proxy refused the request (HTTP 407: proxy authorization required)"
                f" (http://127.0.0.1:{sim.config.port}: COC_WORKER_API_ENDPOINT or _REGION,"
                " or the proxy in HTTP_PROXY)"
            )
            refused = proxy.refused
            await until(lambda: proxy.refused > refused)  # the probe's request, refused too
            assert not gate.is_open
            assert not task.done()
            assert sim.state.arrived == 0
            assert proxy.tunnels == []
            assert "stale-password" not in repr(logs)
        finally:
            task.cancel()
            await gate.close()
            await client.close()


SHORT_BUDGET = RetryPolicy(max_attempts=1000, max_elapsed_s=0.3, base_delay_s=0.002, max_delay_s=0.01)


async def test_a_server_error_storm_longer_than_the_budget_pauses_instead_of_failing(rig: Rig) -> None:
    """An API answering 503 to everything for longer than an event's retry budget failed every
    event it touched (each dead-lettered, and each ticket's later steps refused after it). With
    no working answer for the threshold, the event pauses the worker; the probe keeps it paused
    while the API still fails, and the event is applied once it works."""
    state = rig.sim.state
    state.set_faults(error_ratio=1.0, error_statuses=[503])
    caller = rig.caller(SHORT_BUDGET, unreachable_threshold_s=0.1)
    events = [started(sub, f"ev-{sub}") for sub in ("s-1", "s-2", "s-3")]  # OUTAGE_MIN_EVENTS
    task = asyncio.ensure_future(asyncio.gather(*(rig.apply(caller, event) for event in events)))
    try:
        with capture_logs() as logs:
            await until(lambda: rig.gate.causes == ["api_failing"])
        [paused] = [e for e in logs if e["event"] == "worker_paused"]
        assert "COC_WORKER_API_UNREACHABLE_THRESHOLD_S" in paused["detail"]
        probes = [r for r in state.requests if r.method == "PUT" and UNNAMED_TICKET in r.path]
        await until(
            lambda: (
                len([r for r in state.requests if r.method == "PUT" and UNNAMED_TICKET in r.path])
                > len(probes) + 1
            )
        )
        assert not task.done()  # the probe is refused too: still paused, not failed
        state.set_faults(error_ratio=0.0)
        results = await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert [(r.status, r.http_status) for r in results] == [("applied", 200)] * 3
    assert all(len(state.applied_for(event.event_id)) == 1 for event in events)
    assert rig.gate.is_open
    assert rig.sample("coc_worker_pauses_total", kind="api_failing") == 1.0


async def test_the_last_events_of_a_run_failing_alone_do_not_pause(rig: Rig) -> None:
    """Fewer than ``OUTAGE_MIN_EVENTS`` events failing with nothing else in flight (the tail of a
    run, an idle worker) are not taken for an outage: they end failed after their budget, each
    with no more attempts than the cap, as before."""
    rig.sim.state.set_faults(error_ratio=1.0, error_statuses=[503])
    policy = RetryPolicy(max_attempts=4, max_elapsed_s=10.0, base_delay_s=0.05, max_delay_s=0.06)
    caller = rig.caller(policy, unreachable_threshold_s=0.01)
    events = [started(sub, f"ev-{sub}") for sub in ("s-1", "s-2")]
    # (taken for an outage, they waited for ever: the API answers nothing but 503 here)
    results = await asyncio.wait_for(asyncio.gather(*(rig.apply(caller, event) for event in events)), 10)
    assert [(r.status, r.calls) for r in results] == [("failed", 4)] * 2
    assert rig.sample("coc_worker_pauses_total", kind="api_failing") == 0.0


class _OneTicketFailing:
    """A stand-in client: the API answers 503 for ticket ``T-X`` only (after ``slow_s``), and
    works otherwise."""

    def __init__(self, slow_s: float = 0.001) -> None:
        self.probed = 0
        self.slow_s = slow_s

    async def update_ticket(self, ticket_id: str, body: bytes, **kwargs: Any) -> Any:
        await asyncio.sleep(self.slow_s if ticket_id == "T-X" else 0.001)
        if ticket_id == "T-X":
            raise ApiTransientError("HTTP 503 (GOM.00009503)", http_status=503)
        return ApiResponse(200, UpdateTicketResponse(), 0.0)

    async def probe_write(self, ticket_id: str) -> None:
        self.probed += 1


async def test_one_ticket_the_api_fails_on_still_fails_while_others_are_answered(rig: Rig) -> None:
    """The pause is for outages: other tickets' changes answered meanwhile mean the API works, and
    the event the API keeps failing on ends failed (dead-lettered), as before, without a pause."""
    client = _OneTicketFailing()
    caller = ApiCaller(client, SHORT_BUDGET, rig.gate, rig.metrics, 0.1)  # type: ignore[arg-type]
    failing = asyncio.create_task(caller.apply("T-X", b"{}", event_id="ev-x", traceparent=TRACEPARENT))
    n = 0
    while not failing.done():  # other tickets' events, answered all along
        n += 1
        assert (
            await caller.apply("T-OK", b"{}", event_id=f"ev-{n}", traceparent=TRACEPARENT)
        ).status == "applied"
    result = failing.result()
    assert (result.status, result.http_status) == ("failed", 503)
    assert rig.sample("coc_worker_pauses_total", kind="api_failing") == 0.0
    assert client.probed == 0


@pytest.mark.parametrize("slow_s", [0.001, 0.15], ids=["fast", "slower-than-the-threshold"])
async def test_one_ticket_the_api_fails_on_alone_pauses_once_then_fails(rig: Rig, slow_s: float) -> None:
    """With nothing else in flight the worker cannot tell a ticket whose events fail (three of
    them here) from an outage: it pauses, the probe is answered, each event gets one more try
    and then ends failed; they do not keep the worker paused. Also when each failure takes longer
    than the threshold (a timeout as long as it, the defaults): the try after the probe then
    tripped the gate again, and the events never ended (review)."""
    client = _OneTicketFailing(slow_s)
    caller = ApiCaller(client, SHORT_BUDGET, rig.gate, rig.metrics, 0.1)  # type: ignore[arg-type]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(caller.apply("T-X", b"{}", event_id=f"ev-x{n}", traceparent=TRACEPARENT) for n in range(3))
        ),
        10,
    )
    assert [(r.status, r.http_status) for r in results] == [("failed", 503)] * 3
    assert rig.sample("coc_worker_pauses_total", kind="api_failing") == 1.0
    assert client.probed == 1
    assert rig.gate.is_open


async def test_short_connect_failures_are_plain_retries(rig: Rig) -> None:
    port = free_port()
    metrics = rig.metrics
    sim = make_sim(port)
    client = CocApiClient(
        WorkerSettings(api_endpoint=f"http://127.0.0.1:{port}", api_ak=AK, api_sk=SK), metrics
    )
    await client.start()
    task = asyncio.create_task(
        Rig(sim, client, rig.gate, metrics).apply(
            ApiCaller(client, PATIENT, rig.gate, metrics, unreachable_threshold_s=60.0)
        )
    )
    try:
        await until(lambda: rig.sample("coc_worker_api_requests_total", code="connect_error") >= 2)
        await sim.start()
        result = await asyncio.wait_for(task, timeout=5.0)
    finally:
        task.cancel()
        await client.close()
        await sim.stop()
    assert result.status == "applied"
    assert result.calls >= 3
    assert rig.sample("coc_worker_pauses_total", kind="api_unreachable") == 0.0


# --------------------------------------------------------------------------- reconciliation


async def test_ambiguous_attempt_then_refusal_is_reconciled(rig: Rig) -> None:
    state = rig.sim.state
    state.set_faults(drop_after_apply_ratio=1.0)
    event = started()
    hook = Attempts({2: lambda: state.set_faults(drop_after_apply_ratio=0.0)})
    result = await rig.apply(rig.caller(), event, hook, confirm=lambda detail: already_applied(event, detail))
    # the ticket is read before sending again: the change is there, so it is not sent twice
    assert (result.status, result.calls, result.reconciled) == (
        "applied",
        1,
        True,
    )  # one send; the read settled it
    assert [(r.method, r.status, r.error_code, r.fault) for r in state.requests] == [
        ("PUT", None, "GOM.00000000", "drop_after_apply"),
        ("GET", 200, "GOM.00000000", None),
    ]
    assert len(state.applied_for("ev-start")) == 1
    assert len(state.applied_log) == 1


@pytest.mark.parametrize("kind", ["ticket.update", "change.started"])
async def test_a_gateway_timeout_after_the_change_is_reconciled(rig: Rig, kind: str) -> None:
    """A 504 from the gateway while its backend applied the change: the ticket is read before the
    change is sent again, so a ``ticket.update`` is not applied twice and a start is not refused."""
    state = rig.sim.state
    state.set_faults(timeout_after_apply_ratio=1.0)
    event = (
        started()
        if kind == "change.started"
        else CHANGE_EVENT_ADAPTER.validate_python(
            {
                "event_id": "ev-phase",
                "type": kind,
                "ticket_id": "CM1",
                "ticket_info": {"phase": "phase_change_close"},
            }
        )
    )
    hook = Attempts({2: lambda: state.set_faults(timeout_after_apply_ratio=0.0)})
    result = await rig.apply(rig.caller(), event, hook, confirm=lambda detail: already_applied(event, detail))
    assert (result.status, result.calls, result.reconciled) == ("applied", 1, True)
    assert [(r.method, r.status, r.fault) for r in state.requests] == [
        ("PUT", 504, "timeout_after_apply"),
        ("GET", 200, None),
    ]
    assert len(state.applied_for(event.event_id)) == 1


async def test_ambiguous_attempt_then_refusal_without_confirm_is_rejected(rig: Rig) -> None:
    state = rig.sim.state
    state.set_faults(drop_after_apply_ratio=1.0)
    hook = Attempts({2: lambda: state.set_faults(drop_after_apply_ratio=0.0)})
    result = await rig.apply(rig.caller(), hook=hook)
    assert (result.status, result.calls, result.error_code, result.reconciled) == (
        "rejected",
        2,
        ILLEGAL_TRANSITION,
        False,
    )
    assert len(state.applied_log) == 1


async def test_a_lost_answer_against_a_detail_without_sub_ticket_state_ends_rejected_and_says_so(
    rig: Rig,
) -> None:
    """The real API's ticket detail has no sub-ticket state (the SDK's model): the read after a
    lost answer confirms nothing, the send that follows is refused, and the event ends
    ``rejected``. The change is in place once, and the outcome says that it may be."""
    state = rig.sim.state
    state.detail_as_sdk = True
    state.set_faults(drop_after_apply_ratio=1.0)
    event = started()
    hook = Attempts({2: lambda: state.set_faults(drop_after_apply_ratio=0.0)})
    result = await rig.apply(rig.caller(), event, hook, confirm=lambda detail: already_applied(event, detail))
    assert (result.status, result.calls, result.error_code, result.reconciled) == (
        "rejected",
        2,
        ILLEGAL_TRANSITION,
        False,
    )
    assert [(r.method, r.status) for r in state.requests] == [("PUT", None), ("GET", 200), ("PUT", 400)]
    assert len(state.applied_for("ev-start")) == 1
    assert result.error_msg is not None
    # the note first: a redelivery repeats the first 500 characters, and the API's text may be long
    assert result.error_msg.startswith("the change may already be in place (refused after")
    assert result.maybe_applied
    assert "): sub-ticket s-1 is implementing" in result.error_msg  # then the API's own words


def test_the_sdk_shaped_detail_has_only_the_sdk_models_keys() -> None:
    ticket = Ticket("CM1", sub_tickets={"s-1": SubTicket("s-1", "CM1", fields={"comment": "x"})})
    detail = ticket.snapshot(sdk_only=True)
    sub_keys = set(detail["sub_tickets"][0])
    assert sub_keys <= set(CocTicketDetailInfoResponseDataSubTickets.openapi_types)
    assert set(detail) <= set(CocTicketDetailInfoResponseData.openapi_types)
    assert {"state", "change_result", "comment"} <= set(ticket.snapshot()["sub_tickets"][0])


async def test_refusal_is_kept_when_the_ticket_is_elsewhere(rig: Rig) -> None:
    state = rig.sim.state
    state.set_faults(drop_ratio=1.0)  # dropped before it was applied

    def meanwhile() -> None:
        state.set_faults(drop_ratio=0.0)
        state.tickets["CM1"].sub_tickets["s-1"].state = SubState.ENDED  # someone else moved it on

    event = started()
    hook = Attempts({2: meanwhile})
    result = await rig.apply(rig.caller(), event, hook, confirm=lambda detail: already_applied(event, detail))
    assert (result.status, result.calls, result.error_code, result.reconciled) == (
        "rejected",
        2,
        ILLEGAL_TRANSITION,
        False,
    )
    assert state.applied_log == []


async def test_a_like_result_from_another_producer_does_not_confirm_this_one(rig: Rig) -> None:
    """The deploy system's ``change.failed`` is lost on the way; meanwhile a monitoring system's
    fails the same sub-ticket. The read shows ``failed``, but not this event's result: it ends
    rejected (in the DLQ), not applied with a comment and rollback window never sent."""
    state = rig.sim.state
    state.tickets["CM1"].sub_tickets["s-1"].state = SubState.ENDED
    state.set_faults(drop_ratio=1.0)  # dropped before it was applied
    monitor = CHANGE_EVENT_ADAPTER.validate_python(
        {
            "event_id": "ev-alert",
            "type": "change.failed",
            "ticket_id": "CM1",
            "sub_ticket_id": "s-1",
            "result": {"comment": "alert: 5xx spike", "is_monitor_found": True},
        }
    )
    deploy = CHANGE_EVENT_ADAPTER.validate_python(
        {
            "event_id": "ev-deploy",
            "type": "change.failed",
            "ticket_id": "CM1",
            "sub_ticket_id": "s-1",
            "result": {
                "comment": "deploy failed: disk full",
                "change_fail_type": "fr_dependent_service_issue",
            },
        }
    )

    def meanwhile() -> None:
        state.set_faults(drop_ratio=0.0)
        apply_update(state.tickets["CM1"], to_request_body(monitor), now_ms=1)

    hook = Attempts({2: meanwhile})
    result = await rig.apply(
        rig.caller(), deploy, hook, confirm=lambda detail: already_applied(deploy, detail)
    )
    assert (result.status, result.error_code, result.reconciled) == ("rejected", ILLEGAL_TRANSITION, False)
    assert [(r.method, r.status) for r in state.requests] == [("PUT", None), ("GET", 200), ("PUT", 400)]


async def test_ambiguous_drop_then_success_is_a_plain_success(rig: Rig) -> None:
    state = rig.sim.state
    state.set_faults(drop_ratio=1.0)
    event = started()
    hook = Attempts({2: lambda: state.set_faults(drop_ratio=0.0)})
    result = await rig.apply(rig.caller(), event, hook, confirm=lambda detail: already_applied(event, detail))
    assert (result.status, result.calls, result.http_status, result.reconciled) == ("applied", 2, 200, False)
    assert len(state.applied_for("ev-start")) == 1


async def test_credentials_rotated_during_an_outage_are_picked_up(tmp_path: Path) -> None:
    sk_file = tmp_path / "sk"
    sk_file.write_text(SK)
    metrics = Metrics()
    gate = Gate(metrics, probe_base_s=0.01, probe_max_s=0.05)
    sim = make_sim(free_port())
    client = CocApiClient(
        WorkerSettings(api_endpoint=f"http://127.0.0.1:{sim.config.port}", api_ak=AK, api_sk_file=sk_file),
        metrics,
    )
    await client.start()
    rig = Rig(sim, client, gate, metrics)
    task = asyncio.create_task(rig.apply(rig.caller(PATIENT, 0.05)))
    try:
        await until(lambda: gate.causes == ["api_unreachable"])
        rotated = "sk-rotated-secret-0002"
        sk_file.write_text(rotated)
        sim.state.set_credentials({AK: rotated})
        await sim.start()
        # The API answers the unreachable probe with 401: it is back. The auth cause takes over,
        # and its probe re-reads the rotated secret.
        result = await asyncio.wait_for(task, timeout=5.0)
        assert result.status == "applied"
        assert len(sim.state.applied_for("ev-start")) == 1
        assert rig.sample("coc_worker_pauses_total", kind="api_auth") == 1.0
        assert gate.is_open
    finally:
        task.cancel()
        await gate.close()
        await client.close()
        await sim.stop()


@pytest.mark.parametrize(
    ("before", "event"),
    [
        (SubState.PENDING, {"type": "change.started"}),
        (SubState.IMPLEMENTING, {"type": "change.ended"}),
        (SubState.ENDED, {"type": "change.succeeded", "result": {"comment": "done"}}),
        (SubState.ENDED, {"type": "change.failed", "result": {"comment": "broke"}}),
        (SubState.IMPLEMENTING, {"type": "change.cancelled", "result": {"comment": "stop"}}),
        (SubState.PENDING, {"type": "ticket.update", "ticket_info": {"phase": "phase_change_close"}}),
    ],
    ids=lambda value: value["type"] if isinstance(value, dict) else str(value),
)
async def test_every_event_type_is_reconciled_from_the_ticket_detail(
    rig: Rig, before: SubState, event: dict[str, Any]
) -> None:
    state = rig.sim.state
    state.tickets["CM1"].sub_tickets["s-1"].state = before
    raw = {"event_id": "ev-x", "ticket_id": "CM1", **event}
    if raw["type"].startswith("change."):
        raw["sub_ticket_id"] = "s-1"
    parsed = CHANGE_EVENT_ADAPTER.validate_python(raw)
    state.set_faults(drop_after_apply_ratio=1.0)
    hook = Attempts({2: lambda: state.set_faults(drop_after_apply_ratio=0.0)})
    result = await rig.apply(
        rig.caller(), parsed, hook, confirm=lambda detail: already_applied(parsed, detail)
    )
    # confirmed from the ticket detail before a second send (ticket.update included, which the
    # API would otherwise accept twice)
    assert (result.status, result.calls, result.reconciled) == (
        "applied",
        1,
        True,
    )  # one send; the read settled it
    assert len(state.applied_for("ev-x")) == 1


async def test_a_taken_over_claim_is_checked_before_sending(rig: Rig) -> None:
    """A crashed worker's claim: if its change is on the ticket already, nothing is sent again."""
    state = rig.sim.state
    state.tickets["CM1"].sub_tickets["s-1"].state = SubState.IMPLEMENTING  # the dead owner's start
    event = started()
    result = await rig.apply(
        rig.caller(), event, confirm=lambda detail: already_applied(event, detail), ambiguous=True
    )
    assert (result.status, result.calls, result.reconciled) == (
        "applied",
        0,
        True,
    )  # nothing sent: the read settled it
    assert [r.method for r in state.requests] == ["GET"]


async def test_a_taken_over_claim_not_yet_applied_is_sent(rig: Rig) -> None:
    state = rig.sim.state
    event = started()
    result = await rig.apply(
        rig.caller(), event, confirm=lambda detail: already_applied(event, detail), ambiguous=True
    )
    assert (result.status, result.calls, result.reconciled) == ("applied", 1, False)
    assert [r.method for r in state.requests] == ["GET", "PUT"]
    assert len(state.applied_for("ev-start")) == 1


async def test_a_request_left_behind_by_a_cancelled_job_lands_before_the_event_is_tried_again(
    rig: Rig,
) -> None:
    """The HTTP client does not abort a request whose caller was cancelled (a revocation or a
    shutdown past its grace): it still reaches the API. The next job of that event waits for it to
    land, reads the ticket and finds the change in place: one PUT, not a second one that the state
    machine refuses (or, for ``ticket.update``, applies twice)."""
    state = rig.sim.state
    caller = rig.caller(abandon_s=2.0)
    await rig.leave_a_request_behind(caller, latency_ms=300)

    result = await rig.apply(caller, confirm=lambda detail: already_applied(started(), detail))

    assert (result.status, result.calls, result.reconciled) == ("applied", 0, True)
    assert [r.method for r in state.requests] == ["PUT", "GET"]
    assert len(state.applied_for("ev-start")) == 1


async def test_a_job_cancelled_before_its_request_was_made_leaves_nothing_to_wait_for(rig: Rig) -> None:
    """Cancelled while renewing its claim (``before_send``), before the request existed: the next
    job of the event has no request to wait for."""
    caller = rig.caller(abandon_s=60.0)
    renewing = asyncio.Event()

    async def renew_forever() -> None:
        renewing.set()
        await asyncio.Event().wait()

    first = asyncio.create_task(rig.apply(caller, before_send=renew_forever))
    await asyncio.wait_for(renewing.wait(), 5)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)

    result = await asyncio.wait_for(rig.apply(caller), 5)  # would wait 60 s for a request never made

    assert (result.status, result.calls) == ("applied", 1)
    assert [r.method for r in rig.sim.state.requests] == ["PUT"]


async def test_a_job_cancelled_while_waiting_for_a_left_behind_request_leaves_the_wait_to_the_next(
    rig: Rig,
) -> None:
    """The next job of the event waits for the left-behind request, and is cancelled too (a second
    revocation within the window). The job after it must still wait, not read and send at once."""
    state = rig.sim.state
    caller = rig.caller(abandon_s=2.0)
    confirm: Callable[[dict[str, Any]], bool] = lambda detail: already_applied(started(), detail)  # noqa: E731
    await rig.leave_a_request_behind(caller, latency_ms=600)
    with capture_logs() as logs:
        second = asyncio.create_task(rig.apply(caller, confirm=confirm, ambiguous=True))
        await until(lambda: any(e["event"] == "api_waiting_for_abandoned_request" for e in logs))
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)

    result = await rig.apply(caller, confirm=confirm, ambiguous=True)

    assert (result.status, result.calls, result.reconciled) == ("applied", 0, True)
    assert [r.method for r in state.requests] == ["PUT", "GET"]


class _TimesOutThenLands:
    """A stand-in client (a simulator cannot make a client-side read timeout exact): the first
    PUT's answer is lost (``first``: a read timeout unless told) while the API goes on and applies
    it ``late_s`` later; the ticket read says whether it has landed."""

    def __init__(self, late_s: float, first: ApiTransientError | None = None) -> None:
        self.late_s = late_s
        self.first = first or ApiTransientError("read timeout", timed_out=True)
        self.puts = 0
        self.landed = False

    async def update_ticket(self, ticket_id: str, body: bytes, **kwargs: Any) -> Any:
        self.puts += 1
        if self.puts == 1:
            asyncio.get_running_loop().call_later(self.late_s, setattr, self, "landed", True)
            raise self.first
        raise AssertionError("sent again before the first request could land")

    async def show_ticket(self, ticket_id: str) -> dict[str, Any]:
        return {"landed": self.landed}


async def test_a_lost_answer_that_ends_the_budget_in_an_outage_is_read_only_once_it_may_have_landed(
    rig: Rig,
) -> None:
    """A timed-out send whose budget ran out during an outage pauses the worker (``api_failing``);
    the probe reopened the gate at once, the ticket was read before that send could land, and
    the change was sent a second time (review). The next round waits for it as a backoff would."""

    class EachTimesOutThenLands:
        """Per ticket, ``_TimesOutThenLands``: three tickets (``OUTAGE_MIN_EVENTS``), the last one's
        answer lost after the other two's, so that its budget's end finds three events failing."""

        def __init__(self) -> None:
            self.each = {t: _TimesOutThenLands(late_s=0.3) for t in ("T-1", "T-2", "T-3")}
            self.lost = 0  # answers of T-1 and T-2 lost so far
            self.others_lost = asyncio.Event()

        async def update_ticket(self, ticket_id: str, body: bytes, **kwargs: Any) -> Any:
            if ticket_id == "T-3":
                await self.others_lost.wait()
            try:
                return await self.each[ticket_id].update_ticket(ticket_id, body)
            finally:
                if ticket_id != "T-3":
                    self.lost += 1
                    if self.lost == 2:  # T-3 goes on once T-2's caller has taken in its failure
                        self.others_lost.set()

        async def show_ticket(self, ticket_id: str) -> dict[str, Any]:
            return await self.each[ticket_id].show_ticket(ticket_id)

        async def probe_write(self, ticket_id: str) -> None:
            return None

    client = EachTimesOutThenLands()
    caller = ApiCaller(client, SHORT_BUDGET, rig.gate, rig.metrics, 1e-6, settle_s=0.5, abandon_s=2.0)  # type: ignore[arg-type]

    async def apply(ticket_id: str) -> ApplyResult:
        return await caller.apply(
            ticket_id,
            b"{}",
            event_id=f"ev-{ticket_id}",
            traceparent=TRACEPARENT,
            confirm=lambda detail: bool(detail["landed"]),
        )

    results = await asyncio.wait_for(asyncio.gather(*(apply(t) for t in client.each)), 5)
    # The first two ran out of budget before a third event had failed: failed, as before.
    assert [(r.status, r.calls, r.reconciled) for r in results] == [
        ("failed", 1, False),
        ("failed", 1, False),
        ("applied", 1, True),
    ]
    assert client.each["T-3"].puts == 1
    assert rig.sample("coc_worker_pauses_total", kind="api_failing") == 1.0


@pytest.mark.parametrize(
    "first",
    [
        ApiTransientError("read timeout", timed_out=True),
        ApiTransientError("connection lost after the request was sent", ambiguous=True),
        ApiTransientError("HTTP 502", http_status=502, ambiguous=True),
    ],
    ids=["timeout", "dropped-after-send", "502"],
)
async def test_a_lost_answer_is_read_only_once_the_request_may_have_landed(
    rig: Rig, first: ApiTransientError
) -> None:
    """Only a timeout waited ``settle_s`` before the ticket was read: after a connection dropped
    once the request was written, or a gateway's 502, the read came at once, did not show the
    change still under way behind it, and the change was sent a second time."""
    client = _TimesOutThenLands(late_s=0.3, first=first)
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0, settle_s=0.5, abandon_s=2.0)  # type: ignore[arg-type]
    result = await asyncio.wait_for(
        rig.apply(caller, confirm=lambda detail: bool(detail["landed"]), ambiguous=False), 5
    )
    assert (result.status, result.calls, result.reconciled) == ("applied", 1, True)
    assert client.puts == 1


async def test_a_job_cancelled_while_its_timed_out_request_may_land_leaves_the_wait_to_the_next(
    rig: Rig,
) -> None:
    """A job whose PUT timed out waits ``settle_s`` before it reads the ticket, and is cancelled in
    that wait (a revocation past its grace). The event's next job (the partition back at this
    worker, which takes its own claim over at once) read the ticket at once, found nothing and sent
    again; the late first request could then land after the ticket's next event. It waits for the
    settle time now, like the next job after a request cancelled mid-send."""
    client = _TimesOutThenLands(late_s=0.3)
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0, settle_s=0.5, abandon_s=2.0)  # type: ignore[arg-type]

    def confirm(detail: dict[str, Any]) -> bool:
        return bool(detail["landed"])

    with capture_logs() as logs:
        first = asyncio.create_task(rig.apply(caller, confirm=confirm))
        await until(lambda: any(e["event"] == "api_retry" for e in logs))  # in its settle wait
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

        result = await asyncio.wait_for(rig.apply(caller, confirm=confirm, ambiguous=True), 5)

    assert (result.status, result.calls, result.reconciled) == ("applied", 0, True)
    assert client.puts == 1
    assert any(e["event"] == "api_waiting_for_abandoned_request" for e in logs)


class _OneTicketForbidden:
    """A stand-in client: the credentials work, but ticket ``T-X`` is outside their scope, and the
    API refuses its reads as well as its changes with 403 (the simulator refuses writes only)."""

    def __init__(self) -> None:
        self.probed: list[str] = []

    def refresh_credentials(self) -> None:
        return None

    async def update_ticket(self, ticket_id: str, body: bytes, **kwargs: Any) -> Any:
        if ticket_id == "T-X":
            raise ApiAuthError("HTTP 403: credentials refused (APIGW.0302)", http_status=403)
        return ApiResponse(200, UpdateTicketResponse(), 0.0)

    async def probe(self, ticket_id: str) -> None:
        self.probed.append(ticket_id)
        if ticket_id == "T-X":
            raise ApiAuthError("HTTP 403: credentials refused (APIGW.0302)", http_status=403)

    async def probe_write(self, ticket_id: str) -> None:
        self.probed.append(f"PUT {ticket_id}")


async def test_a_ticket_refused_even_to_reads_does_not_keep_every_ticket_paused(rig: Rig) -> None:
    """The auth probe read the refused event's own ticket; refused there too, the gate never
    opened, and one ticket outside the credentials' scope paused every event of every ticket until
    a restart (and again after it). The probe reads a ticket the API has answered for instead."""
    client = _OneTicketForbidden()
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0)  # type: ignore[arg-type]

    async def put(ticket_id: str, event_id: str) -> ApplyResult:
        return await caller.apply(ticket_id, b"{}", event_id=event_id, traceparent=TRACEPARENT)

    assert (await put("T-OK", "ev-1")).status == "applied"
    refused = await asyncio.wait_for(put("T-X", "ev-2"), 5)
    assert (refused.status, refused.http_status) == ("rejected", 403)
    assert client.probed
    assert set(client.probed) == {"T-OK"}
    assert (await asyncio.wait_for(put("T-OK", "ev-3"), 5)).status == "applied"


async def test_the_later_events_of_a_ticket_refused_after_verification_do_not_pause_again(rig: Rig) -> None:
    """Each event of a ticket outside the credentials' scope paused the whole worker once (its
    first 403), every pause longer than the one before as the gate's backoff carried over: seven
    events, seven pauses heading for 30 s, /readyz 503 for every ticket meanwhile. Once one event
    of the ticket was refused after the probe verified the credentials, a later event's 403 is the
    ticket's own while the credentials have worked within the last seconds (here: the probe)."""
    client = _OneTicketForbidden()
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0)  # type: ignore[arg-type]

    async def put(ticket_id: str, event_id: str) -> ApplyResult:
        return await asyncio.wait_for(
            caller.apply(ticket_id, b"{}", event_id=event_id, traceparent=TRACEPARENT), 5
        )

    assert (await put("T-OK", "ev-0")).status == "applied"
    results = [await put("T-X", f"ev-{n}") for n in range(1, 8)]
    assert [(r.status, r.http_status) for r in results] == [("rejected", 403)] * 7
    assert [r.calls for r in results] == [2] + [1] * 6  # the first met its 403 twice, the rest once
    assert rig.sample("coc_worker_pauses_total", kind="api_auth") == 1.0
    assert client.probed == ["T-OK"]  # the gate's one probe: no request beyond the events' own
    assert (await put("T-OK", "ev-9")).status == "applied"


def test_tickets_refused_are_remembered_for_a_while_and_at_most_so_many(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded both ways: an entry expires (a permission granted meanwhile is used), and past the
    limit the oldest goes."""
    monkeypatch.setattr(apply_module, "_NOT_PERMITTED_MAX", 3)
    caller = ApiCaller(_OneTicketForbidden(), FAST, rig.gate, rig.metrics, 60.0)  # type: ignore[arg-type]
    for ticket in ("T-1", "T-2", "T-3", "T-2", "T-4"):  # T-2 again: now the newest
        caller._remember_not_permitted(ticket)
    assert list(caller._not_permitted) == ["T-3", "T-2", "T-4"]
    assert caller._known_not_permitted("T-3")
    assert not caller._known_not_permitted("T-1")
    caller._not_permitted["T-3"] = caller._not_permitted["T-2"] = 0.0  # expired
    caller._remember_not_permitted("T-5")
    assert list(caller._not_permitted) == ["T-4", "T-5"]


async def test_credentials_that_fail_everywhere_pause_even_for_a_ticket_refused_before(rig: Rig) -> None:
    """A ticket remembered as refused must not turn an outage of the credentials (a policy
    detached) into dead letters: once nothing has shown them working for a few seconds, its next
    403 pauses the worker as any ticket's does, and the probe finds them refused everywhere."""
    client = _OneTicketForbidden()
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0)  # type: ignore[arg-type]
    assert (await caller.apply("T-OK", b"{}", event_id="ev-0", traceparent=TRACEPARENT)).status == "applied"
    first = await asyncio.wait_for(caller.apply("T-X", b"{}", event_id="ev-1", traceparent=TRACEPARENT), 5)
    assert first.status == "rejected"

    async def refused_everywhere(ticket_id: str) -> None:
        client.probed.append(ticket_id)
        raise ApiAuthError("HTTP 403: credentials refused (APIGW.0302)", http_status=403)

    client.probe = refused_everywhere  # type: ignore[method-assign]
    client.probe_write = refused_everywhere  # type: ignore[method-assign]
    caller._verified_at -= 10.0  # ten seconds on, with nothing applied meanwhile
    later = asyncio.ensure_future(caller.apply("T-X", b"{}", event_id="ev-2", traceparent=TRACEPARENT))
    await until(lambda: not rig.gate.is_open, what="the pause")
    assert not later.done()
    assert rig.sample("coc_worker_pauses_total", kind="api_auth") == 2.0
    later.cancel()
    await asyncio.gather(later, return_exceptions=True)


async def test_a_ticket_refused_even_to_reads_before_any_ticket_answered_does_not_pause_for_ever(
    rig: Rig,
) -> None:
    """With no ticket answered yet (the refused event the first since a start), the probe read that
    same ticket, was refused for ever, and nothing else could run to give it another: every event
    stayed paused, and after a restart the same message came first again. The probe now asks a
    ticket no event names whether the credentials work at all."""
    client = _OneTicketForbidden()
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0)  # type: ignore[arg-type]

    refused = await asyncio.wait_for(caller.apply("T-X", b"{}", event_id="ev-1", traceparent=TRACEPARENT), 5)

    assert (refused.status, refused.http_status) == ("rejected", 403)
    assert client.probed[:2] == ["T-X", UNNAMED_TICKET]
    assert rig.gate.is_open


async def test_credentials_refused_everywhere_stay_paused_until_they_work(rig: Rig) -> None:
    """The fallback must not open the gate for credentials that no ticket accepts."""
    client = _OneTicketForbidden()
    works = asyncio.Event()

    async def probe(ticket_id: str) -> None:
        client.probed.append(ticket_id)
        if not works.is_set():
            raise ApiAuthError("HTTP 403: credentials refused (APIGW.0302)", http_status=403)

    async def probe_write(ticket_id: str) -> None:
        client.probed.append(f"PUT {ticket_id}")
        if not works.is_set():
            raise ApiAuthError("HTTP 403: credentials refused (APIGW.0302)", http_status=403)

    client.probe = probe  # type: ignore[method-assign]
    client.probe_write = probe_write  # type: ignore[method-assign]
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0)  # type: ignore[arg-type]
    job = asyncio.ensure_future(caller.apply("T-X", b"{}", event_id="ev-1", traceparent=TRACEPARENT))
    await until(lambda: client.probed.count(f"PUT {UNNAMED_TICKET}") >= 2)
    assert not job.done()
    assert not rig.gate.is_open
    works.set()
    result = await asyncio.wait_for(job, 5)
    assert (result.status, result.http_status) == ("rejected", 403)  # T-X itself is still refused


# --------------------------------------------------------------------------- reads after a lost answer


async def test_reads_after_a_lost_answer_back_off_and_wait_for_the_rate_limit(rig: Rig) -> None:
    """The ticket unreadable after a lost answer: its reads were retried with the first attempt's
    backoff for the whole budget (~40 GETs a second here, ~1,000 per event with the defaults) and
    bypassed the rate limit. Now their backoff grows and each read waits for the limit."""
    state = rig.sim.state
    state.set_faults(error_ratio=1.0, error_statuses=[503])
    policy = RetryPolicy(max_attempts=3, max_elapsed_s=1.0, base_delay_s=0.05, max_delay_s=0.4)
    event = started()
    result = await rig.apply(
        rig.caller(policy), event, confirm=lambda detail: already_applied(event, detail), ambiguous=True
    )
    assert result.status == "failed"
    gets = [r for r in state.requests if r.method == "GET"]
    assert 2 <= len(gets) <= 20  # the bug read ~40 a second; full jitter makes 13 possible (~0.2%)
    state.requests.clear()
    limited = rig.caller(policy, rate_limit=TokenBucket(4.0, 1, rig.metrics))
    await rig.apply(limited, event, confirm=lambda detail: already_applied(event, detail), ambiguous=True)
    at = [r.at for r in state.requests if r.method == "GET"]
    assert len(at) >= 2
    assert min(b - a for a, b in itertools.pairwise(at)) >= 0.2  # 4 a second at most


async def test_waiting_for_the_rate_limit_is_not_taken_off_the_retry_budget(rig: Rig) -> None:
    """A backlog makes the rate limit hand out slots far ahead; that wait is the limit's, not the
    event's. Before, it counted against the budget, and one 503 after a long wait failed the event
    without a retry."""
    state = rig.sim.state
    state.set_faults(error_ratio=1.0, error_statuses=[503])
    bucket = TokenBucket(2.0, 1, rig.metrics)
    await bucket.acquire()  # the slot now taken by another event: this one waits 0.5 s for its own
    policy = RetryPolicy(max_attempts=5, max_elapsed_s=0.4, base_delay_s=0.01, max_delay_s=0.02)
    attempts = Attempts(actions={2: lambda: state.set_faults(error_ratio=0.0)})
    result = await rig.apply(rig.caller(policy, rate_limit=bucket), hook=attempts)
    assert (result.status, result.calls) == ("applied", 2)


async def test_jobs_cancelled_while_queued_for_a_concurrency_slot_give_their_rate_slots_back(
    rig: Rig,
) -> None:
    """A rebalance cancels every job queued for a concurrency slot. Each had already reserved its
    rate-limit slot (a burst of 51 lets them all through without a wait); before, those slots
    stayed reserved, and the next call waited 2 s for slots no call used (at a real rate of 10/s
    and 256 jobs, 25 s of no calls)."""
    bucket = TokenBucket(rate_per_s=0.5, burst=51, metrics=rig.metrics)
    concurrency = AdaptiveConcurrency(1, rig.metrics)
    caller = rig.caller(rate_limit=bucket, concurrency=concurrency)
    holding = asyncio.Event()

    async def hold_the_slot() -> None:
        holding.set()
        await asyncio.Event().wait()

    holder = asyncio.create_task(rig.apply(caller, before_send=hold_the_slot))
    await asyncio.wait_for(holding.wait(), 5)
    queued = [asyncio.create_task(rig.apply(caller, started(event_id=f"ev-{i}"))) for i in range(50)]
    await until(lambda: len(concurrency._waiters) == 50, what="every job queued for the slot")
    for task in [holder, *queued]:
        task.cancel()
    await asyncio.gather(holder, *queued, return_exceptions=True)

    await asyncio.wait_for(bucket.acquire(), 1.0)  # waited 2 s for the cancelled jobs' slots
    assert not rig.sim.state.requests  # no job made a call


async def test_a_claim_lost_before_the_send_gives_its_rate_slot_back(rig: Rig) -> None:
    """``before_send`` failed (the claim's lease taken over): no call was made with the slot."""
    bucket = TokenBucket(rate_per_s=0.5, burst=2, metrics=rig.metrics)

    class ClaimLost(Exception):
        pass

    async def lose_the_claim() -> None:
        raise ClaimLost

    with pytest.raises(ClaimLost):
        await rig.apply(rig.caller(rate_limit=bucket), before_send=lose_the_claim)
    await asyncio.wait_for(bucket.acquire(), 1.0)
    await asyncio.wait_for(bucket.acquire(), 1.0)  # waited 2 s for the slot no call used
    assert not rig.sim.state.requests


async def test_a_pause_while_renewing_the_claim_is_not_taken_off_the_retry_budget(rig: Rig) -> None:
    """The claim's renewal before a send waits at the gate while the dedup store is away; that
    pause counted against the event's budget, and the next 503 failed the event at once."""
    rig.sim.state.set_faults(error_ratio=1.0, error_statuses=[503])
    policy = RetryPolicy(max_attempts=4, max_elapsed_s=0.5, base_delay_s=0.01, max_delay_s=0.02)
    renewals = 0

    async def renew_after_an_outage() -> None:
        nonlocal renewals
        renewals += 1
        if renewals == 2:
            await asyncio.sleep(0.8)  # the store away: the gate closed for longer than the budget

    result = await rig.apply(rig.caller(policy), before_send=renew_after_an_outage)
    assert (result.status, result.calls) == ("failed", 4)  # failed after 2 calls, at the first 503 after it


async def test_only_an_events_first_retry_is_logged_at_info(rig: Rig) -> None:
    """One info line per attempt: 264 lines in 5 s at 10 events/s during an outage in an operator
    review, thousands at 256 in flight. The later ones are at debug; the metric counts them all."""
    rig.sim.state.set_faults(error_ratio=1.0, error_statuses=[503])
    policy = RetryPolicy(max_attempts=4, max_elapsed_s=5.0, base_delay_s=0.01, max_delay_s=0.02)
    with capture_logs() as logs:
        result = await rig.apply(rig.caller(policy))
    assert result.status == "failed"
    retries = [(e["log_level"], e["attempt"]) for e in logs if e["event"] == "api_retry"]
    assert retries == [("info", 1), ("debug", 2), ("debug", 3)]


async def test_the_reads_that_settle_a_lost_answer_log_their_retries_at_debug(rig: Rig) -> None:
    """After a lost answer the worker reads the ticket, sending nothing: every such round counted
    as the event's first retry (one send so far), so an outage of 504s logged each at info."""
    rig.sim.state.set_faults(error_ratio=1.0, error_statuses=[504])
    policy = RetryPolicy(max_attempts=4, max_elapsed_s=1.0, base_delay_s=0.01, max_delay_s=0.02)
    with capture_logs() as logs:
        result = await rig.apply(rig.caller(policy), confirm=lambda _: False)
    assert result.status == "failed"
    levels = [(e["log_level"], e["reading"]) for e in logs if e["event"] == "api_retry"]
    assert len(levels) > 2
    assert levels[0][0] == "info"
    assert {level for level, _ in levels[1:]} == {"debug"}
    assert any(reading for _, reading in levels)


class _StandIn:
    """A stand-in client, scripted per test: the API's answers without a simulator."""

    base_url = "http://coc.example.test"
    proxy_variable = None

    def __init__(self) -> None:
        self.up = True
        self.puts = 0
        self.reads = 0
        self.probed = 0

    async def update_ticket(self, ticket_id: str, body: bytes, **kwargs: Any) -> Any:
        self.puts += 1
        return await self.put(self.puts)

    async def put(self, n: int) -> Any:
        if not self.up:
            raise ApiTransientError("cannot connect to the API", connect_failure=True)
        return ApiResponse(200, UpdateTicketResponse(), 0.0)

    async def show_ticket(self, ticket_id: str) -> Any:
        self.reads += 1
        return await self.read(self.reads)

    async def read(self, n: int) -> Any:
        return {"ticket_id": "CM1"}

    async def probe(self, ticket_id: str) -> None:
        self.probed += 1
        if not self.up:
            raise ApiTransientError("cannot connect to the API", connect_failure=True)

    async def probe_write(self, ticket_id: str) -> None:
        self.probed += 1


class _BackButThatTicketUnreadable(_StandIn):
    """The API comes back, but a read of the ticket that tripped the pause answers 503."""

    async def probe(self, ticket_id: str) -> None:
        await super().probe(ticket_id)
        raise ApiTransientError("HTTP 503 (GOM.00009503)", http_status=503)


async def test_an_unreachable_pause_ends_on_any_http_answer_of_its_probe(rig: Rig) -> None:
    """The probe reads the ticket of the event that tripped the pause, and only a 401/403 counted as
    an answer besides a success: a 5xx of that one ticket's read (a fault of the ticket, a detail
    endpoint failing while changes work) kept every ticket paused after the API was back."""
    client = _BackButThatTicketUnreadable()
    client.up = False
    caller = ApiCaller(client, SHORT_BUDGET, rig.gate, rig.metrics, 0.05)  # type: ignore[arg-type]
    task = asyncio.create_task(caller.apply("CM1", b"{}", event_id="ev-1", traceparent=TRACEPARENT))
    try:
        await until(lambda: rig.gate.causes == ["api_unreachable"])
        client.up = True
        result = await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert result.status == "applied"
    assert rig.gate.is_open


class _LostThenFailing(_StandIn):
    """The first send's answer is lost (the change made); the ticket read does not show it (the
    API's detail has no sub-ticket state); every later send answers 503."""

    async def put(self, n: int) -> Any:
        if n == 1:
            raise ApiTransientError("HTTP 504", http_status=504, ambiguous=True)
        raise ApiTransientError("HTTP 503 (GOM.00009503)", http_status=503)


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_failure_after_an_unconfirmed_lost_answer_says_it_may_be_applied(
    rig: Rig, attempts: int
) -> None:
    """``*_maybe_applied`` marked a refusal after a lost answer the ticket read could not confirm,
    not a failure: the outcome said ``retries_exhausted``, "not changed", of a change in place."""
    policy = RetryPolicy(max_attempts=attempts, max_elapsed_s=5.0, base_delay_s=0.001, max_delay_s=0.002)
    caller = ApiCaller(_LostThenFailing(), policy, rig.gate, rig.metrics, 60.0)  # type: ignore[arg-type]
    result = await caller.apply(
        "CM1", b"{}", event_id="ev-1", traceparent=TRACEPARENT, confirm=lambda detail: False
    )
    assert (result.status, result.maybe_applied) == ("failed", True)
    assert "may already be in place" in result.detail


class _ReadsAfterALostAnswer(_StandIn):
    """The first send's answer is lost; the first read of the ticket fails as ``first_read`` says,
    the next shows the change."""

    def __init__(self, first_read: ApiTransientError) -> None:
        super().__init__()
        self.first_read = first_read

    async def put(self, n: int) -> Any:
        if n == 1:
            raise ApiTransientError("HTTP 504", http_status=504, ambiguous=True)
        return await super().put(n)

    async def read(self, n: int) -> Any:
        if n == 1:
            raise self.first_read
        return {"ticket_id": "CM1", "applied": True}


async def test_a_read_that_settles_a_lost_answer_clears_the_connect_failures_before_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connect failure of the first read, then a read that answers: the event ended reconciled,
    and the failure's start was kept, so the next event's first connect failure, any time later,
    paused the whole worker as unreachable at once."""
    client = _ReadsAfterALostAnswer(ApiTransientError("cannot connect to the API", connect_failure=True))
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 0.05)  # type: ignore[arg-type]
    first = await caller.apply(
        "CM1", b"{}", event_id="ev-1", traceparent=TRACEPARENT, confirm=lambda detail: "applied" in detail
    )
    assert (first.status, first.reconciled) == ("applied", True)
    later = time.monotonic() + 1.0  # past the threshold, as after an idle while
    monkeypatch.setattr(apply_module, "time", types.SimpleNamespace(monotonic=lambda: later))
    assert not caller._reachability.connect_failed()  # the next blip starts a new count


async def test_a_429_on_a_read_halves_the_concurrency_limit_as_on_a_send(rig: Rig) -> None:
    """Reads go behind the same limits as sends (README), but only a send's 429 lowered the
    adaptive limit: reads throttled by the API (the young store's window reads before every
    event) kept coming at the full limit."""
    limit = AdaptiveConcurrency(64, rig.metrics)
    client = _ReadsAfterALostAnswer(ApiTransientError("HTTP 429", http_status=429))
    caller = ApiCaller(client, FAST, rig.gate, rig.metrics, 60.0, concurrency=limit)  # type: ignore[arg-type]
    result = await caller.apply(
        "CM1", b"{}", event_id="ev-1", traceparent=TRACEPARENT, confirm=lambda detail: "applied" in detail
    )
    assert result.status == "applied"
    assert limit.limit == 32
