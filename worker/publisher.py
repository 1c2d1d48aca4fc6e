"""Publish outcome events and dead-letter records, and confirm both before a message counts as done.

Writes use ``acks=all``; ``publish`` returns only after the broker acknowledged every record it
sent. A dead-letter record is the input message as it was (key, value bytes, headers) plus
``coc-dlq-*`` headers saying why, where from and when. Broker failures surface as
``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from schemas.outcomes import OutcomeEvent
from worker.errors import BrokerUnavailable
from worker.kafka_config import connection_kwargs
from worker.logs import redact_text
from worker.settings import WorkerSettings
from worker.tracing import HEADER as TRACEPARENT

Headers = list[tuple[str, bytes]]

DLQ_HEADER_PREFIX = "coc-dlq-"
_DETAIL_LIMIT = 1000
#: Extra room above the event size limit for the DLQ record's headers.
_HEADROOM_BYTES = 64 * 1024
#: Below Kafka's default message.max.bytes (1 MB) with room for headers.
_SAFE_DLQ_VALUE_BYTES = 900 * 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The input message to copy to the dead-letter topic, and why."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    status: str
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    event_id: str | None


def dead_letter_headers(letter: DeadLetter, worker_id: str, traceparent: str, now: datetime) -> Headers:
    """Original headers (minus a stale traceparent), then the ``coc-dlq-*`` explanation."""
    kept = [
        (k, v) for k, v in letter.headers if k.lower() != TRACEPARENT and not k.startswith(DLQ_HEADER_PREFIX)
    ]
    ours = {
        "status": letter.status,
        "reason": letter.reason,
        "error": redact_text(letter.detail)[:_DETAIL_LIMIT],
        "source-topic": letter.topic,
        "source-partition": str(letter.partition),
        "source-offset": str(letter.offset),
        "at": now.isoformat(),
        "worker": worker_id,
    }
    if letter.event_id:
        ours["event-id"] = letter.event_id
    return [
        *kept,
        *((DLQ_HEADER_PREFIX + k, v.encode()) for k, v in ours.items()),
        (TRACEPARENT, traceparent.encode()),
    ]


class Publisher:
    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(
            **connection_kwargs(settings),
            acks="all",
            linger_ms=2,
            enable_idempotence=settings.kafka_enable_idempotence,
            max_request_size=max(settings.max_event_bytes + _HEADROOM_BYTES, 1_048_576),
            compression_type=None,
        )

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            raise BrokerUnavailable(f"producer cannot connect: {type(exc).__name__}") from exc

    async def stop(self) -> None:
        await self._producer.stop()

    async def ping(self) -> None:
        """Fetch metadata of the results topic: proves the broker answers."""
        try:
            await asyncio.wait_for(self._producer.partitions_for(self._settings.results_topic), 10)
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc

    async def publish(
        self,
        outcome: OutcomeEvent,
        letter: DeadLetter | None,
        traceparent: str,
    ) -> None:
        """Send the outcome (and the dead-letter record) and wait until the broker has both."""
        headers: Headers = [
            (TRACEPARENT, traceparent.encode()),
            ("coc-status", outcome.status.value.encode()),
        ]
        key = outcome.ticket_id.encode() if outcome.ticket_id else None
        try:
            delivered = await self._producer.send(
                self._settings.results_topic,
                value=outcome.model_dump_json().encode(),
                key=key,
                headers=headers,
            )
            if letter is None:
                await delivered
            else:
                await asyncio.gather(delivered, self._deliver_dead_letter(letter, traceparent))
        except KafkaError as exc:
            raise BrokerUnavailable(f"outcome not confirmed by the broker: {type(exc).__name__}") from exc

    async def _deliver_dead_letter(self, letter: DeadLetter, traceparent: str) -> None:
        headers = dead_letter_headers(letter, self._settings.worker_id, traceparent, datetime.now(UTC))
        topic = self._settings.dlq_topic
        try:
            await (await self._producer.send(topic, value=letter.value, key=letter.key, headers=headers))
        except MessageSizeTooLargeError:
            # Too big for our request limit or the broker's: keep the record, cut the value. The
            # headers say where the whole message still is (source topic, partition, offset).
            value = letter.value or b""
            headers.append((DLQ_HEADER_PREFIX + "value-truncated-from", str(len(value)).encode()))
            cut = value[: min(self._settings.max_event_bytes, _SAFE_DLQ_VALUE_BYTES)]
            await (await self._producer.send(topic, value=cut, key=letter.key, headers=headers))
