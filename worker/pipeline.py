"""Carry one consumed message to exactly one outcome: dedup -> map -> apply -> publish.

``Pipeline.process(job)`` never raises (short of cancellation): every path ends with an outcome
event confirmed by the broker (plus a dead-letter record for ``invalid``, ``rejected`` and
``failed``), and only then does the job count as finished, so its offset may be committed.
Systemic failures of the dedup store or the broker wait at the gate instead of failing the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from schemas.api import wire_bytes
from schemas.events import AnyChangeEvent
from schemas.outcomes import DEAD_LETTER_STATUSES, OUTCOME_SCHEMA_VERSION, OutcomeStatus, dump_outcome
from worker.apply import ApiCaller, ApplyResult
from worker.consumer import Message
from worker.decode import Identity
from worker.dedup import Claim, ClaimKind, DedupRecord, DedupStore
from worker.errors import BrokerUnavailable, DeadLetterUnwritable, DedupUnavailable, InvalidEvent
from worker.gate import Gate
from worker.logs import (
    REDACTED,
    bind_message_context,
    get_logger,
    holds_secret,
    holds_secret_of,
    redact_cut,
    redact_text,
    redact_values,
)
from worker.mapping import already_applied, event_target, request_wire
from worker.metrics import Metrics
from worker.offsets import PartitionOffsets
from worker.publisher import DeadLetter, Publisher
from worker.retry import backoff_delay, half_to_full
from worker.settings import WorkerSettings
from worker.tracing import TraceContext

log = get_logger(__name__)
T = TypeVar("T")

#: The dead letter's detail a done-record keeps (redacted), so that a redelivery can repeat it.
_RECORD_DETAIL_CHARS = 500
#: A record's statuses (``DedupRecord.status``; "" is an applied one's, from an earlier release) of
#: an event that went to the API: a repeat of its outcome carries the request, as the first did.
_WITH_REQUEST = frozenset(
    {"", OutcomeStatus.APPLIED.value, OutcomeStatus.REJECTED.value, OutcomeStatus.FAILED.value}
)
_HELD_POLL_FIRST_S = 0.05
_HELD_POLL_MAX_S = 1.0
#: How long a cancelled job may spend handing its claim on (``Pipeline._let_go``): within the
#: waits of a stop and a revoke for their cancelled jobs (5 s).
_LET_GO_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Job:
    """One consumed message on its way to an outcome."""

    message: Message
    event: AnyChangeEvent | None
    invalid: InvalidEvent | None
    trace: TraceContext
    received_at: datetime
    received_mono: float
    #: What an invalid message's value still tells (``decode.decode_or_salvage``): its outcome is
    #: keyed by that ticket, so it takes that ticket's lane, after the ticket's earlier events.
    salvaged: Identity | None = None
    #: The partition's offsets this message was counted in (``Worker._dispatch``).
    taken_in: PartitionOffsets | None = None
    #: ``topic/partition/offset``, formatted once (the dedup store is told it on every call).
    source: str = field(init=False)
    #: The results topic has this message's outcome (its dead letter may still be owed): a job
    #: cancelled after that is not counted as abandoned (``Worker._abandon``).
    outcome_written: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        m = self.message
        self.source = f"{m.topic}/{m.partition}/{m.offset}"

    @property
    def position_key(self) -> str:
        """The dedup key of the message's position; '@' never occurs in an event_id."""
        return "@" + self.source

    @property
    def lane(self) -> str | None:
        if self.event is not None:
            return self.event.ticket_id
        return self.salvaged["ticket_id"] if self.salvaged is not None else None

    def log_context(self) -> dict[str, Any]:
        """The fields every log line about this message carries: an invalid message's name what
        its value or key still tells, as its outcome does."""
        m = self.message
        event_id: str | None
        ticket_id: str | None
        if self.event is not None:
            event_id, ticket_id = self.event.event_id, self.event.ticket_id
        else:
            salvaged = self.salvaged or {}
            event_id, ticket_id = salvaged.get("event_id"), salvaged.get("ticket_id")
        return {
            "topic": m.topic,
            "partition": m.partition,
            "offset": m.offset,
            "event_id": event_id,
            "ticket_id": ticket_id,
            "trace_id": self.trace.trace_id,  # the outcome's and the API call's: a line leads to both
        }


def _fingerprint(job: Job) -> str:
    """The message's key and value, in short ("#" and 16 hex digits)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in (job.message.key, job.message.value):
        digest.update(b"-" if part is None else b"+" + len(part).to_bytes(8, "big") + part)
    return "#" + digest.hexdigest()


#: The outcome's ids, the producer's text: a producer's mistake may put a secret there (a secret
#: key has the shape of an id). One that holds a secret of at least this many characters is
#: replaced whole; shorter registered values (a short access key in a test set-up) would cut
#: ordinary ids apart ("CM2025" out of a ticket "CM202511280001"). Every secret but the access
#: key id (not a secret by itself) is refused under 8 characters, so only an AK that short is
#: left in an id.
_OUTCOME_IDS = ("event_id", "ticket_id", "sub_ticket_id")
_ID_SECRET_MIN_CHARS = 8


def _dump(outcome: dict[str, Any]) -> bytes:
    """The outcome's bytes. When they hold a secret, the producer's text in them is scrubbed (in
    ``outcome`` too, whose ``ticket_id`` keys the record) and they are written again: the request
    (a comment may quote a secret) and an id that is one; the error texts are scrubbed as made."""
    payload = dump_outcome(outcome)
    if holds_secret(payload):
        outcome["request"] = redact_values(outcome["request"])
        for name in _OUTCOME_IDS:
            value = outcome[name]
            if value and holds_secret_of(value, _ID_SECRET_MIN_CHARS):
                outcome[name] = REDACTED
        payload = dump_outcome(outcome)
    return payload


def _as_repeat(letter: DeadLetter | None) -> DeadLetter | None:
    """The dead letter to send again after an unconfirmed write, marked as a possible repeat."""
    return replace(letter, redelivered=True) if letter is not None else None


class _ClaimLost(Exception):
    """Our lease expired and another worker took the event: go back and ask the store again."""


@dataclass(slots=True)
class _Sends:
    """Whether a job has come as far as sending its change (a request may have reached the API)."""

    began: bool = False


class Pipeline:
    """What happens to one message, from its claim to its outcome: decided once (dedup), applied
    at most once (the API caller), and answered exactly once (the outcome, and the dead letter when
    it was not applied), each durable before the next step relies on it."""

    def __init__(
        self,
        settings: WorkerSettings,
        store: DedupStore,
        caller: ApiCaller,
        publisher: Publisher,
        gate: Gate,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._store = store
        self._caller = caller
        self._publisher = publisher
        self._gate = gate
        self._metrics = metrics
        self._owner = settings.worker_id
        #: Who holds this process's claims: the worker id and a per-process nonce. Two processes
        #: given one COC_WORKER_WORKER_ID (or one restarted while its request may still land) each
        #: took the other's live claim for a cancelled job of its own, and both sent the change.
        self._claimant = f"{settings.worker_id}/{uuid.uuid4().hex[:8]}"
        #: One token per claim asked for (``_claim_when_free``), unique within ``_claimant``: a
        #: count, in hex ("0x1f"), not a uuid: one per event, on the hot path (0.06 us).
        self._tokens = map(hex, itertools.count(1))
        #: Hand-ons of cancelled jobs' claims still running (``_let_go``): kept until done, not
        #: cut by a second cancellation of their job.
        self._handing_on: set[asyncio.Task[None]] = set()
        #: event_id -> jobs waiting for the job of this worker that has that event in hand
        self._in_hand: dict[str, list[asyncio.Future[None]]] = {}

    @property
    def waiting_on_other_jobs(self) -> int:
        """Jobs waiting for other jobs of this worker: for one that has their event in hand, or for
        an API slot the others hold. Each is held by whatever holds those (a stop compares the jobs
        a pause holds with those running)."""
        twins = sum(not w.done() for waiters in self._in_hand.values() for w in waiters)
        return twins + self._caller.waiting_for_slots

    # --- the one entry point ----------------------------------------------------------------------
    async def process(self, job: Job) -> None:
        event = job.event
        bind_message_context(job.log_context())
        try:
            if event is None:
                assert job.invalid is not None
                await self._finish_invalid(job, job.invalid)
            else:
                await self._process_event(job, event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # top of the job: a bug must still end as an outcome, never a crash
            log.exception("pipeline_error", error=type(exc).__name__)
            await self._emit(
                job,
                OutcomeStatus.FAILED,
                reason="internal_error",
                error_msg=redact_cut(f"{type(exc).__name__}: {exc}", 500),
            )

    # --- stages -------------------------------------------------------------------------------------
    async def _finish_invalid(self, job: Job, invalid: InvalidEvent) -> None:
        """An invalid message has no usable event_id: its message position is its identity."""
        if await self._finish_at_position(job, OutcomeStatus.INVALID, invalid.reason, invalid.detail):
            log.info("event_invalid", reason=invalid.reason, detail=invalid.detail)

    async def _finish_at_position(
        self,
        job: Job,
        status: OutcomeStatus,
        reason: str,
        detail: str | None,
        body: dict[str, Any] | None = None,
    ) -> bool:
        """An outcome decided without the API (invalid, duplicate), remembered under the message's
        position, not its event_id; False when this message had an outcome there already (also a
        refusal or failure of its own, before another message of its event_id was applied), now
        repeated (marked ``redelivered``, as every outcome of a message read again). ``body``: the
        event's request, for a repeated outcome that carried one."""
        fingerprint = _fingerprint(job)
        claim, token, answered = await self._claim_position(job, fingerprint)
        if answered is not None:
            await self._repeat_outcome(job, answered, body)
            return False
        try:
            await self._remember(
                job.position_key, job, status, reason=reason, detail=detail, target=fingerprint, token=token
            )
        except asyncio.CancelledError:
            # nothing here is ever sent to the API
            await self._let_go(job.position_key, token, unsent=claim.record is None)
            raise
        await self._emit(job, status, reason=reason, error_msg=detail)
        return True

    async def _claim_position(self, job: Job, fingerprint: str) -> tuple[Claim, str, DedupRecord | None]:
        """The claim of the message's position (``Job.position_key``), its token, and the outcome
        this message (``fingerprint``) had there, if any: the same message, not another one at a
        position read again after its log was cut back (an unclean leader election, a recreated
        topic); a record without a fingerprint (an earlier release's) cannot tell."""
        key = job.position_key
        token = next(self._tokens)
        try:
            claim, _ = await self._claim_when_free(key, job.source, token)
        except asyncio.CancelledError:
            # As in _claim_and_apply: the claim may have been written without our knowing; it would
            # otherwise be kept for its whole lease, the message's next owner waiting it out.
            await self._let_go(key, token, unsent=False)
            raise
        record = claim.record
        if claim.kind is ClaimKind.DONE and record is not None and record.target in ("", fingerprint):
            return claim, token, record
        return claim, token, None

    async def _process_event(self, job: Job, event: AnyChangeEvent) -> None:
        """One job per event_id at a time in this worker. Two messages with one event_id but
        different tickets run in different lanes; the second would find the first's unfinished
        claim, which is ours, take it for a cancelled job of ours and send again. It waits, and is
        then decided as if it had come after (a duplicate, a reuse of the id for another change, or
        a retry of a failed event)."""
        event_id = event.event_id
        while (waiters := self._in_hand.get(event_id)) is not None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters.append(waiter)
            await waiter
        self._in_hand[event_id] = []
        try:
            await self._claim_and_apply(job, event)
        finally:
            for waiter in self._in_hand.pop(event_id):
                if not waiter.done():
                    waiter.set_result(None)

    async def _claim_and_apply(self, job: Job, event: AnyChangeEvent) -> None:
        body = request_wire(event)
        target = event_target(event)
        # A pass whose claim was lost after it sent: the request may have landed, and the next
        # claim (the store lost the first: a failover, an eviction) may not say so.
        sent_before = False
        position_token = ""  # of our claim of the message's position, if one was asked for
        while True:
            token = next(self._tokens)  # this claim's: a late hand-on of the last must not reach it
            try:
                claim, claimed_at = await self._claim_when_free(event.event_id, job.source, token, target)
            except asyncio.CancelledError:
                # The claim may have been written all the same (the store's call goes on without
                # its caller), over a record that is not known here: expired, never deleted.
                await self._let_go(event.event_id, token, unsent=False)
                raise
            if claim.kind in (ClaimKind.APPLIED, ClaimKind.DONE):
                await self._finish_known(job, event, target, body, claim.record)
                return
            before = claim.record
            while before is not None and before.state == "claimed" and before.replaced is not None:
                # Claims that did not finish (this message's, cancelled while its claim was written,
                # before it looked at its position or after it found nothing there and sent; or
                # another message's, a crashed replay): what they replaced is what this one must
                # look at. At most two deep (``records.claim_keeps``).
                before = before.replaced
            if before is not None and before.state == "done" and before.source != job.source:
                try:
                    answered, position_token = await self._answered_at_position(job)
                    if answered is not None:
                        await self._give_back(event.event_id, token, before)
                except asyncio.CancelledError:
                    await self._let_go(event.event_id, token, unsent=False)
                    raise
                if answered is not None:
                    await self._repeat_outcome(job, answered, body)
                    return
            if claim.taken_over:
                log.warning("claim_taken_over", previous_owner=claim.record.owner if claim.record else None)
            sends = _Sends()
            try:
                result = await self._apply(
                    job,
                    event,
                    wire_bytes(body),
                    ambiguous=claim.maybe_sent or sent_before,
                    forgotten=claim.store_young,
                    claimed_at=claimed_at,
                    token=token,
                    sends=sends,
                )
                if result.status != "applied":
                    await self._still_held(event.event_id, token)
            except _ClaimLost:
                log.warning("claim_lost")
                sent_before = sent_before or sends.began
                continue
            except asyncio.CancelledError:
                # A young store's claim over no record is no proof that nothing was sent before
                # (the store may have forgotten): kept, to be taken over and the ticket read.
                unsent = claim.record is None and not (claim.store_young or sends.began or sent_before)
                await self._let_go(event.event_id, token, unsent=unsent)
                raise
            break
        try:
            await self._finish_applied_or_not(job, event, target, body, result, token, position_token)
        except asyncio.CancelledError:  # before its record replaced the claim, or after: then a no-op
            await self._let_go(event.event_id, token, unsent=False)
            raise

    async def _let_go(self, key: str, token: str, *, unsent: bool) -> None:
        """Hand on the claim of a job cancelled while it held it (a stop or a revoke past its
        grace), so that the event's next owner need not wait out the lease (``dedup_lease_s``).
        ``unsent``: the claim replaced no record (in a store old enough to know) and nothing was
        sent under it: deleted, the next owner starts afresh. Otherwise it is made to expire at
        once, or once a request it left behind can no longer land: the next owner takes it over
        and reads the ticket first. Not behind the gate and bounded: while the store is away the
        lease runs out as before.

        ``token``: that claim's. A hand-on that timed out may still run later, after this process
        claimed the event again (a redelivery): matched by owner alone, it deleted or expired that
        newer claim, and another worker could claim the event and send it too. Run in a task of
        its own, shielded: a second cancellation of the job (a revoke's cancelled job hit again by
        a stop's) ends the job at once, not the hand-on, which ``handed_on`` waits for."""
        handing_on = asyncio.create_task(self._hand_on(key, token, unsent=unsent))
        self._handing_on.add(handing_on)
        handing_on.add_done_callback(self._handing_on.discard)
        await asyncio.shield(handing_on)

    async def _hand_on(self, key: str, token: str, *, unsent: bool) -> None:
        """``_let_go``'s store call, its failure logged: it ends no job, whoever awaits it."""
        try:
            let_go: Awaitable[object]
            if unsent:
                let_go = self._store.release(key, self._claimant, token=token)
            else:
                hold_s = max(0.0, self._caller.landing_until(key) - time.monotonic())
                let_go = self._store.extend(key, self._claimant, hold_s, token=token)
            await asyncio.wait_for(let_go, _LET_GO_TIMEOUT_S)
        except (DedupUnavailable, TimeoutError) as exc:
            log.info("claim_kept", detail=str(exc) or type(exc).__name__)
        except Exception:  # a bug here must not turn the cancellation into the job's failure outcome
            log.exception("claim_not_handed_on")

    async def handed_on(self) -> None:
        """Wait for the cancelled jobs' hand-ons still running (each 2 s at most, and so this): a
        stop closes the store only after them, or their claims would be kept for their lease."""
        if self._handing_on:
            await asyncio.wait(set(self._handing_on), timeout=_LET_GO_TIMEOUT_S)

    async def _still_held(self, event_id: str, token: str) -> None:
        """Raise ``_ClaimLost`` unless our claim still stands (renewed, for the writes that follow).

        Before the done-record of an event not applied: a long retry backoff or settle wait renews
        nothing, so the lease may have run out and another worker taken the event over and applied
        it; written over its applied record, a ``failed`` one sent the next copy of the event back
        to the API, and this message got a second, different outcome."""
        renewed = await self._dedup(
            lambda: self._store.extend(event_id, self._claimant, self._lease_s, token=token)
        )
        if not renewed:
            raise _ClaimLost

    async def _answered_at_position(self, job: Job) -> tuple[DedupRecord | None, str]:
        """This message's own outcome by position, when it was refused or failed before and another
        message of its event_id has finished since (whose record now stands under the event_id),
        and the token of the position's claim. Asked only then: on the path of a retried event,
        never of a first one."""
        claim, token, answered = await self._claim_position(job, _fingerprint(job))
        if claim.kind is ClaimKind.NEW:  # nothing there: the position is not ours to keep
            await self._let_go(job.position_key, token, unsent=claim.record is None)
        return answered, token

    async def _give_back(self, event_id: str, token: str, record: DedupRecord) -> None:
        """Put the other message's record back over our claim: the event_id stays as it finished.
        Only while the claim still stands (renewed first, and the write is over our claim only,
        ``DedupStore.mark_done``): the position's lookup may have waited out the lease (a pause),
        and another worker taken the event over; written over its claim, that worker lost it and
        sent again. The renewal also leaves alone a claim another worker took over and left
        unfinished (expired), which the done-record's rule would replace."""
        if await self._dedup(
            lambda: self._store.extend(event_id, self._claimant, self._lease_s, token=token)
        ):
            await self._dedup(
                lambda: self._store.mark_done(
                    event_id, record, self._settings.dedup_ttl_s, owner=self._claimant, token=token
                )
            )

    async def _claim_when_free(
        self, key: str, source: str, token: str, target: str = ""
    ) -> tuple[Claim, float]:
        """The store's claim of ``key``, once no other live worker holds it: while one does (a
        rebalance race), wait for it to finish, or for its lease to run out if it died. An
        outcome decided without the API (``_finish_at_position``) waits too: both workers went
        ahead, and both published it and its dead letter unmarked. With the claim, when it was
        asked for (``time.monotonic()``): its lease runs from no later than that.

        ``token`` (``_tokens``) is the claim's, whichever ask writes it: the asks while another
        worker holds the event write nothing, and those repeated while the store is away are one
        claim, so the caller's hand-on (``_let_go``) reaches a claim written by any of them."""
        polls = 0  # answers "held" so far
        while True:
            asked_at = time.monotonic()
            claim = await self._dedup(
                lambda: self._store.claim(key, self._claimant, source, self._lease_s, target, token)
            )
            if claim.kind is not ClaimKind.HELD:
                return claim, asked_at
            if not polls:
                log.info("event_claimed_elsewhere", owner=claim.record.owner if claim.record else None)
            polls += 1
            # Jittered: the workers waiting on one claim (a rebalance's) do not ask in lockstep.
            await asyncio.sleep(backoff_delay(polls, _HELD_POLL_FIRST_S, _HELD_POLL_MAX_S, half_to_full))

    async def _apply(
        self,
        job: Job,
        event: AnyChangeEvent,
        payload: bytes,
        *,
        ambiguous: bool,
        forgotten: bool,
        claimed_at: float,
        token: str,
        sends: _Sends,
    ) -> ApplyResult:
        # The lease runs from the store's write, which came before its answer (by up to a second
        # when a Redis write waits for its replicas): counted from the asking, so never too late.
        renewed_at = claimed_at

        async def renew_lease() -> None:
            # Right before each send, unless the lease still outlasts the longest a request may take
            # to reach the API (settings.api_abandon_s, which settings keep within the lease): no
            # other worker takes the event over while a request of ours, even one whose job was
            # cancelled, may still land. The usual send, just after the claim, renews nothing.
            nonlocal renewed_at
            sends.began = True
            if self._lease_s - (time.monotonic() - renewed_at) > self._settings.api_abandon_s:
                return
            asked_at = time.monotonic()
            await self._still_held(event.event_id, token)
            renewed_at = asked_at

        return await self._caller.apply(
            event.ticket_id,
            payload,
            event_id=event.event_id,
            traceparent=job.trace.child_traceparent(),
            before_send=renew_lease,
            confirm=lambda ticket: already_applied(event, ticket),
            ambiguous=ambiguous,
            forgotten=forgotten,
        )

    async def _finish_applied_or_not(
        self,
        job: Job,
        event: AnyChangeEvent,
        target: str,
        body: dict[str, Any],
        result: ApplyResult,
        token: str,
        position_token: str = "",
    ) -> None:
        """``target``: what the event changes (``event_target``), kept in its record; ``token``:
        the claim's, which the done-record of an event not applied may replace; ``position_token``:
        our claim's of the message's position, if the job looked there (``_answered_at_position``),
        which its record by position may replace (a hand-on that failed keeps it live)."""
        if result.status == "applied":
            reason = "reconciled" if result.reconciled else None
            # The last write for this event: with it, a redelivery repeats the outcome below
            # (published or not) and never calls the API again, so a done-record after the
            # outcome would tell nothing more. It saves one durable write per applied event.
            record = self._record("applied", job, OutcomeStatus.APPLIED, result, reason, target=target)
            await self._dedup(
                lambda: self._store.mark_applied(event.event_id, record, self._settings.dedup_ttl_s)
            )
            log.debug("event_applied", attempts=result.calls)  # the outcome topic is the record
            await self._emit(
                job,
                OutcomeStatus.APPLIED,
                reason=reason,
                attempts=result.calls,
                http_status=result.http_status,
                request=body,
            )
            return
        status = OutcomeStatus.REJECTED if result.status == "rejected" else OutcomeStatus.FAILED
        reason = "api_rejected" if status is OutcomeStatus.REJECTED else "retries_exhausted"
        if result.maybe_applied:  # a consumer reading the reason alone must not take it as "not changed"
            reason += "_maybe_applied"
        detail = result.error_msg or result.detail
        log.warning(
            "event_not_applied",
            status=status.value,
            attempts=result.calls,
            http_status=result.http_status,
            error_code=result.error_code,
            detail=redact_cut(detail, _RECORD_DETAIL_CHARS) if detail else None,
        )
        # Remembered with its message before anything is published, as an applied event is: a
        # redelivery (a crash, a lost partition, whenever) repeats this outcome and its dead letter
        # and never calls the API again, while another message with this event_id (a fixed ticket,
        # a DLQ replay) may try again.
        kept = await self._remember(
            event.event_id, job, status, result, reason, detail=detail, target=target, token=token
        )
        if kept is not None and kept.state == "applied":
            # Applied meanwhile by another worker, which took the event over while this one's
            # claim had run out (a pause longer than the lease): that is the event's outcome.
            # (Another worker's live claim kept instead: this job ends with its own outcome, as it
            # did before it could tell, and the other's claim stands: ``_remember``.)
            log.warning("event_applied_elsewhere", status=status.value, applied_by=kept.owner)
            await self._finish_known(job, event, target, body, kept)
            return
        # By position too: another message of this event_id (a dead letter replayed, a producer's
        # retry) replaces the record above once it finishes, and this message, read again after
        # that (a crash before its offset was committed), took the other's record for its own:
        # a `duplicate` of it, or a second send. It repeats this outcome instead.
        await self._remember(
            job.position_key,
            job,
            status,
            result,
            reason,
            detail=detail,
            target=_fingerprint(job),
            token=position_token,
        )
        await self._emit(
            job,
            status,
            reason=reason,
            attempts=result.calls,
            http_status=result.http_status,
            error_code=result.error_code,
            error_msg=detail,
            request=body,
        )

    async def _remember(
        self,
        key: str,
        job: Job,
        status: OutcomeStatus,
        result: ApplyResult | None = None,
        reason: str | None = None,
        *,
        detail: str | None = None,
        target: str = "",
        token: str = "",
    ) -> DedupRecord | None:
        """The done-record of an event not applied, written before its outcome is published, over
        our claim ``token`` ("": none, a record kept by position); the record the store kept
        instead (``DedupStore.mark_done``): an applied one, if another worker applied the event
        meanwhile, or the live claim of a worker that took the event (or the message's position)
        over while ours had run out (a pause longer than the lease). That one is left as it is,
        not an error: the job ends with its outcome, published as before; the other worker goes
        on with the event and publishes its own (a stale owner's record erased that claim, and
        the event's next message was claimed as new while the other may have been sending)."""
        done = self._record("done", job, status, result, reason, detail, target=target)
        kept = await self._dedup(
            lambda: self._store.mark_done(
                key, done, self._settings.dedup_ttl_s, owner=self._claimant, token=token
            )
        )
        if kept is not None and kept.state == "claimed":
            log.warning("dedup_record_left_to_claim", key=key, holder=kept.owner, status=status.value)
        return kept

    def _record(
        self,
        state: str,
        job: Job,
        status: OutcomeStatus,
        result: ApplyResult | None,
        reason: str | None,
        detail: str | None = None,
        *,
        target: str = "",
    ) -> DedupRecord:
        """What the store keeps of an outcome, so that a redelivery can repeat it (and its dead
        letter: the detail is kept redacted and short)."""
        return DedupRecord(
            state,
            self._owner,
            job.source,
            status.value,
            result.calls if result else 0,
            result.http_status if result else None,
            reason=reason or "",
            error_code=result.error_code if result else None,
            detail=redact_cut(detail, _RECORD_DETAIL_CHARS) if detail else "",
            target=target,
        )

    async def _finish_known(
        self,
        job: Job,
        event: AnyChangeEvent,
        target: str,
        body: dict[str, Any],
        record: DedupRecord | None,
    ) -> None:
        """The store already knows this event: a redelivery of the same message, a duplicate, or
        its event_id reused for another change (records written before the target was kept
        cannot tell: a duplicate, as before)."""
        if record is not None and record.source == job.source:
            await self._repeat_outcome(job, record, body)
            return
        if record is not None and record.of_another_change(target):
            # Not a copy of the first: "duplicate" would report a change never sent as done (a
            # CI matrix whose regions share one id, one id for a change's start and end).
            await self._finish_invalid(
                job,
                InvalidEvent(
                    "event_id_reused",
                    f"event_id {event.event_id} was used for {record.target} (message "
                    f"{record.source}); this message is {target}: each change event needs an "
                    "event_id of its own",
                ),
            )
            return
        detail = f"event_id already applied from {record.source}" if record else None
        if await self._finish_at_position(job, OutcomeStatus.DUPLICATE, "duplicate_event_id", detail, body):
            self._metrics.dedup_hits.labels(kind="duplicate").inc()
            log.info("event_duplicate", first_source=record.source if record else None)

    async def _repeat_outcome(self, job: Job, record: DedupRecord, body: dict[str, Any] | None) -> None:
        """Same message again (a crash or a lost partition before the commit): repeat its outcome,
        marked ``redelivered``, without calling the API. The record was written before the first
        outcome was published, so that one and its dead letter may be missing: the dead letter is
        written again too (at least once; ``coc-dlq-redelivered`` marks the repeat)."""
        self._metrics.dedup_hits.labels(kind="redelivered").inc()
        log.info("event_redelivered", state=record.state, status=record.status)
        await self._emit(
            job,
            OutcomeStatus(record.status or "applied"),
            reason=record.reason or None,
            attempts=record.attempts,
            http_status=record.http_status,
            error_code=record.error_code,
            error_msg=record.detail or None,
            request=body if record.status in _WITH_REQUEST else None,
            redelivered=True,
        )

    # --- outcome ------------------------------------------------------------------------------------
    async def _emit(
        self,
        job: Job,
        status: OutcomeStatus,
        *,
        reason: str | None = None,
        attempts: int = 0,
        http_status: int | None = None,
        error_code: str | None = None,
        error_msg: str | None = None,
        request: dict[str, Any] | None = None,
        redelivered: bool = False,
    ) -> None:
        m = job.message
        identity = (
            {
                "event_id": job.event.event_id,
                "ticket_id": job.event.ticket_id,
                "sub_ticket_id": getattr(job.event, "sub_ticket_id", None),
                "type": job.event.type.value,
            }
            if job.event is not None
            else job.salvaged
        )
        assert identity is not None  # every invalid job carries it (Worker._dispatch)
        error_msg = redact_text(error_msg) if error_msg else None
        # The API's own text; it passed a format check only, and a secret may match that format.
        error_code = redact_text(error_code) if error_code else None
        # Every field of OutcomeEvent, in its order: these values are ours and already valid, and
        # building the model per message only to dump it is measurable on the hot path.
        outcome: dict[str, Any] = {
            "schema_version": OUTCOME_SCHEMA_VERSION,
            **identity,
            "status": status.value,
            "reason": reason,
            "attempts": attempts,
            "http_status": http_status,
            "error_code": error_code,
            "error_msg": error_msg,
            "request": request,
            "source": {"topic": m.topic, "partition": m.partition, "offset": m.offset},
            "received_at": job.received_at,
            "finished_at": datetime.now(UTC),
            "duration_ms": round((time.monotonic() - job.received_mono) * 1000, 3),
            "worker": self._owner,
            "redelivered": redelivered,
            "trace_id": job.trace.trace_id,
        }
        letter = None
        if status in DEAD_LETTER_STATUSES:
            letter = DeadLetter(
                key=m.key,
                value=m.value,
                headers=m.headers,
                status=status.value,
                reason=reason or status.value,
                detail=error_msg or "",
                topic=m.topic,
                partition=m.partition,
                offset=m.offset,
                event_id=identity["event_id"],
                redelivered=redelivered,
                http_status=http_status,
                error_code=error_code,
            )
        traceparent = job.trace.child_traceparent()
        payload: bytes | None = _dump(outcome)
        ticket_id = outcome["ticket_id"]  # as written: scrubbed if it was a secret
        key = ticket_id.encode() if ticket_id else None
        owed = letter
        while True:
            await self._gate.wait_open()
            try:
                await self._publisher.publish(key, payload, status.value, owed, traceparent)
                break
            except DeadLetterUnwritable as exc:
                # The outcome is in: only the dead letter is owed, and the pause lasts until its
                # topic answers (a missing topic is not an outage the results topic would show).
                # A timed-out write may have been stored: the next is marked as a possible repeat.
                if payload is not None:  # counted as written: a stop during the outage ends the job
                    self._outcome_written(job, status)
                payload = None
                owed = _as_repeat(owed)
                self._gate.trip(exc, self._publisher.ping_dead_letters)
            except BrokerUnavailable as exc:
                # The broker may have stored the first copy and lost only its answer: whatever is
                # sent again is marked as a possible repeat (an outcome confirmed before is not).
                if payload is not None:
                    outcome["redelivered"] = True
                    payload = _dump(outcome)
                owed = None if exc.dead_letter_confirmed else _as_repeat(owed)
                self._gate.trip(exc, self._publisher.ping)
        if payload is not None:
            self._outcome_written(job, status)
        if letter is not None:
            self._metrics.dead_letters.inc()

    # --- helpers ------------------------------------------------------------------------------------
    def _outcome_written(self, job: Job, status: OutcomeStatus) -> None:
        job.outcome_written = True
        self._metrics.count_outcome(status)

    @property
    def _lease_s(self) -> float:
        return self._settings.dedup_lease_s

    async def _dedup(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a dedup-store call; while the store is away, pause the worker and wait."""
        while True:
            await self._gate.wait_open()
            try:
                return await op()
            except DedupUnavailable as exc:
                self._gate.trip(exc, self._store.ping)
