"""``coc-worker dlq list|replay``: read dead-letter records with their reasons, and send chosen ones back.

A dead-letter record is the input message unchanged plus ``coc-dlq-*`` headers (see
``worker.publisher``). ``replay`` produces the selected records to the input topic with the same
key and the same value bytes (so the same ``event_id``: the dedup store still stops an event that
was applied meanwhile from being applied twice), without the ``coc-dlq-*`` headers, and with
``coc-replayed-from-*`` headers saying which dead-letter record it was. The typical use: an event
rejected because the ticket was not ready, replayed once the ticket is fixed, ends ``applied``.

Only records present when the command starts are read (a replay that is rejected again lands in
the DLQ again, and must not be picked up by the same run). For the same reason one run sends one
copy of a message (its key and value bytes): an event replayed and rejected again has two records
in the DLQ, and sending both on the next run would double them on every run. A record the
dead-letter writer had to cut (too large for the DLQ: its value cut, its producer's headers left
out, or its key and value dropped) is never sent: it is no longer the event; the headers say where
the whole message still is. A record that came from another topic than the target is not sent
either (``--to-topic`` names the target; ``--from-any-topic`` sends such records all the same, for a
renamed input topic), nor one the worker did not write (no ``coc-dlq-*`` headers) or one without a
value. The replay goes on when its output's reader goes away (``| head``): stopped there, it left
the rest unsent with the user none the wiser.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from schemas.outcomes import utc_text
from worker.consumer import Message
from worker.decode import salvage_identity, ticket_of
from worker.errors import BrokerUnavailable, ConfigError
from worker.publisher import DLQ_HEADER_PREFIX
from worker.settings import WorkerSettings
from worker.tools.kafka_io import Delivered, EventProducer, OutRecord, PartialWrite, TopicReader
from worker.tools.progress import Progress
from worker.tools.table import api_answer, cell

REPLAYED_FROM_PREFIX = "coc-replayed-from-"
REPLAYED_AT = "coc-replayed-at"
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
    source_topic: str | None
    #: The API's answer, when the worker got one (``coc-dlq-http-status``, ``coc-dlq-error-code``)
    http_status: int | None
    error_code: str | None
    #: Why the dead-letter writer's record is not the whole message any more (None: it is).
    cut: str | None

    @classmethod
    def from_message(cls, message: Message, max_event_bytes: int) -> DeadLetterRecord:
        dlq = {
            k[len(DLQ_HEADER_PREFIX) :]: v.decode("utf-8", "replace")
            for k, v in message.headers
            if k.startswith(DLQ_HEADER_PREFIX)
        }
        identity = salvage_identity(message.value, max_event_bytes)
        # As the worker reads it: the key first listed and selected a record keyed
        # ``svc-payments`` under that name instead of its event's ticket.
        ticket = ticket_of(identity, message.key)
        source = "/".join(
            dlq.get(name, "?") for name in ("source-topic", "source-partition", "source-offset")
        )
        cut = None
        if not dlq:
            cut = "not a dead letter of the worker (no coc-dlq-* headers): written to the DLQ by hand?"
        elif "tombstone" in dlq or message.value is None:
            cut = "the input was a tombstone (no value): there is no event to replay"
        elif dlq.get("reason") == "unreadable":
            # Its empty key and value are not the event: sent, they would be a junk message.
            cut = "the Kafka client could not read the input record (a header key that is not UTF-8)"
        elif "key-dropped" in dlq:
            cut = "the dead-letter writer dropped its key and value (too large)"
        elif "value-truncated-from" in dlq:
            kept = len(message.value) if message.value is not None else 0
            cut = f"the dead-letter writer cut its value to {kept} of {dlq['value-truncated-from']} bytes"
        elif "headers-dropped" in dlq:
            # Sent, the event would reach the input without its producer's headers, silently.
            cut = (
                f"the dead-letter writer left out its {dlq['headers-dropped']} producer header(s) (too large)"
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
            source_topic=dlq.get("source-topic"),
            http_status=int(code)
            if (code := dlq.get("http-status", "")).isascii() and code.isdigit()
            else None,
            error_code=dlq.get("error-code") or None,
            cut=cut,
        )

    @property
    def answer(self) -> str:
        """The error, after the API's status and code when it answered (``HTTP 400 GOM.00001005:``)."""
        said = api_answer(self.http_status, self.error_code)
        return f"{said}: {self.error}" if said else self.error

    @property
    def identity(self) -> str:
        """What makes two records copies of one message: its exact bytes (a replayed message
        keeps them). Not its event_id alone: a producer may send a corrected message with the
        event_id of one that was dead-lettered, and the first record would hide it on every run."""
        m = self.message
        digest = hashlib.sha256()
        for part in (m.key or b"", m.value or b""):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return "sha256:" + digest.hexdigest()

    def as_json(self) -> dict[str, object]:
        m = self.message
        return {
            "dlq": {"topic": m.topic, "partition": m.partition, "offset": m.offset},
            "status": self.status,
            "reason": self.reason,
            "http_status": self.http_status,
            "error_code": self.error_code,
            "error": self.error,
            "source": self.source,
            "at": self.at,
            "event_id": self.event_id,
            "ticket_id": self.ticket_id,
            "value_bytes": len(m.value) if m.value is not None else None,
            "cut": self.cut,
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
        (REPLAYED_AT, utc_text(now).encode()),
    ]


async def _records(
    reader: TopicReader, selection: Selection, max_event_bytes: int, progress: Progress
) -> AsyncGenerator[DeadLetterRecord, None]:
    begin = await reader.beginning_offsets()
    if selection.partition is not None and selection.partition not in begin:
        raise ConfigError(
            f"--partition {selection.partition}: the topic {reader.topic!r} has partitions 0-{len(begin) - 1}"
        )
    start, end = selection.bounds(begin, await reader.end_offsets())
    progress.set_total("read", sum(max(0, end[p] - start[p]) for p in start))
    messages = reader.read_range(start, end)
    async with aclosing(messages):
        async for message in messages:
            progress.add("read")
            record = DeadLetterRecord.from_message(message, max_event_bytes)
            if selection.matches(record):
                yield record


#: Name and width of each column: the widest reason (retries_exhausted), a COC ticket id
#: (CM + 24 digits) and the event ids `send` makes fit; identifiers are never cut, the error is.
_LIST_COLUMNS = (
    ("DLQ", 9),
    ("STATUS", 8),
    ("REASON", 17),
    ("TICKET", 26),
    ("EVENT", 36),
    ("SOURCE", 26),
    ("ERROR", 0),
)


def list_row(record: DeadLetterRecord) -> str:
    m = record.message
    values = (
        f"{m.partition}/{m.offset}",
        record.status,
        record.reason,
        record.ticket_id or "-",
        record.event_id or "-",
        record.source,
        record.answer,
    )
    cells = [cell(v, w, cut=name == "ERROR") for v, (name, w) in zip(values, _LIST_COLUMNS, strict=True)]
    return " ".join(cells).rstrip()


def list_header() -> str:
    return " ".join(cell(name, width) for name, width in _LIST_COLUMNS).rstrip()


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
    async with TopicReader(settings, settings.dlq_topic) as reader:
        if not json_lines:  # once the broker answered: a pipeline gets no header line on a failure
            print(list_header(), file=out)
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
    #: Later copies of an event this run already sent (or, dry, would send).
    copies: int = 0
    #: Records not sent because they cannot be: cut by the dead-letter writer, or from another topic.
    refused: int = 0


def _refusal(record: DeadLetterRecord, target: str, from_any_topic: bool) -> str | None:
    """Why this record must not be sent to ``target``, if it must not. A record of another topic
    is refused whatever ``--to-topic`` says: following the hint below for one topic's records sent
    every other topic's there too."""
    if record.cut is not None:
        return f"{record.cut}; the whole message is at {record.source}"
    if not from_any_topic and record.source_topic is not None and record.source_topic != target:
        return (
            f"it came from {record.source_topic!r}, not {target!r}; replay it with "
            f"--to-topic {record.source_topic} (or pass --from-any-topic to send it to {target!r})"
        )
    return None


class _Lines:
    """The replay's report lines on ``out``, until its reader goes away (``| head``): then on
    nothing, and the replay goes on (its summary is on stderr)."""

    def __init__(self, out: TextIO) -> None:
        self._out: TextIO | None = out

    def __call__(self, text: str) -> None:
        if self._out is None:
            return
        try:
            print(text, file=self._out, flush=True)
        except BrokenPipeError:
            self._out = None


async def _reported(
    records: AsyncGenerator[DeadLetterRecord, None], err: TextIO, target: str, sent: Callable[[], int]
) -> AsyncGenerator[DeadLetterRecord, None]:
    """``records``, saying on ``err`` how far the replay got when reading the DLQ fails (the
    broker lost): its error alone left the user to count the ``replay`` lines."""
    try:
        async with aclosing(records):
            async for record in records:
                yield record
    except BrokerUnavailable:
        print(
            f"dlq replay: reading the DLQ failed; {sent()} record(s) replayed to {target!r} before"
            " (the lines above), the rest not sent",
            file=err,
        )
        raise


async def replay(
    settings: WorkerSettings,
    selection: Selection,
    out: TextIO,
    err: TextIO,
    *,
    to_topic: str | None = None,
    from_any_topic: bool = False,
    dry_run: bool = False,
    limit: int | None = None,
) -> ReplayReport:
    """Send the matching records back to the input topic (or only list them with ``dry_run``)."""
    target = to_topic or settings.input_topic
    say = _Lines(out)
    progress = Progress(f"dlq replay -> {target}", stream=err)
    selected, sent, refused = 0, 0, 0
    first_copy: dict[str, str] = {}  # identity -> the DLQ position of the record this run sends
    #: Records in DLQ order since the last send: None to send, else the line saying why not.
    chunk: list[tuple[DeadLetterRecord, str | None]] = []

    def line(verb: str, record: DeadLetterRecord, why: str = "") -> str:
        m = record.message
        return (
            f"{verb} {m.partition}/{m.offset} {record.status} {record.reason} "
            f"ticket={record.ticket_id or '-'} event={record.event_id or '-'}" + (f": {why}" if why else "")
        )

    async def flush(producer: EventProducer | None) -> None:
        """Send the chunk; a record is reported replayed once the broker has acknowledged it.
        Lines come in DLQ order, the records not sent among them."""
        nonlocal sent, chunk
        now = datetime.now(UTC)
        to_send = [r for r, note in chunk if note is None]
        out_records = [OutRecord(r.message.key, r.message.value, replay_headers(r, now)) for r in to_send]
        failure: PartialWrite | None = None
        try:
            acked: list[Delivered | None] = (
                list(await producer.send_many(target, out_records)) if producer and out_records else []
            )
            handed = len(to_send)
        except PartialWrite as exc:
            acked, failure, handed = exc.acked, exc, exc.handed
        except asyncio.CancelledError:  # Ctrl-C while the chunk was on its way
            for record in to_send:
                say(line("UNKNOWN", record, "interrupted while it was being sent"))
            print(
                f"dlq replay: interrupted; {sent} record(s) replayed before this last group of "
                f"{len(to_send)}, which may or may not have been written: check {target!r} before "
                "replaying them again",
                file=err,
            )
            raise
        unknown, i = 0, 0
        for record, note in chunk:
            if note is not None:
                say(note)
                continue
            if producer is None:
                say(line("would replay", record))
            elif acked[i] is not None:
                say(line("replay", record))
            elif i < handed:
                unknown += 1
                say(line("UNKNOWN", record, "not acknowledged, may be written"))
            else:
                say(line("NOT replayed", record))
            i += 1
        done = sum(where is not None for where in acked)
        sent += done
        progress.add("sent", done)
        chunk = []
        if failure is not None:
            print(
                f"dlq replay: {sent} record(s) replayed before the failure; {unknown} marked UNKNOWN were "
                f"sent but not acknowledged and may have been written (check {target!r} before replaying "
                "them again); those marked NOT replayed were not written",
                file=err,
            )
            raise failure

    async with AsyncExitStack() as stack:
        reader = await stack.enter_async_context(TopicReader(settings, settings.dlq_topic))
        producer = None if dry_run else await stack.enter_async_context(EventProducer(settings))
        records = _reported(
            _records(reader, selection, settings.max_event_bytes, progress), err, target, lambda: sent
        )
        async with aclosing(records):
            async for record in records:
                selected += 1
                why = _refusal(record, target, from_any_topic)
                earlier = first_copy.get(record.identity)
                if why is not None:
                    refused += 1
                    chunk.append((record, line("NOT replayable", record, why)))
                elif earlier is not None:
                    verb = "would skip" if producer is None else "skip"
                    chunk.append((record, line(verb, record, f"a copy of {earlier}, sent by this run")))
                else:
                    first_copy[record.identity] = f"{record.message.partition}/{record.message.offset}"
                    chunk.append((record, None))
                if len(chunk) >= _SEND_CHUNK or producer is None:
                    await flush(producer)
                if limit is not None and selected >= limit:
                    break
        if chunk:
            await flush(producer)
    copies = selected - refused - len(first_copy)
    return ReplayReport(selected, sent, target, dry_run, copies, refused)
