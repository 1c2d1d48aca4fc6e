"""``coc-worker send``: produce one change event, keyed by ticket, and optionally wait for its outcome.

With ``--wait-outcome`` the results topic is read from its end *as it was before the event was
produced*, so the outcome cannot be missed; it is recognised by its ``source`` (the exact topic,
partition and offset the broker acknowledged), not by ``event_id``, because a duplicate of the
same event id has an outcome of its own. The exit code then says what happened to the ticket, so
a deploy step fails when the ticket update failed.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from schemas.events import AnyChangeEvent
from schemas.outcomes import OutcomeEvent, OutcomeStatus
from worker.logs import get_logger
from worker.settings import WorkerSettings
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


@dataclass(frozen=True, slots=True)
class SendResult:
    event_id: str
    delivered: Delivered
    trace_id: str
    outcome: OutcomeEvent | None = None
    timed_out: bool = False

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return EXIT_NOT_APPLIED
        if self.outcome is None:
            return EXIT_OK
        return EXIT_OK if self.outcome.status in _SUCCESS else EXIT_NOT_APPLIED


def record_for(event: AnyChangeEvent, obj: dict[str, Any], trace: TraceContext) -> OutRecord:
    return OutRecord(
        key=event.ticket_id.encode(), value=encode(obj), headers=[(TRACEPARENT, trace.traceparent.encode())]
    )


async def send_event(
    settings: WorkerSettings,
    event: AnyChangeEvent,
    obj: dict[str, Any],
    *,
    trace: TraceContext | None = None,
    wait_outcome_s: float | None = None,
) -> SendResult:
    """Produce ``obj`` (already validated as ``event``) and, if asked, wait for its outcome."""
    trace = trace or new_trace()
    record = record_for(event, obj, trace)
    if wait_outcome_s is None:
        async with EventProducer(settings) as producer:
            delivered = await producer.send(settings.input_topic, record)
        log.info(
            "event_sent", event_id=event.event_id, partition=delivered.partition, offset=delivered.offset
        )
        return SendResult(event.event_id, delivered, trace.trace_id)
    async with TopicReader(settings, settings.results_topic) as results:
        start = await results.end_offsets()  # before producing: the outcome comes after this
        async with EventProducer(settings) as producer:
            delivered = await producer.send(settings.input_topic, record)
        log.info(
            "event_sent", event_id=event.event_id, partition=delivered.partition, offset=delivered.offset
        )
        try:
            async with asyncio.timeout(wait_outcome_s):
                outcome = await _outcome_of(results, start, delivered)
        except TimeoutError:
            return SendResult(event.event_id, delivered, trace.trace_id, timed_out=True)
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
