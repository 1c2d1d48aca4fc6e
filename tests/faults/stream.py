"""A known input stream: many tickets, several ordered events each, keyed by ticket.

Each ticket walks its sub-tickets through the simulator's state machine (``started`` ->
``ended`` -> ``succeeded`` | ``failed``, sometimes ``cancelled`` instead) with ``ticket.update``
events (a new ``work_flow_status`` each time) in between. Any event applied out of order is
refused by the simulator (but for a ``change.failed`` overtaking its ``change.ended``: the failure,
taken during the change, is applied, and the end it overtook refused), and a ``ticket.update``
applied twice shows up twice in its applied log, so the stream itself exposes reordering and
double application. Tickets are interleaved at random, with each ticket's events kept in order; a
seeded ``random.Random`` makes it repeatable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One input message: ``index`` is its position in the whole stream."""

    index: int
    event_id: str
    ticket_id: str
    body: dict[str, Any] | None
    #: Raw bytes of a deliberately invalid message (``body`` is then None).
    raw: bytes | None = None

    @property
    def valid(self) -> bool:
        return self.body is not None

    @property
    def key(self) -> bytes:
        return self.ticket_id.encode()

    @property
    def value(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body, separators=(",", ":")).encode()


def _ticket_events(rng: random.Random, run: str, ticket: str, subs: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for s in range(1, subs + 1):
        sub = f"s{s}"
        if rng.random() < 0.1:
            steps = [("change.started", {}), ("change.cancelled", {"result": {"comment": "rolled back"}})]
        else:
            end = (
                ("change.succeeded", {"result": {"comment": "ok", "is_verified_in_change_time": True}})
                if rng.random() < 0.8
                else (
                    "change.failed",
                    {
                        "result": {
                            "comment": "alert fired",
                            "change_fail_type": "fr_bug",
                            "is_monitor_found": True,
                        }
                    },
                )
            )
            steps = [("change.started", {}), ("change.ended", {}), end]
        events.extend(
            {"type": kind, "ticket_id": ticket, "sub_ticket_id": sub, **extra} for kind, extra in steps
        )
    # ticket.update events at random places (after the first), each with a new work_flow_status
    updates = rng.randint(1, 2)
    for u in range(1, updates + 1):
        at = rng.randint(1, len(events))
        events.insert(
            at, {"type": "ticket.update", "ticket_id": ticket, "ticket_info": {"work_flow_status": f"wf-{u}"}}
        )
    for n, body in enumerate(events):
        body["event_id"] = f"{run}:{ticket}:{n}"
        body["source"] = "fault-harness"
    return events


def make_stream(
    tickets: int, *, run: str, seed: int = 1, subs_per_ticket: int = 1, invalid_ratio: float = 0.0
) -> list[StreamEvent]:
    """``tickets`` tickets of about ``3 * subs_per_ticket + 1.5`` events each, interleaved."""
    rng = random.Random(seed)
    queues = [
        _ticket_events(rng, run, f"T{run}-{t:06d}", rng.randint(1, subs_per_ticket)) for t in range(tickets)
    ]
    positions = [0] * len(queues)
    live = list(range(len(queues)))
    bodies: list[dict[str, Any]] = []
    while live:
        pick = rng.randrange(len(live))
        q = live[pick]
        bodies.append(queues[q][positions[q]])
        positions[q] += 1
        if positions[q] == len(queues[q]):
            live[pick] = live[-1]
            live.pop()
    stream: list[StreamEvent] = []
    for body in bodies:
        index = len(stream)
        if invalid_ratio and rng.random() < invalid_ratio:
            # Not JSON at all: must end as an ``invalid`` outcome + DLQ record, never reach the API.
            ticket = body["ticket_id"]
            stream.append(
                StreamEvent(
                    index, f"{run}:bad:{index}", ticket, None, raw=b"\xff not json " + str(index).encode()
                )
            )
            index += 1
        stream.append(StreamEvent(index, body["event_id"], body["ticket_id"], body))
    return stream


def records(
    stream: list[StreamEvent],
) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]]:
    """The stream as ``(key, value, headers)`` for ``worker.sandbox.produce``."""
    return [(e.key, e.value, None) for e in stream]
