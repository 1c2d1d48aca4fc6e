"""``coc-worker outcomes tail``: follow the results topic as a live table, or as JSON lines.

For downstream teams and operators: what happened to which ticket, as it happens. Filters keep
only some tickets or statuses. Reading is outside any consumer group (nothing is committed), from
the topic's end by default or from its beginning, until interrupted, until ``--max-count`` rows,
or, with ``--no-follow``, until the end the topic had when the command started.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TextIO

from pydantic import ValidationError

from schemas.outcomes import OutcomeEvent, OutcomeStatus
from worker.consumer import Message
from worker.settings import WorkerSettings
from worker.tools.kafka_io import TopicReader
from worker.tools.progress import Progress
from worker.tools.table import api_answer, cell

_COLUMNS: tuple[tuple[str, int], ...] = (
    ("FINISHED", 12),
    ("STATUS", 9),
    ("TICKET", 26),  # a COC ticket id: CM and 24 digits
    ("SUB-TICKET", 36),  # a COC sub-ticket id: a UUID
    ("TYPE", 16),
    ("EVENT", 24),
    ("TRIES", 5),
    ("DETAIL", 0),  # 0: the rest of the line
)


@dataclass(frozen=True, slots=True)
class OutcomeFilter:
    tickets: frozenset[str] = frozenset()
    statuses: frozenset[OutcomeStatus] = frozenset()

    def matches(self, outcome: OutcomeEvent) -> bool:
        if self.tickets and outcome.ticket_id not in self.tickets:
            return False
        return not self.statuses or outcome.status in self.statuses


def header() -> str:
    return " ".join(cell(name, width) for name, width in _COLUMNS).rstrip()


def row(outcome: OutcomeEvent) -> str:
    detail = " ".join(
        part
        for part in (
            outcome.reason or "",
            api_answer(outcome.http_status, outcome.error_code),
            outcome.error_msg or "" if outcome.status is not OutcomeStatus.APPLIED else "",
            "(redelivered)" if outcome.redelivered else "",
        )
        if part
    )
    values = (
        outcome.finished_at.strftime("%H:%M:%S.%f")[:12],
        outcome.status.value,
        outcome.ticket_id or "-",
        outcome.sub_ticket_id or "-",
        outcome.type or "-",
        outcome.event_id or "-",
        str(outcome.attempts),
        detail,
    )
    # Identifiers whole (a longer one pushes the rest of its row): ids that differ only at the
    # end (``run-eu-west-1-start``, ``run-eu-west-1-succeeded``) must not look the same, and an
    # operator copies them into ``dlq replay --ticket``. Only the detail is cut.
    return " ".join(
        cell(v, w, cut=name == "DETAIL") for v, (name, w) in zip(values, _COLUMNS, strict=True)
    ).rstrip()


async def _messages(
    reader: TopicReader, *, from_beginning: bool, follow: bool, progress: Progress
) -> AsyncGenerator[Message, None]:
    end = await reader.end_offsets()
    start = await reader.beginning_offsets() if from_beginning else end
    if follow:
        async for message in reader.follow(start):
            yield message
        return
    progress.set_total("read", sum(end[p] - start[p] for p in start))
    async for message in reader.read_range(start, end):
        progress.add("read")
        yield message


async def tail(
    settings: WorkerSettings,
    selection: OutcomeFilter,
    out: TextIO,
    err: TextIO,
    *,
    json_lines: bool = False,
    from_beginning: bool = False,
    follow: bool = True,
    max_count: int | None = None,
) -> int:
    """Print matching outcomes; returns how many were printed."""
    shown = 0
    progress = Progress("outcomes tail", stream=err)
    async with TopicReader(settings, settings.results_topic) as reader:
        if not json_lines:  # once the broker answered: a pipeline gets no header line on a failure
            print(header(), file=out, flush=True)
        messages = _messages(reader, from_beginning=from_beginning, follow=follow, progress=progress)
        async with aclosing(messages):
            async for message in messages:
                outcome = _outcome(message, err)
                if outcome is None or not selection.matches(outcome):
                    continue
                print(outcome.model_dump_json() if json_lines else row(outcome), file=out, flush=True)
                shown += 1
                if max_count is not None and shown >= max_count:
                    break
    return shown


def _outcome(message: Message, err: TextIO) -> OutcomeEvent | None:
    try:
        return OutcomeEvent.model_validate_json(message.value or b"")
    except ValidationError:
        where = f"{message.topic}/{message.partition}/{message.offset}"
        print(f"skipped {where}: not an outcome event", file=err)
        return None
