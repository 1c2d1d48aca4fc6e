"""Prometheus metrics of one worker, on a registry of its own (tests run several workers per process).

Every metric has one fixed label set, and no label ever carries an event id, a ticket id or a
secret: cardinality stays bounded whatever the input.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from schemas.outcomes import OutcomeStatus


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "coc_worker_messages_consumed", "Messages read from the input topic.", registry=r
        )
        self.outcomes = Counter(
            "coc_worker_outcomes", "Outcome events published, by status.", ["status"], registry=r
        )
        self.dead_letters = Counter(
            "coc_worker_dead_letters", "Records written to the DLQ topic.", registry=r
        )
        self.api_requests = Counter(
            "coc_worker_api_requests",
            "API calls by HTTP status code (or 'connect_error', 'timeout', 'disconnected').",
            ["code"],
            registry=r,
        )
        self.api_latency = Histogram(
            "coc_worker_api_request_seconds",
            "API call latency, successful or not.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.retries = Counter(
            "coc_worker_api_retries", "API attempts after the first, per message.", registry=r
        )
        self.dedup_hits = Counter(
            "coc_worker_dedup_hits",
            "Events not applied again: 'duplicate' (another message) or 'redelivered' (same one).",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "coc_worker_in_flight",
            "Messages taken from Kafka, not yet finished (running, or waiting in their ticket's lane).",
            registry=r,
        )
        self.lag = Gauge(
            "coc_worker_consumer_lag", "High watermark minus committed offset.", ["partition"], registry=r
        )
        self.paused = Gauge(
            "coc_worker_paused", "1 while consumption is paused by a systemic failure.", registry=r
        )
        self.pauses = Counter(
            "coc_worker_pauses", "Systemic failures that paused consumption, by kind.", ["kind"], registry=r
        )
        self.commits = Counter("coc_worker_commits", "Offset commits sent to the broker.", registry=r)
        self.rate_limited = Counter(
            "coc_worker_rate_limit_waits", "API calls delayed by the rate or concurrency limit.", registry=r
        )
        self.api_concurrency_limit = Gauge(
            "coc_worker_api_concurrency_limit",
            "Adaptive limit on concurrent API calls (halved on 429).",
            registry=r,
        )
        # Children of the labelled counters counted once or twice per message, looked up once:
        # ``labels()`` takes a lock and builds a key on every call. Every status shows from the
        # start, at 0, so a rate() over it exists before the first such outcome.
        self._outcome_by_status = {s: self.outcomes.labels(status=s.value) for s in OutcomeStatus}
        self._api_request_by_code: dict[str, Counter] = {}

    def count_outcome(self, status: OutcomeStatus) -> None:
        self._outcome_by_status[status].inc()

    def count_api_request(self, code: str) -> None:
        child = self._api_request_by_code.get(code)
        if child is None:  # HTTP codes and the few transport error names: a small set
            child = self._api_request_by_code[code] = self.api_requests.labels(code=code)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
