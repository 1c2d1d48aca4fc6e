"""The per-message counts kept without prometheus-client's locks expose what its own counters and
histogram would: same families, help, types, samples and bucket edges."""

from __future__ import annotations

import threading
from typing import Any

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from schemas.outcomes import OutcomeStatus
from worker.errors import PAUSE_KINDS
from worker.metrics import API_LATENCY_BUCKETS, Metrics

LATENCIES = [0.0, 0.001, 0.005, 0.0050001, 0.3, 1.0, 29.9, 30.0, 45.0]
HOT = {
    "coc_worker_messages_consumed",
    "coc_worker_outcomes",
    "coc_worker_api_requests",
    "coc_worker_api_request_seconds",
}


def _families(registry: CollectorRegistry) -> dict[str, Any]:
    """Each hot family's help, type and samples; a ``_created`` sample's value is left out."""
    return {
        family.name: (
            family.documentation,
            family.type,
            sorted(
                (s.name, sorted(s.labels.items()), None if s.name.endswith("_created") else s.value)
                for s in family.samples
            ),
        )
        for family in registry.collect()
        if family.name in HOT
    }


def _reference() -> tuple[CollectorRegistry, Counter, Counter, Counter, Histogram]:
    """prometheus-client's own metrics, declared as the worker declared them before."""
    ref = CollectorRegistry()
    consumed = Counter("coc_worker_messages_consumed", "Messages read from the input topic.", registry=ref)
    outcomes = Counter(
        "coc_worker_outcomes", "Outcome events published, by status.", ["status"], registry=ref
    )
    requests = Counter(
        "coc_worker_api_requests",
        "API calls by HTTP status code (or 'connect_error', 'timeout', 'disconnected', 'client_error';"
        " 'error': a call cancelled before its answer).",
        ["code"],
        registry=ref,
    )
    latency = Histogram(
        "coc_worker_api_request_seconds",
        "API call latency, answered or not, by method: PUT (changes, the write probe), GET (ticket reads, probes).",
        ["method"],
        buckets=API_LATENCY_BUCKETS,
        registry=ref,
    )
    for method in ("PUT", "GET"):  # a ticket read's latency is not a change's
        latency.labels(method=method)
    for status in OutcomeStatus:
        outcomes.labels(status=status.value)
    # the transport codes at 0 from the start: increase() cannot see a series' first sample, so
    # the first timeouts of an outage went unseen by an alert on them
    for code in ("connect_error", "timeout", "disconnected", "client_error", "error"):
        requests.labels(code=code)
    return ref, consumed, outcomes, requests, latency


@pytest.mark.parametrize("use_created", [True, False])
@pytest.mark.parametrize("latencies", [[], LATENCIES])
def test_the_hot_metrics_expose_what_prometheus_clients_own_would(
    latencies: list[float], use_created: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", use_created)
    ours = Metrics()
    ref, consumed, outcomes, requests, latency = _reference()
    for seconds in latencies:
        ours.count_consumed()
        consumed.inc()
        ours.count_outcome(OutcomeStatus.APPLIED)
        outcomes.labels(status="applied").inc()
        code = "200" if seconds < 1 else "timeout"
        ours.count_api_request(code)
        requests.labels(code=code).inc()
        method = "PUT" if seconds < 2 else "GET"
        ours.api_latency_by_method[method].observe(seconds)
        latency.labels(method=method).observe(seconds)
    assert _families(ours.registry) == _families(ref)
    assert ("_created" in ours.render().decode()) is use_created


def test_the_hot_metrics_names_are_taken_in_their_registry() -> None:
    ours = Metrics()
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("coc_worker_outcomes", "again", registry=ours.registry)


def test_a_scrape_from_another_thread_while_codes_are_added() -> None:
    ours = Metrics()
    done = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        while not done.is_set():
            try:
                ours.render()
            except BaseException as exc:  # what the scrape would have raised
                errors.append(exc)
                return

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(20_000):
            ours.count_api_request(str(i))
    finally:
        done.set()
        scraper.join()
    assert errors == []


def test_labelled_counters_show_every_kind_from_the_start() -> None:
    """``increase()`` cannot see a series' first sample: the first pause of a kind (or a short
    one that flapped) was invisible to an alert, its series appearing already at 1."""
    registry = Metrics().registry
    for kind in PAUSE_KINDS:
        assert registry.get_sample_value("coc_worker_pauses_total", {"kind": kind}) == 0.0
    for kind in ("duplicate", "redelivered"):
        assert registry.get_sample_value("coc_worker_dedup_hits_total", {"kind": kind}) == 0.0
