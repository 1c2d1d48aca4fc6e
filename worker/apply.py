"""Call the API for one event until it is applied, rejected, or out of retry budget.

This is where the retry policy meets the gate: transient errors back off (``worker.retry``),
systemic ones (credentials refused, API unreachable past the threshold) trip the gate and wait
for it without spending the message's budget, so an outage never turns into rejected or failed
events. A connect failure that outlives the budget is systemic too: the API is down, not the
event wrong. So is a run of server errors, throttling or timeouts that outlives it while no call
of any event has had a working answer for the threshold: the event pauses the worker instead of
failing (``api_failing``), and the probe, a change to a ticket no event names, must be answered
by something other than a server error before it is tried again. One ticket the API fails on
while others are answered (or the probe is) still ends ``failed``: the pause is for outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from worker.api_client import ApiResponse, CocApiClient
from worker.errors import ApiAuthError, ApiFailing, ApiRejected, ApiTransientError, ApiUnreachable
from worker.gate import Gate
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.ratelimit import AdaptiveConcurrency, RateLimit
from worker.retry import RetryPolicy

log = get_logger(__name__)


#: How long a ticket refused with 403 after the credentials were verified is taken as refused: its
#: later events end ``rejected`` at their first 403, without pausing the worker again.
_NOT_PERMITTED_FOR_S = 300.0
_NOT_PERMITTED_MAX = 10_000  # tickets remembered at most
#: How recent a sign that the credentials work must be for such a ticket's 403 to be its own:
#: credentials detached everywhere since must pause the worker, not dead-letter its events.
_VERIFIED_FOR_S = 5.0


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
    #: Not applied as far as the worker knows, but an attempt's answer was lost and the ticket
    #: did not confirm either way: the change may be in place (``*_maybe_applied`` reasons).
    maybe_applied: bool = False


#: Events whose calls must have failed (server errors, 429s, timeouts) since the API's last working
#: answer before one that runs out of budget pauses the worker: an outage, not the last few events
#: of a run failing alone (the soak's tail: an idle worker cannot tell that from an outage).
OUTAGE_MIN_EVENTS = 3


class Reachability:
    """Tracks how long every API call has failed to connect (any HTTP answer resets it), and when
    the API last gave a working answer (a success or a refusal: not a server error, a 429 or a
    timeout) and how many events' calls have failed since."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self._failing_since: float | None = None
        #: Counted from the start: a worker started into an outage has had no working answer.
        self._answered_at = time.monotonic()
        self._failed_events: set[str] = set()  # since the last working answer, up to the minimum

    def reached(self) -> None:
        self._failing_since = None

    def answered(self) -> None:
        """A working answer (it reached the API too)."""
        self.reached()
        self._answered_at = time.monotonic()
        self._failed_events.clear()

    def failed(self, event_id: str) -> None:
        """A call of ``event_id`` answered with a server error, a 429 or not in time."""
        self.reached()
        if len(self._failed_events) < OUTAGE_MIN_EVENTS:
            self._failed_events.add(event_id)

    def failing(self) -> bool:
        """Whether no call has had a working answer for the threshold, while the calls of several
        events failed."""
        return (
            len(self._failed_events) >= OUTAGE_MIN_EVENTS
            and time.monotonic() - self._answered_at >= self.threshold_s
        )

    def connect_failed(self) -> bool:
        """Record a connect failure; ``True`` once failures have lasted past the threshold."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        return now - self._failing_since >= self.threshold_s


#: The ticket the auth probe reads when no ticket has answered yet: an id no deploy system uses.
UNNAMED_TICKET = "coc-worker-auth-probe"


class ApiCaller:
    """One event's change, applied at most once: signed sends with the retry policy and the limits
    in front, a lost answer settled by reading the ticket before anything is sent again, and the
    API's systemic failures (credentials, reachability) turned into pauses instead of outcomes."""

    def __init__(
        self,
        client: CocApiClient,
        policy: RetryPolicy,
        gate: Gate,
        metrics: Metrics,
        unreachable_threshold_s: float,
        rate_limit: RateLimit | None = None,
        concurrency: AdaptiveConcurrency | None = None,
        settle_s: float = 0.0,
        abandon_s: float = 0.0,
    ) -> None:
        """``settle_s``: after a send whose answer was lost (a read timeout, a dropped connection,
        a gateway's 502/504), wait at least this long before checking the ticket or sending
        again; the API may still be applying that request.
        ``abandon_s``: how long a request of a cancelled job may still reach the API."""
        self._client = client
        self._policy = policy
        self._gate = gate
        self._metrics = metrics
        self._reachability = Reachability(unreachable_threshold_s)
        self._rate_limit = rate_limit
        self._concurrency = concurrency or AdaptiveConcurrency(1 << 30, metrics)
        self._settle_s = settle_s
        #: event_id -> until when a PUT of it, left behind by a cancelled job, may still reach the
        #: API: the HTTP client does not abort a request whose caller was cancelled (one waiting
        #: for a connection is even sent later), so the next job of that event must not read the
        #: ticket and send before then
        self._abandoned: dict[str, float] = {}
        self._abandon_s = abandon_s
        #: The last ticket the API applied a change to: the auth probe reads it when there is one.
        #: A ticket outside the credentials' scope is refused on reads too, and a probe of that
        #: ticket kept every event of every ticket paused; the refused event, once the gate opens,
        #: meets its second 403 and ends rejected.
        self._answered_ticket: str | None = None
        #: ticket_id -> until when (monotonic) a 403 for it is the ticket's own: it was refused
        #: again after the probe verified the credentials. Each event of such a ticket paused the
        #: whole worker once, the gate's backoff growing with every one (1.8, 3.2, 7.8, 11.5 s...).
        self._not_permitted: dict[str, float] = {}
        #: When the credentials last worked (a change applied, the auth probe passed; monotonic).
        self._verified_at = -math.inf

    def _known_not_permitted(self, ticket_id: str) -> bool:
        until = self._not_permitted.get(ticket_id)
        return until is not None and until > time.monotonic()

    def _remember_not_permitted(self, ticket_id: str) -> None:
        """For ``_NOT_PERMITTED_FOR_S``: a permission granted meanwhile is used within minutes,
        and credentials that stopped working everywhere still pause at another ticket's 403."""
        now = time.monotonic()
        remembered = self._not_permitted
        remembered.pop(ticket_id, None)  # to the end: the dict stays in order of expiry
        # the oldest go first: expired, or when there is no room
        while remembered and (
            len(remembered) >= _NOT_PERMITTED_MAX or next(iter(remembered.values())) <= now
        ):
            del remembered[next(iter(remembered))]
        remembered[ticket_id] = now + _NOT_PERMITTED_FOR_S

    def _trip_auth(self, exc: ApiAuthError, ticket_id: str) -> None:
        async def probe() -> None:
            """Each question in turn, the next asked only when this one is refused with 403 (the
            credentials authenticate, but may not do that); any other refusal is the answer."""
            client = self._client
            client.refresh_credentials()
            answered = self._answered_ticket
            questions: list[Callable[[], Awaitable[None]]] = (
                # A ticket the API has answered for: one outside the credentials' scope kept
                # every event of every ticket paused.
                [lambda: client.probe(answered)]
                if answered is not None
                # None answered yet (the first event since a start may be the refused one): then
                # a ticket no event names, which a working key reads as "no such ticket".
                else [lambda: client.probe(ticket_id), lambda: client.probe(UNNAMED_TICKET)]
            )
            # Reads refused everywhere: credentials that may change tickets but not read them (the
            # reference names only the update permission for this call). A change that changes
            # nothing.
            questions.append(lambda: client.probe_write(UNNAMED_TICKET))
            for i, ask in enumerate(questions):
                try:
                    await ask()
                    self._verified_at = time.monotonic()
                    return
                except ApiAuthError as refused:
                    if refused.http_status != 403 or i == len(questions) - 1:
                        raise

        self._gate.trip(exc, probe)

    def _trip_failing(self, error: ApiTransientError) -> None:
        """Pause on ``api_failing`` (see ``Reachability.failing``)."""

        async def probe() -> None:
            # A change to a ticket no event names changes nothing; any answer but a server error,
            # a 429 or a timeout says the API works again (a refusal of the credentials too: the
            # next attempt pauses on that cause, whose probe knows what to do).
            with contextlib.suppress(ApiAuthError):
                await self._client.probe_write(UNNAMED_TICKET)
            self._reachability.answered()

        self._gate.trip(
            ApiFailing(
                f"{error.detail}: no API call has had a working answer for"
                f" {self._reachability.threshold_s:g} s or more (COC_WORKER_API_UNREACHABLE_THRESHOLD_S),"
                f" the calls of {OUTAGE_MIN_EVENTS} events or more failed, and an event's retry budget"
                " ran out"
            ),
            probe,
        )

    def _trip_unreachable(self, detail: str, ticket_id: str) -> None:
        async def probe() -> None:
            # A 401/403 is an answer: the API is back. Clearing this cause lets the next attempt
            # trip the auth cause, whose probe re-reads the credentials (rotated while it was away).
            # So is any other HTTP answer (a 5xx, a 429): the probe reads one ticket, whose read
            # may fail on its own, and every ticket stayed paused on it (review).
            try:
                await self._client.probe(ticket_id)
            except ApiAuthError:
                pass
            except ApiTransientError as exc:
                if exc.connect_failure or exc.http_status is None:
                    raise
            self._reachability.reached()

        # Where it tried, and the settings that say so: a wrong endpoint is a likely cause, and so
        # is an egress proxy that refuses the tunnel (its reason is in ``detail``).
        where = self._client.base_url
        proxy = self._client.proxy_variable
        through = f", or the proxy in {proxy}" if proxy else ""
        self._gate.trip(
            ApiUnreachable(f"{detail} ({where}: COC_WORKER_API_ENDPOINT or _REGION{through})"), probe
        )

    async def _attempt(
        self,
        ticket_id: str,
        body: bytes,
        event_id: str,
        traceparent: str,
        before_send: Callable[[], Awaitable[None]] | None,
        waited: _Waited,
    ) -> ApiResponse:
        """One HTTP attempt behind the rate limit and the adaptive concurrency limit."""
        slot = await self._limits(waited)
        sending = False
        try:
            if before_send is not None:  # after the waits above, which have no bound of their own
                began = time.monotonic()
                # Its time is not the event's either: the claim's renewal waits at the gate while
                # the dedup store is away, and that pause used up the retry budget.
                await before_send()
                waited.s += time.monotonic() - began
            sending = True
            response = await self._client.update_ticket(
                ticket_id, body, event_id=event_id, traceparent=traceparent
            )
        except ApiTransientError as exc:
            if exc.http_status == 429:
                self._concurrency.throttled()
            raise
        except BaseException as exc:
            if not sending:  # cancelled or the claim lost before the send: the slot served no call
                await self._give_back_rate(slot)
            elif isinstance(exc, asyncio.CancelledError):  # a request made may still land
                self._abandon(event_id, time.monotonic() + self._abandon_s)
            raise
        finally:
            self._concurrency.release()
        self._concurrency.succeeded()
        return response

    async def _give_back_rate(self, slot: float | None) -> None:
        if self._rate_limit is not None and slot is not None:
            await self._rate_limit.give_back(slot)

    @property
    def waiting_for_slots(self) -> int:
        """Calls waiting for a concurrency slot, which other calls hold."""
        return self._concurrency.waiting

    def landing_until(self, event_id: str) -> float:
        """Until when (monotonic) a request of ``event_id`` left behind (``_abandon``) may still
        reach the API; 0 when none may."""
        return self._abandoned.get(event_id, 0.0)

    def _abandon(self, event_id: str, until: float) -> None:
        """A cancelled job leaves a request of ``event_id`` behind that may reach the API until
        ``until``: the event's next job waits for it, then reads the ticket before sending."""
        now = time.monotonic()
        for stale in [e for e, at in self._abandoned.items() if at <= now]:
            del self._abandoned[stale]
        self._abandoned[event_id] = max(until, self._abandoned.get(event_id, until))

    async def _limits(self, waited: _Waited) -> float | None:
        """Wait for the rate limit and a concurrency slot (the caller releases the slot); returns
        the rate slot (``RateLimit.acquire``), if any. The time waited is not the event's: it is
        taken off its retry budget."""
        began = time.monotonic()
        slot = None
        try:
            if self._rate_limit is not None:
                slot = await self._rate_limit.acquire()
            try:
                await self._concurrency.acquire()
            except asyncio.CancelledError:
                # A rebalance cancels every job queued here at once: slots they kept would hold
                # back the calls that follow, as in ``TokenBucket``'s own cancellation.
                await self._give_back_rate(slot)
                raise
        finally:
            waited.s += time.monotonic() - began
        return slot

    async def apply(
        self,
        ticket_id: str,
        body: bytes,
        *,
        event_id: str,
        traceparent: str,
        before_attempt: Callable[[], Awaitable[None]] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        confirm: Callable[[dict[str, Any]], bool] | None = None,
        ambiguous: bool = False,
        forgotten: bool = False,
    ) -> ApplyResult:
        """``confirm(ticket_detail)`` tells whether the change is already in place.

        ``before_attempt`` runs at the start of every round (a send, or a read of the ticket);
        ``before_send`` right before the change is sent, once the rate and concurrency limits have
        let it through: what must hold while the request is out (the claim's lease) is checked
        there, not before waits of unknown length.

        Once an attempt may have been applied without our knowing (a dropped connection, a read
        timeout, or a claim taken over from a crashed worker: ``ambiguous``), nothing is sent again
        until the ticket has been read: a change in place ends ``applied`` (reconciled); one that
        is not is sent again; while the ticket cannot be read, reading it is what is retried,
        within the same budget. So a change whose answer was lost is not applied twice.
        ``forgotten``: the dedup store may have forgotten an earlier send (``Claim.store_young``):
        the ticket is read first too, but no answer is known lost, so a refusal of the send that
        follows is an ordinary one, and a read 403 is not worth a warning per event.

        An event whose budget runs out while a request of it whose answer was lost may still land
        is given up only once it can no longer land. A job cancelled while such a request may still
        land (in its settle wait, or reading the ticket after it) leaves that request behind, as
        one cancelled mid-send does (``landing_until``).
        """
        unsettled = _Unsettled()
        try:
            return await self._rounds(
                ticket_id,
                body,
                event_id,
                traceparent,
                before_attempt,
                before_send,
                confirm,
                ambiguous,
                forgotten,
                unsettled,
            )
        except asyncio.CancelledError:
            if unsettled.until > time.monotonic():
                self._abandon(event_id, unsettled.until)
            raise

    async def _rounds(
        self,
        ticket_id: str,
        body: bytes,
        event_id: str,
        traceparent: str,
        before_attempt: Callable[[], Awaitable[None]] | None,
        before_send: Callable[[], Awaitable[None]] | None,
        confirm: Callable[[dict[str, Any]], bool] | None,
        ambiguous: bool,
        forgotten: bool,
        unsettled: _Unsettled,
    ) -> ApplyResult:
        """``apply``'s rounds; ``unsettled.until`` says until when a send whose answer was lost may
        land."""
        until = self._abandoned.get(event_id)
        if until is not None:
            # A cancelled job's request for this event may still be on its way: let it land, then
            # read the ticket before sending anything. The record goes only after the wait: this
            # job may be cancelled too while it waits, and the next one must wait as well.
            await _landed(until, "api_waiting_for_abandoned_request")
            if self._abandoned.get(event_id) == until:
                del self._abandoned[event_id]
            ambiguous = True
        # Read first only because the store may have forgotten: no answer of ours was lost.
        only_forgotten = forgotten and not ambiguous
        ambiguous = ambiguous or forgotten
        calls = 0  # times the change was sent: the outcome's attempts
        spent = 0  # sends that count against the budget (a 401 or an outage does not)
        rounds = 0  # failed rounds, sends and reads alike: the backoff grows with them
        forbidden = 0  # 403s met by this event
        active_s = 0.0  # time spent trying, time paused at the gate excluded
        error: ApiTransientError | None = None
        paused_failing = False  # this event has paused the worker as api_failing once
        #: A lost answer was followed by a read of the ticket that did not show the change: the
        #: API may not show it at all (its sub-tickets have no state), so a refusal of the send
        #: that follows may be of a change already made.
        unconfirmed = False
        while True:
            await self._gate.wait_open()
            if before_attempt is not None:
                await before_attempt()
            started = time.monotonic()
            waited = _Waited()
            sent = False  # whether this round sent the change (a read of the ticket is not a send)
            settling = False  # whether that send's answer was lost: it may still land
            try:
                if ambiguous and confirm is not None:
                    if await self._in_place(ticket_id, confirm, waited, quiet=only_forgotten):
                        log.info("api_reconciled", attempts=calls)
                        return ApplyResult("applied", calls, reconciled=True)
                    ambiguous = False  # read, and not there: safe to send
                    unconfirmed = unconfirmed or not only_forgotten
                    only_forgotten = False
                    unsettled.until = 0.0  # read after the settle wait: the request has landed or never will
                    if error is not None and spent >= self._policy.max_attempts:
                        return _failed(calls, active_s, error, applied_maybe=False, unconfirmed=unconfirmed)
                spent += 1
                calls += 1
                sent = True
                if calls > 1:
                    self._metrics.retries.inc()
                response = await self._attempt(ticket_id, body, event_id, traceparent, before_send, waited)
            except ApiAuthError as exc:
                self._reachability.answered()
                if sent:
                    spent -= 1
                forbidden += exc.http_status == 403
                if (
                    forbidden == 1
                    and self._known_not_permitted(ticket_id)
                    and time.monotonic() - self._verified_at < _VERIFIED_FOR_S
                ):
                    # Refused lately for an earlier event of this ticket, and the credentials
                    # worked moments ago (a change applied, the gate's probe passed): this 403 is
                    # the ticket's own, with no pause of every other ticket for it (each event of
                    # such a ticket paused the worker once, the backoff growing). Otherwise the
                    # pause and its probe find out whether they fail everywhere.
                    forbidden += 1
                if forbidden > 1:
                    # Refused again after the credentials were verified (the gate's probe read a
                    # ticket with them): they work, but may not do this (a read-only policy, a
                    # ticket outside their scope). Waiting would never end it.
                    self._remember_not_permitted(ticket_id)
                    detail = f"{exc}, again after the credentials were verified: not permitted"
                    return ApplyResult(
                        "rejected",
                        calls,
                        http_status=exc.http_status,
                        error_code=exc.error_code,
                        detail=f"{_UNCONFIRMED_NOTE}: {detail}" if unconfirmed else detail,
                        maybe_applied=unconfirmed,
                    )
                self._trip_auth(exc, ticket_id)
                continue
            except ApiRejected as exc:
                self._reachability.answered()
                error_msg, detail = exc.error_msg, exc.detail
                if unconfirmed:
                    # First: a record keeps the first 500 characters, and a redelivery repeats them.
                    error_msg = f"{_UNCONFIRMED_NOTE}: {error_msg or detail}"
                    detail = f"{_UNCONFIRMED_NOTE}: {detail}"
                return ApplyResult(
                    "rejected",
                    calls,
                    http_status=exc.http_status,
                    error_code=exc.error_code,
                    error_msg=error_msg,
                    detail=detail,
                    maybe_applied=unconfirmed,
                )
            except ApiTransientError as exc:
                ambiguous = ambiguous or exc.ambiguous
                # A send whose answer was lost (a timeout, a connection dropped after the request
                # was written, a 502/504 from a gateway) may still be under way behind it, for up
                # to settle_s: reading the ticket at once would not show it, and the change would
                # go out twice.
                settling = sent and (exc.ambiguous or exc.timed_out)
                if settling:
                    unsettled.until = time.monotonic() + self._settle_s
                if exc.connect_failure:
                    if self._reachability.connect_failed():
                        if sent:
                            spent -= 1
                        self._trip_unreachable(exc.detail, ticket_id)
                        continue
                else:
                    self._reachability.failed(event_id)
                # Without its traceback: kept past this block, it would hold this frame (and, below
                # it, the client's with their request bodies) in a cycle only the collector frees.
                error = exc.with_traceback(None)
            else:
                self._reachability.answered()
                self._answered_ticket = ticket_id
                self._verified_at = started  # the round's own clock read: no other on this path
                return ApplyResult("applied", calls, http_status=response.http_status, response=response)
            active_s += time.monotonic() - started - waited.s
            rounds += 1
            # Reading the ticket to settle a lost answer is safe: only the time budget bounds it
            # (and its backoff grows with the reads, as a send's does with the sends).
            will_read = ambiguous and confirm is not None
            delay = self._policy.next_delay(
                rounds if will_read else max(spent, 1),
                active_s,
                error,
                limit_attempts=not will_read,
                # the API may still be running the request whose answer was lost: let it settle
                at_least_s=self._settle_s if settling else 0.0,
            )
            if delay is None:
                if error.connect_failure:
                    if sent:
                        spent -= 1
                    self._trip_unreachable(error.detail, ticket_id)
                    continue
                if not paused_failing and self._reachability.failing():
                    # Not this event's fault: the API has answered nothing properly for a while.
                    # After the pause it gets one more try, and no second pause: a ticket the API
                    # fails on alone, slowly (a timeout as long as the threshold), tripped the
                    # gate again after each try and never ended.
                    paused_failing = True
                    if sent:
                        spent -= 1
                    self._trip_failing(error)
                    # A send whose answer was lost may still land: as a backoff would, wait before
                    # the ticket is read or the change sent again (the probe reopens in a moment).
                    await _landed(unsettled.until)
                    continue
                # Nor before the event is given up: its record frees it for another message of it
                # (a replay, a copy on another partition), which reads the ticket before it sends;
                # read before the request landed, the ticket showed nothing and the change went
                # out twice. The lease, renewed at the send for longer than that, still holds.
                await _landed(unsettled.until, "api_waiting_for_lost_answer")
                return _failed(calls, active_s, error, applied_maybe=ambiguous, unconfirmed=unconfirmed)
            # The first retry of an event at info, the later ones at debug (coc_worker_api_retries
            # counts them all): at 256 events in flight an outage wrote thousands of lines. By
            # round, not by send: the reads that settle a lost answer send nothing, and each of
            # them logged at info.
            (log.info if rounds == 1 else log.debug)(
                "api_retry", attempt=calls, reading=will_read, delay_s=round(delay, 3), detail=error.detail
            )
            await asyncio.sleep(delay)
            active_s += delay

    async def _in_place(
        self,
        ticket_id: str,
        confirm: Callable[[dict[str, Any]], bool],
        waited: _Waited,
        *,
        quiet: bool = False,
    ) -> bool:
        """Read the ticket: is the change there? Raises ``ApiTransientError`` when it cannot tell
        (the ticket unreadable), ``ApiAuthError`` on 401, like an attempt. Behind the same limits
        as a send: a read is a request to the same API. False when reads are not permitted (403:
        credentials that may change tickets but not read them): the send that follows decides, as
        against an API whose ticket detail does not show the change, and a refusal then says the
        change may be in place. ``quiet``: a read only because the store may have forgotten, made
        for every new event while it is young: a 403 is logged at debug, not once per event."""
        await self._limits(waited)
        try:
            detail = await self._client.show_ticket(ticket_id)
        except ApiAuthError as exc:
            if exc.http_status != 403:
                raise
            self._reachability.reached()
            (log.debug if quiet else log.warning)(
                "api_ticket_unreadable", ticket_id=ticket_id, detail=str(exc)
            )
            return False
        except ApiTransientError as exc:
            if exc.http_status == 429:  # a read is a request too: the limit halves, as for a send
                self._concurrency.throttled()
            raise
        finally:
            self._concurrency.release()
        if detail is None:
            self._reachability.reached()
            raise ApiTransientError("the ticket's state is unreadable after a lost answer")
        # A working answer: a connect failure before it (a blip on the first read) no longer
        # counts towards the unreachable threshold, which the next blip then tripped at once.
        self._reachability.answered()
        return confirm(detail)


@dataclass(slots=True)
class _Unsettled:
    """Until when (monotonic) a send of the event whose answer was lost may still land; 0 when
    none may."""

    until: float = 0.0


@dataclass(slots=True)
class _Waited:
    """Seconds a round spent waiting for the rate and concurrency limits."""

    s: float = 0.0


def _unconfirmed_note(ended: str) -> str:
    """What a refusal or failure says after a lost answer the ticket read did not confirm."""
    return (
        f"the change may already be in place ({ended} after an earlier attempt's answer was lost,"
        " and the ticket did not show the change)"
    )


_UNCONFIRMED_NOTE = _unconfirmed_note("refused")


async def _landed(until: float, said_as: str | None = None) -> None:
    """Wait until ``until`` (monotonic), when a request whose answer was lost can no longer land;
    ``said_as``: the info line that says so, with the wait."""
    wait_s = until - time.monotonic()
    if wait_s > 0:
        if said_as is not None:
            log.info(said_as, wait_s=round(wait_s, 3))
        await asyncio.sleep(wait_s)


def _failed(
    calls: int, active_s: float, error: ApiTransientError, *, applied_maybe: bool, unconfirmed: bool
) -> ApplyResult:
    """``applied_maybe``: the last answer was lost, the ticket unread; ``unconfirmed``: an earlier
    one was, and the ticket read then did not show the change (which such a read cannot always
    show): either way the change may be in place, and the outcome says so."""
    detail = f"gave up after {calls} attempts in {active_s:.1f}s: {error.detail}"
    if applied_maybe:
        detail += " (its answer was lost and the ticket could not be read: it may have been applied)"
    elif unconfirmed:
        detail += f" ({_unconfirmed_note('failed')})"
    return ApplyResult(
        "failed",
        calls,
        http_status=error.http_status,
        error_code=error.error_code,
        detail=detail,
        maybe_applied=applied_maybe or unconfirmed,
    )
