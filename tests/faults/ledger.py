"""The ledger check: what went in, what came out, what the API saw, what was committed.

Pure functions over plain data (read from the broker and the simulator by ``harness``):

(a) every input message (partition, offset) has exactly one *final* outcome: more copies are
    allowed only with ``redelivered: true`` and the same status (counted as redelivered copies),
    or byte-identical (one record written twice by a producer retry, counted as producer copies);
(b) every event applied is in the simulator's applied log at most once (``applied_twice``), and
    the log agrees with the outcomes (applied <=> ``applied``);
(c) per ticket, the applied log follows the input order;
(d) every committed position, sampled at any moment, lies over finished work only: each offset
    below it had its outcome written before the sample was taken (one violation per sample and
    partition);
(e) nothing lost: every input message has an outcome (and a DLQ record when its status needs one).

The crash-window figures: ``resent_after_apply`` counts events whose request reached the API
again after it had applied them (the simulator refuses a repeated state transition, so this is
how a double application of a ``change.*`` event shows), ``reapplied_after_outcome`` those
re-sent after their ``applied`` outcome was written (the target is 0 with a shared dedup store).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SUCCESS_CODE = "GOM.00000000"
DLQ_STATUSES = frozenset({"invalid", "rejected", "failed"})
_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class InputMessage:
    partition: int
    offset: int
    event_id: str | None
    ticket_id: str | None
    #: Position in the generated stream (the per-ticket order), -1 if unknown.
    index: int
    valid: bool


@dataclass(frozen=True, slots=True)
class CommitSnapshot:
    """The group's committed positions as read at epoch time ``at``."""

    at: float
    positions: dict[int, int]
    label: str = ""


@dataclass(slots=True)
class LedgerResult:
    scenario: str
    messages: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    outcome_records: int = 0
    redelivered_copies: int = 0
    #: Identical outcome records written twice by the producer (a retry after a lost ack).
    producer_copies: int = 0
    #: Sources with more than one outcome not marked ``redelivered`` (breaks "exactly one").
    unmarked_copies: int = 0
    #: Sources whose outcomes disagree on the status.
    conflicting: int = 0
    lost: int = 0
    applied_entries: int = 0
    applied_twice: int = 0
    applied_not_reported: int = 0
    reported_not_applied: int = 0
    resent_after_apply: int = 0
    reapplied_after_outcome: int = 0
    order_violations: int = 0
    commit_snapshots: int = 0
    commit_violations: int = 0
    uncommitted_at_end: int | None = None
    dlq_records: int = 0
    dlq_missing: int = 0
    # --- filled in by the scenario ---------------------------------------------------------------
    size: str = ""
    faults: str = ""
    peak_rss_bytes: int = 0
    recovery_s: float | None = None
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: Problem kinds the scenario expects, with why: figures it only reports (e.g. re-application
    #: inside a crash window).
    expected: dict[str, str] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: Event ids of the examples, for ``harness.timeline``.
    example_events: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def example(self, kind: str, text: str, event_id: str | None = None) -> None:
        if len(self.examples[kind]) < _EXAMPLES:
            self.examples[kind].append(text)
            if event_id:
                self.example_events[kind].append(event_id)

    def problems(self) -> list[str]:
        """Every broken promise of the ledger, with examples; empty when it holds."""
        checks = {
            "lost": self.lost,
            "unmarked_copies": self.unmarked_copies,
            "conflicting": self.conflicting,
            "applied_twice": self.applied_twice,
            "applied_not_reported": self.applied_not_reported,
            "reported_not_applied": self.reported_not_applied,
            "reapplied_after_outcome": self.reapplied_after_outcome,
            "order_violations": self.order_violations,
            "commit_violations": self.commit_violations,
            "uncommitted_at_end": self.uncommitted_at_end or 0,
            "dlq_missing": self.dlq_missing,
        }
        return [
            f"{name}={count} e.g. {self.examples.get(name, [])}" for name, count in checks.items() if count
        ]

    def summary(self) -> str:
        rss = f"{self.peak_rss_bytes / 2**20:.0f} MiB" if self.peak_rss_bytes else "-"
        recovery = f"{self.recovery_s:.1f}s" if self.recovery_s is not None else "-"
        return (
            f"{self.scenario}[{self.size}]: {self.messages} msgs, outcomes {dict(sorted(self.outcomes.items()))}, "
            f"redelivered {self.redelivered_copies}, producer copies {self.producer_copies}, lost {self.lost}, applied twice {self.applied_twice}, "
            f"re-sent after apply {self.resent_after_apply} (after applied outcome {self.reapplied_after_outcome}), "
            f"order {self.order_violations}, commits {self.commit_violations}/{self.commit_snapshots}, "
            f"peak RSS {rss}, recovery {recovery}, {self.duration_s:.0f}s; {self.faults}"
        )


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def check(
    scenario: str,
    *,
    inputs: list[InputMessage],
    outcomes: list[dict[str, Any]],
    dead_letters: list[tuple[int, int]],
    applied_log: list[dict[str, Any]],
    requests: list[dict[str, Any]],
    snapshots: list[CommitSnapshot],
    final_positions: dict[int, int] | None,
) -> LedgerResult:
    """The ledger of one run. ``dead_letters`` are the DLQ records' (source partition, offset)."""
    r = LedgerResult(scenario, messages=len(inputs), outcome_records=len(outcomes))
    r.dlq_records = len(dead_letters)
    r.commit_snapshots = len(snapshots)

    # (a) + (e): outcomes per input message
    by_source: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for o in outcomes:
        by_source[(o["source"]["partition"], o["source"]["offset"])].append(o)
    final: dict[tuple[int, int], str] = {}
    first_finished: dict[tuple[int, int], float] = {}
    first_applied: dict[tuple[int, int], float] = {}  # when an ``applied`` outcome was first written
    for msg in inputs:
        key = (msg.partition, msg.offset)
        found = by_source.get(key, [])
        if not found:
            r.lost += 1
            r.example("lost", f"{key} {msg.event_id}", msg.event_id)
            continue
        # A byte-identical copy is the same outcome written twice by a producer retry after a lost
        # acknowledgement (no idempotent producer): counted apart, it is not a second processing.
        distinct = {json.dumps(o, sort_keys=True): o for o in found}
        r.producer_copies += len(found) - len(distinct)
        if len(found) > len(distinct):
            r.example("producer_copies", f"{key} {msg.event_id} x{len(found)}", msg.event_id)
        found = list(distinct.values())
        statuses = {o["status"] for o in found}
        if len(statuses) > 1:
            r.conflicting += 1
            r.example("conflicting", f"{key} {msg.event_id} {sorted(statuses)}", msg.event_id)
        unmarked = sum(1 for o in found if not o.get("redelivered"))
        if unmarked > 1:
            r.unmarked_copies += 1
            r.example("unmarked_copies", f"{key} {msg.event_id} x{unmarked} {sorted(statuses)}", msg.event_id)
        r.redelivered_copies += len(found) - 1
        originals = [o for o in found if not o.get("redelivered")] or found
        final[key] = originals[0]["status"]
        first_finished[key] = min(_epoch(o["finished_at"]) for o in found)
        applied_outcomes = [_epoch(o["finished_at"]) for o in found if o["status"] == "applied"]
        if applied_outcomes:
            first_applied[key] = min(applied_outcomes)
        r.outcomes[final[key]] += 1
    stray = set(by_source) - {(m.partition, m.offset) for m in inputs}
    if stray:
        r.notes.append(f"{len(stray)} outcomes name no input message")

    dlq = set(dead_letters)
    for key, status in final.items():
        if status in DLQ_STATUSES and key not in dlq:
            r.dlq_missing += 1
            r.example("dlq_missing", f"{key} {status}")

    # (b) applied at most once, and the log agrees with the outcomes
    source_of = {m.event_id: (m.partition, m.offset) for m in inputs if m.event_id}
    index_of = {m.event_id: m.index for m in inputs if m.event_id}
    applied: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in applied_log:
        if entry.get("event_id"):
            applied[entry["event_id"]].append(entry)
    r.applied_entries = len(applied_log)
    for event_id, entries in applied.items():
        if len(entries) > 1:
            r.applied_twice += 1
            r.example("applied_twice", f"{event_id} x{len(entries)}", event_id)
        key = source_of.get(event_id)
        if key is None:
            r.notes.append(f"applied event {event_id} is not in the input")
        elif final.get(key) not in (None, "applied"):
            r.applied_not_reported += 1
            r.example("applied_not_reported", f"{event_id} {key} outcome={final.get(key)}", event_id)
    event_at = {(m.partition, m.offset): m.event_id for m in inputs}
    for key, status in final.items():
        event_id = event_at.get(key)
        if status == "applied" and event_id is not None and event_id not in applied:
            r.reported_not_applied += 1
            r.example("reported_not_applied", f"{event_id} {key}", event_id)

    # crash-window figures: requests for an event after the one that applied it
    # (hung and dropped requests never reached the service: they are not re-sends that it handled;
    # the simulator records a request when it ends, so a hung one would look later than it was)
    puts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for req in requests:
        if req.get("method") == "PUT" and req.get("event_id") and req.get("fault") not in ("hang", "drop"):
            puts[req["event_id"]].append(req)
    for event_id, reqs in puts.items():
        reqs.sort(key=lambda q: q["seq"])
        applied_at = next((i for i, q in enumerate(reqs) if q.get("error_code") == SUCCESS_CODE), None)
        if applied_at is None or applied_at == len(reqs) - 1:
            continue
        later = reqs[applied_at + 1 :]
        r.resent_after_apply += 1
        r.example("resent_after_apply", f"{event_id} +{len(later)} {[q['status'] for q in later]}", event_id)
        key = source_of.get(event_id)
        if key in first_applied and any(q["at"] > first_applied[key] for q in later):
            r.reapplied_after_outcome += 1
            r.example("reapplied_after_outcome", f"{event_id} {key}", event_id)

    # (c) per-ticket order of first applications
    per_ticket: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for entry in applied_log:
        event_id = entry.get("event_id")
        if event_id and event_id not in seen:
            seen.add(event_id)
            per_ticket[entry["ticket_id"]].append(event_id)
    for ticket, events in per_ticket.items():
        order = [index_of.get(e, -1) for e in events]
        if order != sorted(order):
            r.order_violations += 1
            r.example("order_violations", f"{ticket} {events}")

    # (d) commits only over finished work, at every sampled moment
    # latest[p][n]: when the last of offsets 0..n of partition p got its outcome (inf: one never did)
    ends: Counter[int] = Counter()
    for m in inputs:
        ends[m.partition] = max(ends[m.partition], m.offset + 1)
    latest: dict[int, list[float]] = {}
    for partition, end_offset in ends.items():
        running, row = 0.0, []
        for offset in range(end_offset):
            running = max(running, first_finished.get((partition, offset), math.inf))
            row.append(running)
        latest[partition] = row
    for snap in snapshots:
        for partition, position in snap.positions.items():
            if position <= 0:
                continue
            row = latest.get(partition, [])
            done_at = row[position - 1] if position <= len(row) else math.inf
            if done_at > snap.at:
                r.commit_violations += 1
                r.example(
                    "commit_violations", f"{snap.label} p{partition} committed {position} at {snap.at:.3f}"
                )
    if final_positions is not None:
        r.uncommitted_at_end = sum(max(0, end - final_positions.get(p, 0)) for p, end in ends.items())
        if r.uncommitted_at_end:
            r.example("uncommitted_at_end", f"ends {dict(ends)} committed {final_positions}")
    return r
