"""``coc-worker dlq list|replay``: read dead-letter records with their reasons, and send chosen ones back.

A dead-letter record is the input message unchanged plus ``coc-dlq-*`` headers (see
``worker.publisher``). ``replay`` produces the selected records to the input topic with the same
key and the same value bytes (so the same ``event_id``: the dedup store still stops an event that
was applied meanwhile from being applied twice), without the ``coc-dlq-*`` headers, and with
``coc-replayed-from-*`` headers saying which dead-letter record it was. The typical use: an event
rejected because the ticket was not ready, replayed once the ticket is fixed, ends ``applied``.

Only records present when the command starts are read (a replay that is rejected again lands in
the DLQ again, and must not be picked up by the same run).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from schemas.events import TICKET_ID_PATTERN
from worker.consumer import Message
from worker.decode import salvage_identity
from worker.publisher import DLQ_HEADER_PREFIX
from worker.settings import WorkerSettings
from worker.tools.kafka_io import Delivered, EventProducer, OutRecord, PartialWrite, TopicReader
from worker.tools.progress import Progress

REPLAYED_FROM_PREFIX = "coc-replayed-from-"
REPLAYED_AT = "coc-replayed-at"
_TICKET = re.compile(TICKET_ID_PATTERN.replace("$", r"\Z"), re.ASCII)
_SEND_CHUNK = 500


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A DLQ record with its ``coc-dlq-*`` explanation read out."""

    message: Message
    status: str
    reason: str
    error: str
    source: str
    at: str
    event_id: str | None
    ticket_id: str | None

    @classmethod
    def from_message(cls, message: Message, max_event_bytes: int) -> DeadLetterRecord:
        dlq = {
            k[len(DLQ_HEADER_PREFIX) :]: v.decode("utf-8", "replace")
            for k, v in message.headers
            if k.startswith(DLQ_HEADER_PREFIX)
        }
        identity = salvage_identity(message.value, max_event_bytes)
        key = message.key.decode("utf-8", "replace") if message.key is not None else None
        ticket = key if key is not None and _TICKET.match(key) else identity["ticket_id"]
        source = "/".join(
            dlq.get(name, "?") for name in ("source-topic", "source-partition", "source-offset")
        )
        return cls(
            message=message,
            status=dlq.get("status", "?"),
            reason=dlq.get("reason", "?"),
            error=dlq.get("error", ""),
            source=source,
            at=dlq.get("at", ""),
            event_id=dlq.get("event-id") or identity["event_id"],
            ticket_id=ticket,
        )

    def as_json(self) -> dict[str, object]:
        m = self.message
        return {
            "dlq": {"topic": m.topic, "partition": m.partition, "offset": m.offset},
            "status": self.status,
            "reason": self.reason,
            "error": self.error,
            "source": self.source,
            "at": self.at,
            "event_id": self.event_id,
            "ticket_id": self.ticket_id,
            "value_bytes": len(m.value) if m.value is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead-letter records a command acts on; empty sets match everything."""

    reasons: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    tickets: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()
    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None  # inclusive

    @property
    def narrows(self) -> bool:
        """Whether anything was chosen at all (a replay of everything needs ``--all``)."""
        return any((self.reasons, self.statuses, self.tickets, self.event_ids)) or any(
            v is not None for v in (self.partition, self.from_offset, self.to_offset)
        )

    def matches(self, record: DeadLetterRecord) -> bool:
        return (
            (not self.reasons or record.reason in self.reasons)
            and (not self.statuses or record.status in self.statuses)
            and (not self.tickets or record.ticket_id in self.tickets)
            and (not self.event_ids or record.event_id in self.event_ids)
        )

    def bounds(self, begin: dict[int, int], end: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
        """The offset range to read per partition: the topic's, narrowed by partition and offsets."""
        parts = [p for p in begin if self.partition is None or p == self.partition]
        start = {p: max(begin[p], self.from_offset or 0) for p in parts}
        stop = {p: end[p] if self.to_offset is None else min(end[p], self.to_offset + 1) for p in parts}
        return start, stop


def replay_headers(record: DeadLetterRecord, now: datetime) -> list[tuple[str, bytes]]:
    """The input's own headers (``coc-dlq-*`` and earlier replay marks dropped), then ours."""
    m = record.message
    kept = [
        (k, v)
        for k, v in m.headers
        if not k.startswith(DLQ_HEADER_PREFIX) and not k.startswith(REPLAYED_FROM_PREFIX) and k != REPLAYED_AT
    ]
    return [
        *kept,
        (REPLAYED_FROM_PREFIX + "topic", m.topic.encode()),
        (REPLAYED_FROM_PREFIX + "partition", str(m.partition).encode()),
        (REPLAYED_FROM_PREFIX + "offset", str(m.offset).encode()),
        (REPLAYED_AT, now.isoformat().encode()),
    ]


async def _records(
    reader: TopicReader, selection: Selection, max_event_bytes: int, progress: Progress
) -> AsyncGenerator[DeadLetterRecord, None]:
    start, end = selection.bounds(await reader.beginning_offsets(), await reader.end_offsets())
    progress.set_total("read", sum(max(0, end[p] - start[p]) for p in start))
    messages = reader.read_range(start, end)
    async with aclosing(messages):
        async for message in messages:
            progress.add("read")
            record = DeadLetterRecord.from_message(message, max_event_bytes)
            if selection.matches(record):
                yield record


_LIST_COLUMNS = ("DLQ", "STATUS", "REASON", "TICKET", "EVENT", "SOURCE", "ERROR")


def list_row(record: DeadLetterRecord) -> str:
    m = record.message
    error = " ".join(record.error.split())[:160]
    cells = (
        f"{m.partition}/{m.offset}".ljust(9),
        record.status.ljust(8),
        record.reason.ljust(14),
        (record.ticket_id or "-").ljust(18),
        (record.event_id or "-").ljust(24),
        record.source.ljust(20),
        error,
    )
    return " ".join(cells).rstrip()


def list_header() -> str:
    widths = (9, 8, 14, 18, 24, 20, 0)
    return " ".join(name.ljust(w) for name, w in zip(_LIST_COLUMNS, widths, strict=True)).rstrip()


async def list_dead_letters(
    settings: WorkerSettings,
    selection: Selection,
    out: TextIO,
    err: TextIO,
    *,
    json_lines: bool = False,
    limit: int | None = None,
) -> int:
    """Print the matching records present now; returns how many."""
    shown = 0
    progress = Progress("dlq list", stream=err)
    if not json_lines:
        print(list_header(), file=out)
    async with TopicReader(settings, settings.dlq_topic) as reader:
        records = _records(reader, selection, settings.max_event_bytes, progress)
        async with aclosing(records):
            async for record in records:
                print(json.dumps(record.as_json()) if json_lines else list_row(record), file=out, flush=True)
                shown += 1
                if limit is not None and shown >= limit:
                    break
    return shown


@dataclass(frozen=True, slots=True)
class ReplayReport:
    selected: int
    sent: int
    target: str
    dry_run: bool


async def replay(
    settings: WorkerSettings,
    selection: Selection,
    out: TextIO,
    err: TextIO,
    *,
    to_topic: str | None = None,
    dry_run: bool = False,
    limit: int | None = None,
) -> ReplayReport:
    """Send the matching records back to the input topic (or only list them with ``dry_run``)."""
    target = to_topic or settings.input_topic
    progress = Progress(f"dlq replay -> {target}", stream=err)
    selected, sent = 0, 0
    chunk: list[DeadLetterRecord] = []

    def line(verb: str, record: DeadLetterRecord) -> str:
        m = record.message
        return (
            f"{verb} {m.partition}/{m.offset} {record.status} {record.reason} "
            f"ticket={record.ticket_id or '-'} event={record.event_id or '-'}"
        )

    async def flush(producer: EventProducer) -> None:
        """Send the chunk; a record is reported replayed once the broker has acknowledged it."""
        nonlocal sent, chunk
        now = datetime.now(UTC)
        out_records = [OutRecord(r.message.key, r.message.value, replay_headers(r, now)) for r in chunk]
        try:
            acked: list[Delivered | None] = list(await producer.send_many(target, out_records))
            failure: PartialWrite | None = None
        except PartialWrite as exc:
            acked, failure = exc.acked, exc
        for record, where in zip(chunk, acked, strict=True):
            print(line("replay" if where is not None else "NOT replayed", record), file=out, flush=True)
        done = sum(where is not None for where in acked)
        sent += done
        progress.add("sent", done)
        chunk = []
        if failure is not None:
            print(
                f"dlq replay: {sent} record(s) replayed before the failure; those marked NOT replayed"
                " were not written",
                file=err,
            )
            raise failure

    async with AsyncExitStack() as stack:
        reader = await stack.enter_async_context(TopicReader(settings, settings.dlq_topic))
        producer = None if dry_run else await stack.enter_async_context(EventProducer(settings))
        records = _records(reader, selection, settings.max_event_bytes, progress)
        async with aclosing(records):
            async for record in records:
                selected += 1
                if producer is None:
                    print(line("would replay", record), file=out, flush=True)
                else:
                    chunk.append(record)
                    if len(chunk) >= _SEND_CHUNK:
                        await flush(producer)
                if limit is not None and selected >= limit:
                    break
        if producer is not None and chunk:
            await flush(producer)
    return ReplayReport(selected, sent, target, dry_run)
