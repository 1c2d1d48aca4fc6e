"""The per-message counts kept without prometheus-client's locks expose what its own counters and
histogram would: same names, labels, samples and bucket edges."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from schemas.outcomes import OutcomeStatus
from worker.metrics import API_LATENCY_BUCKETS, Metrics

LATENCIES = [0.0, 0.001, 0.005, 0.0050001, 0.3, 1.0, 29.9, 30.0, 45.0]


def _samples(
    registry: CollectorRegistry, names: set[str]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if family.name in names and not s.name.endswith("_created")
    }


@pytest.mark.parametrize("latencies", [[], LATENCIES])
def test_the_hot_metrics_expose_what_prometheus_clients_own_would(latencies: list[float]) -> None:
    ours = Metrics()
    ref = CollectorRegistry()
    consumed = Counter("coc_worker_messages_consumed", "x", registry=ref)
    outcomes = Counter("coc_worker_outcomes", "x", ["status"], registry=ref)
    requests = Counter("coc_worker_api_requests", "x", ["code"], registry=ref)
    latency = Histogram("coc_worker_api_request_seconds", "x", buckets=API_LATENCY_BUCKETS, registry=ref)
    for status in OutcomeStatus:
        outcomes.labels(status=status.value)
    for seconds in latencies:
        ours.consumed.inc()
        consumed.inc()
        ours.count_outcome(OutcomeStatus.APPLIED)
        outcomes.labels(status="applied").inc()
        code = "200" if seconds < 1 else "timeout"
        ours.count_api_request(code)
        requests.labels(code=code).inc()
        ours.api_latency.observe(seconds)
        latency.observe(seconds)
    names = {"coc_worker_messages_consumed", "coc_worker_outcomes", "coc_worker_api_requests"}
    names.add("coc_worker_api_request_seconds")
    assert _samples(ours.registry, names) == _samples(ref, names)
    rendered = ours.render().decode()
    for name in ("coc_worker_messages_consumed_created", "coc_worker_api_request_seconds_created"):
        assert f"# TYPE {name} gauge" in rendered
