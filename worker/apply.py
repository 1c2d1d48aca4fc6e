"""Call the API for one event until it is applied, rejected, or out of retry budget.

This is where the retry policy meets the gate: transient errors back off (``worker.retry``),
systemic ones (credentials refused, API unreachable past the threshold) trip the gate and wait
for it without spending the message's budget, so an outage never turns into rejected or failed
events. A connect failure that outlives the budget is systemic too: the API is down, not the
event wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from worker.api_client import ApiResponse, CocApiClient
from worker.errors import ApiAuthError, ApiRejected, ApiTransientError, ApiUnreachable
from worker.gate import Gate
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.ratelimit import AdaptiveConcurrency, RateLimit
from worker.retry import RetryPolicy

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What the API made of one event: ``status`` is ``applied``, ``rejected`` or ``failed``."""

    status: str
    calls: int
    http_status: int | None = None
    error_code: str | None = None
    error_msg: str | None = None
    detail: str | None = None
    response: ApiResponse | None = None
    reconciled: bool = False


class Reachability:
    """Tracks how long every API call has failed to connect (any HTTP answer resets it)."""

    def __init__(self, threshold_s: float) -> None:
        self._threshold_s = threshold_s
        self._failing_since: float | None = None

    def reached(self) -> None:
        self._failing_since = None

    def connect_failed(self) -> bool:
        """Record a connect failure; ``True`` once failures have lasted past the threshold."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        return now - self._failing_since >= self._threshold_s


class ApiCaller:
    def __init__(
        self,
        client: CocApiClient,
        policy: RetryPolicy,
        gate: Gate,
        metrics: Metrics,
        unreachable_threshold_s: float,
        rate_limit: RateLimit | None = None,
        concurrency: AdaptiveConcurrency | None = None,
    ) -> None:
        self._client = client
        self._policy = policy
        self._gate = gate
        self._metrics = metrics
        self._reachability = Reachability(unreachable_threshold_s)
        self._rate_limit = rate_limit
        self._concurrency = concurrency or AdaptiveConcurrency(1 << 30, metrics)

    def _trip_auth(self, exc: ApiAuthError, ticket_id: str) -> None:
        async def probe() -> None:
            self._client.refresh_credentials()
            await self._client.probe(ticket_id)

        self._gate.trip(exc, probe)

    def _trip_unreachable(self, detail: str, ticket_id: str) -> None:
        async def probe() -> None:
            # A 401/403 is an answer: the API is back. Clearing this cause lets the next attempt
            # trip the auth cause, whose probe re-reads the credentials (rotated while it was away).
            with contextlib.suppress(ApiAuthError):
                await self._client.probe(ticket_id)
            self._reachability.reached()

        self._gate.trip(ApiUnreachable(detail), probe)

    async def _attempt(self, ticket_id: str, body: bytes, event_id: str, traceparent: str) -> ApiResponse:
        """One HTTP attempt behind the rate limit and the adaptive concurrency limit."""
        if self._rate_limit is not None:
            await self._rate_limit.acquire()
        await self._concurrency.acquire()
        try:
            response = await self._client.update_ticket(
                ticket_id, body, event_id=event_id, traceparent=traceparent
            )
        except ApiTransientError as exc:
            if exc.http_status == 429:
                self._concurrency.throttled()
            raise
        finally:
            self._concurrency.release()
        self._concurrency.succeeded()
        return response

    async def apply(
        self,
        ticket_id: str,
        body: bytes,
        *,
        event_id: str,
        traceparent: str,
        before_attempt: Callable[[], Awaitable[None]],
        confirm: Callable[[dict[str, Any]], bool] | None = None,
        ambiguous: bool = False,
    ) -> ApplyResult:
        """``confirm(ticket_detail)`` tells whether the change is already in place. It is asked
        whenever an earlier attempt may have been applied without our knowing (a dropped
        connection, a read timeout, or a claim taken over from a crashed worker: ``ambiguous``):
        before sending again, after a refusal, and before giving up. So a change whose answer was
        lost is reported ``applied`` (reconciled) and is not sent a second time."""
        calls = 0  # HTTP attempts made, reported in the outcome
        spent = 0  # attempts that count against the budget
        active_s = 0.0  # time spent trying, time paused at the gate excluded
        while True:
            await self._gate.wait_open()
            await before_attempt()
            if ambiguous and confirm is not None and await self._confirmed(ticket_id, confirm):
                log.info("api_reconciled", attempts=calls, before="retry")
                return ApplyResult("applied", calls, reconciled=True)
            calls += 1
            spent += 1
            if calls > 1:
                self._metrics.retries.inc()
            started = time.monotonic()
            try:
                response = await self._attempt(ticket_id, body, event_id, traceparent)
            except ApiAuthError as exc:
                self._reachability.reached()
                spent -= 1
                self._trip_auth(exc, ticket_id)
                continue
            except ApiRejected as exc:
                self._reachability.reached()
                if not (ambiguous and confirm is not None):
                    return _rejected(calls, exc)
                confirmed = await self._confirmed(ticket_id, confirm)
                if confirmed:
                    log.info("api_reconciled", attempts=calls, refused_with=exc.error_code)
                    return ApplyResult("applied", calls, reconciled=True)
                if confirmed is False:
                    return _rejected(calls, exc)
                # Unknown: the ticket could not be read. Neither applied nor refused for sure, so
                # try again within the budget rather than report a rejection that may be false.
                error = ApiTransientError(
                    f"refused after an ambiguous attempt, state unreadable: {exc.detail}"
                )
            except ApiTransientError as exc:
                ambiguous = ambiguous or exc.ambiguous
                if exc.connect_failure:
                    if self._reachability.connect_failed():
                        spent -= 1
                        self._trip_unreachable(exc.detail, ticket_id)
                        continue
                else:
                    self._reachability.reached()
                error = exc
            else:
                self._reachability.reached()
                return ApplyResult("applied", calls, http_status=response.http_status, response=response)
            active_s += time.monotonic() - started
            delay = self._policy.next_delay(spent, active_s, error)
            if delay is None:
                if error.connect_failure:
                    spent -= 1
                    self._trip_unreachable(error.detail, ticket_id)
                    continue
                if ambiguous and confirm is not None and await self._confirmed(ticket_id, confirm):
                    log.info("api_reconciled", attempts=calls, before="giving up")
                    return ApplyResult("applied", calls, reconciled=True)
                return ApplyResult(
                    "failed",
                    calls,
                    http_status=error.http_status,
                    error_code=error.error_code,
                    detail=f"gave up after {calls} attempts in {active_s:.1f}s: {error.detail}",
                )
            log.info("api_retry", attempt=calls, delay_s=round(delay, 3), detail=error.detail)
            await asyncio.sleep(delay)
            active_s += delay

    async def _confirmed(self, ticket_id: str, confirm: Callable[[dict[str, Any]], bool]) -> bool | None:
        """True/False from the ticket's state; ``None`` when the state could not be read."""
        try:
            detail = await self._client.show_ticket(ticket_id)
        except (ApiTransientError, ApiAuthError, ApiRejected) as exc:
            log.warning("api_reconcile_unreadable", detail=str(exc))
            return None
        if detail is None:
            return None
        return confirm(detail)


def _rejected(calls: int, exc: ApiRejected) -> ApplyResult:
    return ApplyResult(
        "rejected",
        calls,
        http_status=exc.http_status,
        error_code=exc.error_code,
        error_msg=exc.error_msg,
        detail=exc.detail,
    )
