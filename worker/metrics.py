"""Prometheus metrics of one worker, on a registry of its own (tests run several workers per process).

Every metric has one fixed label set, and no label ever carries an event id, a ticket id or a
secret: cardinality stays bounded whatever the input.

The four metrics counted on every message (messages consumed, outcomes, API requests and their
latency) are kept as plain numbers and handed to prometheus-client when it is scraped
(``_HotMetrics``): its own counters take a lock on every increment, for threads the worker does not
have (everything here runs on the event loop's thread), and at thousands of messages per second
those locks and their wrappers were ~3% of the loop's CPU. The names, labels and samples exposed
are the same as prometheus-client's counters and histogram would expose.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric, Sample
from prometheus_client.registry import Collector

from schemas.outcomes import OutcomeStatus
from worker.errors import PAUSE_KINDS

#: Upper bounds of the API latency histogram, in seconds.
API_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Tally:
    """A counter's value, without a lock: counted on the event loop's thread only."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()  # as a prometheus-client counter (child) keeps it


class LatencyHistogram:
    """A histogram's buckets and sum, without a lock (see ``Tally``)."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = (*bounds, float("inf"))
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bucket with seconds <= le
        self.sum += seconds


class _HotMetrics(Collector):
    """Exposes the per-message counts of a ``Metrics`` when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> Iterator[Metric]:
        """The families without samples: the registry refuses another metric of these names."""
        return self._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        m = self._m
        # As prometheus-client's own metrics: no _created samples when they are turned off
        # (PROMETHEUS_DISABLE_CREATED_SERIES, or disable_created_metrics()).
        use_created = getattr(prometheus_client.metrics, "_use_created", True)

        def created(tally: Tally | LatencyHistogram) -> float | None:
            return tally.created if use_created else None

        consumed = CounterMetricFamily(*_CONSUMED)
        outcomes = CounterMetricFamily(*_OUTCOMES, labels=["status"])
        requests = CounterMetricFamily(*_API_REQUESTS, labels=["code"])
        histogram = HistogramMetricFamily(*_API_LATENCY, labels=["method"])
        if with_samples:
            consumed.add_metric([], m.consumed.value, created=created(m.consumed))
            for status, tally in m.outcome_counts.items():
                outcomes.add_metric([status.value], tally.value, created=created(tally))
            # A tuple replaced whole when a code is added: a scrape from another thread must not
            # iterate the dict while it grows (even a copy of it was seen to fail, rarely).
            for code, tally in m.api_request_tallies:
                requests.add_metric([code], tally.value, created=created(tally))
            for method, latency in m.api_latency_by_method.items():
                cumulative, buckets = 0, []
                for bound, count in zip(latency.bounds, latency.counts, strict=True):
                    cumulative += count
                    buckets.append((_bucket_label(bound), cumulative))
                histogram.add_metric([method], buckets, latency.sum)
                if use_created:
                    histogram.samples.append(
                        Sample(f"{_API_LATENCY[0]}_created", {"method": method}, latency.created)
                    )
        yield from (consumed, outcomes, requests, histogram)


_CONSUMED = ("coc_worker_messages_consumed", "Messages read from the input topic.")
_OUTCOMES = ("coc_worker_outcomes", "Outcome events published, by status.")
_API_REQUESTS = (
    "coc_worker_api_requests",
    "API calls by HTTP status code (or 'connect_error', 'timeout', 'disconnected', 'client_error';"
    " 'error': a call cancelled before its answer).",
)
_API_LATENCY = (
    "coc_worker_api_request_seconds",
    "API call latency, answered or not, by method: PUT (changes, the write probe), GET (ticket reads, probes).",
)
#: ``coc_worker_api_request_seconds``'s label values: a ticket read's latency is not a change's.
API_METHODS = ("PUT", "GET")


def _bucket_label(bound: float) -> str:
    """As prometheus-client writes an upper bound (``floatToGoString``): 0.005, 1.0, +Inf."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


#: Why an event was not applied again (``coc_worker_dedup_hits``'s label values).
DEDUP_HIT_KINDS = ("duplicate", "redelivered")
#: ``coc_worker_key_mismatches_total``: no key at all, or a key other than the ticket_id.
KEY_MISMATCH_KINDS = ("missing", "other")
#: Why a partition is held (``coc_worker_partitions_held``): one message stuck ``max_uncommitted``
#: messages back, the partition at its share of the buffer (messages or bytes), or its log
#: started over and its old jobs still running.
HOLD_REASONS = ("uncommitted", "share", "bytes", "rewinding")
#: ``coc_worker_messages_abandoned_total``: jobs cancelled past a revoke's or a stop's grace.
ABANDON_KINDS = ("revoked", "stopped")
#: ``coc_worker_rate_limit_waits_total``: the request rate limit, or the calls-in-flight one.
RATE_LIMIT_KINDS = ("rate", "concurrency")
#: The API request codes that are not HTTP statuses (``count_api_request``), shown from the start.
TRANSPORT_CODES = ("connect_error", "timeout", "disconnected", "client_error", "error")


def _counter_by(
    registry: CollectorRegistry, name: str, documentation: str, label: str, values: tuple[str, ...]
) -> Counter:
    """A counter with one label, every value of it at 0 from the start: increase() cannot see a
    series' first sample, so a first pause of a kind (or a short one that flapped) went unseen by
    an alert on it."""
    counter = Counter(name, documentation, [label], registry=registry)
    for value in values:
        counter.labels(value)
    return counter


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Counted on every message: see _HotMetrics. Every outcome status shows from the start, at 0,
        # so a rate() over it exists before the first such outcome.
        self.consumed = Tally()
        self.outcome_counts = {s: Tally() for s in OutcomeStatus}
        self.api_request_counts: dict[str, Tally] = {}  # HTTP codes and a few transport error names
        self.api_request_tallies: tuple[tuple[str, Tally], ...] = ()  # the same, for scrapes
        self.api_latency_by_method = {method: LatencyHistogram(API_LATENCY_BUCKETS) for method in API_METHODS}
        # At 0 from the start, as the pause kinds below: the first timeouts of an outage are the
        # ones an alert on increase() must see.
        for code in TRANSPORT_CODES:
            self.count_api_request(code, 0)
        r.register(_HotMetrics(self))
        # The process's memory, CPU and open files, as the default registry would show them: the
        # worker's limits (max_buffered_bytes) are set against the container's memory.
        ProcessCollector(registry=r)
        self.dead_letters = Counter(
            "coc_worker_dead_letters", "Records written to the DLQ topic.", registry=r
        )
        self.retries = Counter(
            "coc_worker_api_retries", "API attempts after the first, per message.", registry=r
        )
        self.dedup_hits = _counter_by(
            r,
            "coc_worker_dedup_hits",
            "Events not applied again: 'duplicate' (another message) or 'redelivered' (same one).",
            "kind",
            DEDUP_HIT_KINDS,
        )
        self.in_flight = Gauge(
            "coc_worker_in_flight",
            "Messages taken from Kafka, not yet finished (running, or waiting in their ticket's lane).",
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "coc_worker_buffered_bytes",
            "Bytes (keys and values) of the messages taken from Kafka, not yet finished.",
            registry=r,
        )
        self.lag = Gauge(
            "coc_worker_consumer_lag",
            "High watermark minus committed offset (before the group's first commit: minus the log's"
            " start). Frozen while the partition is held or consumption paused: no fetch updates it.",
            ["partition"],
            registry=r,
        )
        self.ready = Gauge(
            "coc_worker_ready",
            "1 while /readyz answers 200 (assigned, broker answering and fetching, topics present,"
            " not paused, not stopping).",
            registry=r,
        )
        self.partitions_held = Gauge(
            "coc_worker_partitions_held",
            "Assigned partitions not fetched for now, by reason: 'uncommitted' (a message stuck"
            " max_uncommitted messages back), 'share' or 'bytes' (at its share of the buffer),"
            " 'rewinding' (its log started over).",
            ["reason"],
            registry=r,
        )
        self.abandoned = _counter_by(
            r,
            "coc_worker_messages_abandoned",
            "Messages whose job was cancelled past a revoke's or a stop's grace, without an outcome"
            " here: the partition's next reader reads them again.",
            "kind",
            ABANDON_KINDS,
        )
        self.topics_missing = Gauge(
            "coc_worker_topics_missing",
            "The worker's topics (input, results, dead-letter) the broker does not list: not ready while above 0.",
            registry=r,
        )
        self.paused = Gauge(
            "coc_worker_paused", "1 while consumption is paused by a systemic failure.", registry=r
        )
        self.pauses = _counter_by(
            r, "coc_worker_pauses", "Systemic failures that paused consumption, by kind.", "kind", PAUSE_KINDS
        )
        self.key_mismatches = _counter_by(
            r,
            "coc_worker_key_mismatches",
            "Events whose message key is not their ticket_id: 'missing' (no key) or 'other'.",
            "kind",
            KEY_MISMATCH_KINDS,
        )
        self.commits = Counter("coc_worker_commits", "Offset commits the broker accepted.", registry=r)
        self.rate_limited = _counter_by(
            r,
            "coc_worker_rate_limit_waits",
            "API calls delayed, by limit: 'rate' (COC_WORKER_API_RATE_LIMIT_PER_S) or 'concurrency'"
            " (the adaptive limit on calls in flight).",
            "limit",
            RATE_LIMIT_KINDS,
        )
        self.api_concurrency_limit = Gauge(
            "coc_worker_api_concurrency_limit",
            "Adaptive limit on concurrent API calls (halved on 429).",
            registry=r,
        )

    def count_consumed(self) -> None:
        self.consumed.value += 1

    def count_outcome(self, status: OutcomeStatus) -> None:
        self.outcome_counts[status].value += 1

    def count_api_request(self, code: str, n: int = 1) -> None:
        tally = self.api_request_counts.get(code)
        if tally is None:
            tally = self.api_request_counts[code] = Tally()
            self.api_request_tallies = (*self.api_request_tallies, (code, tally))
        tally.value += n

    def render(self) -> bytes:
        return generate_latest(self.registry)
