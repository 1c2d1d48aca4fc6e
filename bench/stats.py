"""Pure arithmetic of the benchmark: percentiles, medians, ratios, CPU windows, outcome analysis.

No I/O here: ``tests/test_bench.py`` runs all of it in milliseconds.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: (partition, offset) of an input record
SourceKey = tuple[int, int]


@dataclass(slots=True)
class Sample:
    """One reading of a process: when, its CPU seconds so far (user + system), its RSS."""

    at: float  # epoch seconds
    cpu_s: float
    rss_bytes: int


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def cpu_at(samples: Sequence[Sample], at: float) -> float | None:
    """The process's CPU seconds at epoch time ``at``, interpolated between samples."""
    if not samples:
        return None
    if at <= samples[0].at:
        return samples[0].cpu_s
    for before, after in itertools.pairwise(samples):
        if before.at <= at <= after.at:
            span = after.at - before.at
            share = (at - before.at) / span if span > 0 else 1.0
            return before.cpu_s + (after.cpu_s - before.cpu_s) * share
    return samples[-1].cpu_s


def cpu_between(samples: Sequence[Sample], start: float, end: float) -> float | None:
    first, last = cpu_at(samples, start), cpu_at(samples, end)
    if first is None or last is None:
        return None
    return max(0.0, last - first)


@dataclass(slots=True)
class OutcomeStats:
    """What the results topic says about one run."""

    count: int = 0  # distinct inputs with an outcome
    copies: int = 0  # outcome records beyond one per input (at-least-once redeliveries)
    statuses: dict[str, int] = field(default_factory=dict)
    first_received: float | None = None  # epoch s, earliest received_at
    last_finished: float | None = None  # epoch s, latest finished_at
    latencies_ms: list[float] = field(default_factory=list)
    #: The latency split at the subject's own ``received_at``/``finished_at``: before it took the
    #: message (produce + broker + fetch wait) and while it held it (processing, API, publish).
    wait_ms: list[float] = field(default_factory=list)
    held_ms: list[float] = field(default_factory=list)

    @property
    def window_s(self) -> float | None:
        if self.first_received is None or self.last_finished is None:
            return None
        return max(0.0, self.last_finished - self.first_received)

    @property
    def throughput(self) -> float | None:
        """Inputs per second from the first consume to the last outcome written."""
        return ratio(self.count, self.window_s)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def last_finished_at(outcomes: Iterable[tuple[bytes, int]]) -> float | None:
    """The latest ``finished_at`` (epoch s) among these outcomes."""
    found = [_epoch(json.loads(value)["finished_at"]) for value, _ in outcomes]
    return max(found) if found else None


def analyze_outcomes(
    outcomes: Iterable[tuple[bytes, int]],
    input_timestamps: dict[SourceKey, int] | None = None,
    *,
    finished_by: float | None = None,
) -> OutcomeStats:
    """From ``(outcome JSON, outcome record timestamp ms)``: counts, window and per-event latency.

    Latency is the outcome record's timestamp minus its input record's timestamp (both set by
    the producing client), for the first outcome of each input. ``finished_by`` (epoch s): only
    outcomes finished by then count (a time-capped window).
    """
    stats = OutcomeStats()
    seen: set[SourceKey] = set()
    statuses: Counter[str] = Counter()
    for value, timestamp_ms in outcomes:
        outcome: dict[str, Any] = json.loads(value)
        source = outcome["source"]
        key = (int(source["partition"]), int(source["offset"]))
        received, finished = _epoch(outcome["received_at"]), _epoch(outcome["finished_at"])
        if finished_by is not None and finished > finished_by:
            continue
        if key in seen:
            stats.copies += 1
            continue
        seen.add(key)
        statuses[outcome["status"]] += 1
        if stats.first_received is None or received < stats.first_received:
            stats.first_received = received
        if stats.last_finished is None or finished > stats.last_finished:
            stats.last_finished = finished
        if input_timestamps is not None and key in input_timestamps:
            produced_ms = input_timestamps[key]
            stats.latencies_ms.append(float(timestamp_ms - produced_ms))
            stats.wait_ms.append(received * 1000 - produced_ms)
            stats.held_ms.append((finished - received) * 1000)
    stats.count = len(seen)
    stats.statuses = dict(statuses)
    return stats
