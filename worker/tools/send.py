"""``coc-worker send``: produce one change event, keyed by ticket, and optionally wait for its outcome.

With ``--wait-outcome`` the results topic is read from its end *as it was before the event was
produced*, so the outcome cannot be missed; it is recognised by its ``source`` (the exact topic,
partition and offset the broker acknowledged), not by ``event_id``, because a duplicate of the
same event id has an outcome of its own. The exit code then says what happened to the ticket, so
a deploy step fails when the ticket update failed. Its time limit bounds the whole send: connecting,
the broker's acknowledgement and the wait for the outcome.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from schemas.events import AnyChangeEvent
from schemas.outcomes import OutcomeEvent, OutcomeStatus
from worker.logs import get_logger
from worker.settings import WorkerSettings, env_var
from worker.tools.events import encode
from worker.tools.kafka_io import Delivered, EventProducer, OutRecord, TopicReader
from worker.tracing import HEADER as TRACEPARENT
from worker.tracing import TraceContext, new_trace

log = get_logger(__name__)

#: Exit codes of ``send``: the ticket was updated (or already was), or it was not.
EXIT_OK = 0
EXIT_NOT_APPLIED = 1
EXIT_BAD_INPUT = 2
_SUCCESS = frozenset({OutcomeStatus.APPLIED, OutcomeStatus.DUPLICATE})


#: What a send that waits was doing when its time ran out: connecting (nothing was sent), waiting
#: for the broker's acknowledgement (the event may be written), waiting for the outcome (written).
Stage = Literal["connect", "produce", "outcome"]
#: aiokafka's own request timeouts (the consumer's 40 s, the producer's 30 s) are no longer than
#: what is left of the send's time: closing a client after the time ran out waits for none longer.
_READER_REQUEST_TIMEOUT_S = 40.0
_PRODUCER_REQUEST_TIMEOUT_S = 30.0
#: How long closing the results reader may take after the outcome came (or the time ran out).
_CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class SendResult:
    event_id: str
    #: Where the broker stored the event; None when it did not acknowledge it in time.
    delivered: Delivered | None
    trace_id: str
    outcome: OutcomeEvent | None = None
    timed_out: bool = False
    #: With ``timed_out``: what the time ran out on.
    stage: Stage = "outcome"

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return EXIT_NOT_APPLIED
        if self.outcome is None:
            return EXIT_OK
        return EXIT_OK if self.outcome.status in _SUCCESS else EXIT_NOT_APPLIED


def timeout_detail(result: SendResult, timeout_s: float, settings: WorkerSettings) -> str:
    """Why a send that waited ended without an outcome, and whether the event was written."""
    event_id = result.event_id
    if result.stage == "connect":
        servers = f"{env_var('kafka_bootstrap_servers')}={settings.kafka_bootstrap_servers}"
        return f"the broker did not answer within {timeout_s:g}s ({servers}); {event_id} was not sent"
    if result.stage == "produce":
        return (
            f"the broker did not acknowledge {event_id} within {timeout_s:g}s: it may or may not be"
            f" written; sending it again with --event-id {event_id} is safe (a copy is a duplicate)"
        )
    return (
        f"no outcome for {event_id} within {timeout_s:g}s "
        f"(is a worker running on {settings.input_topic}, and not paused? its /readyz says)"
    )


def result_json(result: SendResult, timeout_s: float, settings: WorkerSettings) -> str:
    """``send --json``'s one document: the outcome (which carries the ``event_id``) or, when
    none came in time, the ``event_id`` with ``"status": "timeout"``, the stage the time ran
    out on, where the event was written (``source``, null if not acknowledged) and why."""
    if result.outcome is not None:
        outcome = result.outcome
        if outcome.event_id is None:  # the worker could not read it; the caller still needs the id
            outcome = outcome.model_copy(update={"event_id": result.event_id})
        return outcome.model_dump_json()
    delivered = result.delivered
    document: dict[str, Any] = {
        "event_id": result.event_id,
        "status": "timeout",
        "stage": result.stage,
        "timeout_s": timeout_s,
        "source": None
        if delivered is None
        else {"topic": delivered.topic, "partition": delivered.partition, "offset": delivered.offset},
        "detail": timeout_detail(result, timeout_s, settings),
    }
    return json.dumps(document)


def record_for(event: AnyChangeEvent, obj: dict[str, Any], trace: TraceContext) -> OutRecord:
    """The record to produce: keyed by ticket, with the ``traceparent`` of a span of its own in
    ``trace`` (a caller's ``--traceparent`` is the parent span, as the ingress makes it)."""
    return OutRecord(
        key=event.ticket_id.encode(),
        value=encode(obj),
        headers=[(TRACEPARENT, trace.child_traceparent().encode())],
    )


async def send_event(
    settings: WorkerSettings,
    event: AnyChangeEvent,
    obj: dict[str, Any],
    *,
    trace: TraceContext | None = None,
    wait_outcome_s: float | None = None,
) -> SendResult:
    """Produce ``obj`` (already validated as ``event``) and, if asked, wait for its outcome:
    ``wait_outcome_s`` then bounds the whole send (connecting, producing, waiting)."""
    trace = trace or new_trace()
    record = record_for(event, obj, trace)
    if wait_outcome_s is None:
        async with EventProducer(settings) as producer:
            delivered = await producer.send(settings.input_topic, record)
        log.info(
            "event_sent", event_id=event.event_id, partition=delivered.partition, offset=delivered.offset
        )
        return SendResult(event.event_id, delivered, trace.trace_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_outcome_s
    stage: Stage = "connect"
    found: Delivered | None = None
    budget = asyncio.timeout_at(deadline)
    results = TopicReader(
        settings,
        settings.results_topic,
        request_timeout_s=min(wait_outcome_s, _READER_REQUEST_TIMEOUT_S),
    )
    try:
        try:
            async with budget:
                await results.start()
                start = await results.end_offsets()  # before producing: the outcome comes after this
                left_s = max(deadline - loop.time(), 0.001)
                producing = EventProducer(
                    settings, request_timeout_s=min(left_s, _PRODUCER_REQUEST_TIMEOUT_S)
                )
                async with producing as producer:
                    stage = "produce"
                    found = delivered = await producer.send(settings.input_topic, record)
                    stage = "outcome"
                log.info(
                    "event_sent",
                    event_id=event.event_id,
                    partition=delivered.partition,
                    offset=delivered.offset,
                )
                outcome = await _outcome_of(results, start, delivered)
        finally:
            # Outside the budget: the deadline passing while the reader closed reported an outcome
            # received as "no outcome within", and left the reader's connections open.
            await results.stop_within(_CLOSE_TIMEOUT_S)
    except TimeoutError:
        if not budget.expired():  # not the send's time: another's, raised through
            raise
        return SendResult(event.event_id, found, trace.trace_id, timed_out=True, stage=stage)
    return SendResult(event.event_id, delivered, trace.trace_id, outcome)


async def _outcome_of(results: TopicReader, start: dict[int, int], delivered: Delivered) -> OutcomeEvent:
    wanted = (delivered.topic, delivered.partition, delivered.offset)
    messages = results.follow(start)
    async with aclosing(messages):
        async for message in messages:
            try:
                outcome = OutcomeEvent.model_validate_json(message.value or b"")
            except ValidationError:
                continue  # not an outcome event: nothing of ours
            if (outcome.source.topic, outcome.source.partition, outcome.source.offset) == wanted:
                return outcome
    raise AssertionError("unreachable: follow() ends only when its caller stops")


def describe_outcome(outcome: OutcomeEvent) -> str:
    """One line a person reads in a CI log."""
    parts = [outcome.status.value]
    details = [
        f"reason {outcome.reason}" if outcome.reason else "",
        f"HTTP {outcome.http_status}" if outcome.http_status is not None else "",
        outcome.error_code or "",
        f"after {outcome.attempts} attempt{'s' if outcome.attempts != 1 else ''}" if outcome.attempts else "",
    ]
    shown = ", ".join(d for d in details if d)
    if shown:
        parts.append(f"({shown})")
    if outcome.error_msg and outcome.status not in _SUCCESS:
        parts.append(f"- {' '.join(outcome.error_msg.split())[:300]}")
    return " ".join(parts)
