"""The benchmark's pure parts (statistics, workload, report), so they cannot rot between runs.

The benchmark itself is ``make bench``; nothing here starts a broker or a process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import re
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.procs import Subject, Usage
from bench.scenarios import RunResult, RunSpec, _usage
from bench.stats import (
    Sample,
    analyze_outcomes,
    cpu_at,
    cpu_between,
    last_finished_at,
    median,
    percentile,
    ratio,
)
from bench.workload import Workload, generate, paced_schedule, ticket_id
from schemas.events import CHANGE_EVENT_ADAPTER


# --- statistics ---------------------------------------------------------------------------------------
def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter


def test_percentile_of_nothing_is_none_and_q_is_checked() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_median_skips_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([1.0, 4.0]) == 2.5
    assert median([None, None]) is None
    assert median([]) is None


def test_ratio_guards_missing_and_zero() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(1.0, None) is None


def test_cpu_between_interpolates_samples() -> None:
    samples = [Sample(100.0, 1.0, 0), Sample(101.0, 2.0, 0), Sample(103.0, 6.0, 0)]
    assert cpu_at(samples, 99.0) == 1.0  # before the first sample
    assert cpu_at(samples, 100.5) == pytest.approx(1.5)
    assert cpu_at(samples, 102.0) == pytest.approx(4.0)
    assert cpu_at(samples, 200.0) == 6.0  # after the last
    assert cpu_between(samples, 100.5, 102.0) == pytest.approx(2.5)
    assert cpu_between([], 0.0, 1.0) is None


def _outcome(
    partition: int, offset: int, received: datetime, seconds: float, status: str = "applied"
) -> bytes:
    return json.dumps(
        {
            "status": status,
            "source": {"topic": "t", "partition": partition, "offset": offset},
            "received_at": received.isoformat().replace("+00:00", "Z"),
            "finished_at": (received + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z"),
        }
    ).encode()


def test_analyze_outcomes_counts_each_input_once_and_measures_the_window() -> None:
    t0 = datetime(2025, 11, 28, 12, 0, 0, tzinfo=UTC)
    outcomes = [
        (_outcome(0, 0, t0, 0.5), 1_000),
        (_outcome(0, 1, t0 + timedelta(seconds=1), 1.0), 1_100),
        (_outcome(1, 0, t0 + timedelta(seconds=2), 2.0, "rejected"), 1_300),
        (_outcome(0, 1, t0 + timedelta(seconds=3), 1.0), 9_999),  # a redelivered copy
    ]
    inputs = {(0, 0): 900, (0, 1): 1_000, (1, 0): 1_000}
    stats = analyze_outcomes(outcomes, inputs)
    assert stats.count == 3
    assert stats.copies == 1
    assert stats.statuses == {"applied": 2, "rejected": 1}
    assert stats.window_s == pytest.approx(4.0)  # 12:00:00 -> 12:00:04
    assert stats.throughput == pytest.approx(0.75)
    assert sorted(stats.latencies_ms) == [100.0, 100.0, 300.0]  # first copies only
    # received_at 12:00:00 is 900 ms after the input's timestamp of 1970-01-01 00:00:00.900
    assert stats.wait_ms[0] == pytest.approx(t0.timestamp() * 1000 - 900)
    assert stats.held_ms == pytest.approx([500.0, 1000.0, 2000.0])


def test_a_capped_window_counts_what_finished_inside_it_even_if_read_later() -> None:
    """The window of a capped run ends at the last outcome read when the cap struck; outcomes that
    finished by then but were read during the grace count, later ones do not. Before, the window
    ended at the cap's read and anything finished but not yet read was left out (an undercount)."""
    t0 = datetime(2025, 11, 28, 12, 0, 0, tzinfo=UTC)
    read_by_the_cap = [(_outcome(0, 0, t0, 1.0), 0), (_outcome(0, 1, t0, 3.0), 0)]
    read_in_the_grace = [(_outcome(1, 0, t0, 2.0), 0), (_outcome(1, 1, t0, 3.5), 0)]
    cutoff = last_finished_at(read_by_the_cap)
    assert cutoff == pytest.approx(t0.timestamp() + 3.0)
    stats = analyze_outcomes(read_by_the_cap + read_in_the_grace, finished_by=cutoff)
    assert stats.count == 3  # 1/0 finished at +2 s, inside; 1/1 at +3.5 s, after
    assert stats.window_s == pytest.approx(3.0)


def test_analyze_outcomes_of_nothing() -> None:
    stats = analyze_outcomes([])
    assert stats.count == 0
    assert stats.throughput is None
    assert stats.window_s is None


# --- workload -----------------------------------------------------------------------------------------
def test_workload_is_deterministic_valid_and_ordered_per_ticket() -> None:
    records = generate(Workload(events=300, tickets=20, seed=3))
    assert records == generate(Workload(events=300, tickets=20, seed=3))
    assert len(records) == 300
    steps: dict[str, list[str]] = defaultdict(list)
    for key, value in records:
        event = CHANGE_EVENT_ADAPTER.validate_json(value)  # every event passes the contract
        assert key == event.ticket_id.encode()
        steps[f"{event.ticket_id}/{event.sub_ticket_id}"].append(event.type.value)
    assert len({key for key, _ in records}) == 20
    for sequence in steps.values():  # each sub-ticket walks the state machine in order
        assert sequence[0] == "change.started"
        assert sequence[1:2] in ([], ["change.ended"])
        assert all(step in ("change.succeeded", "change.failed") for step in sequence[2:])
        assert len(sequence) <= 3


def test_workload_tops_up_when_events_do_not_divide_evenly() -> None:
    records = generate(Workload(events=47, tickets=10))
    assert len(records) == 47
    assert {key for key, _ in records} == {ticket_id(n).encode() for n in range(10)}
    event_ids = [json.loads(value)["event_id"] for _, value in records]
    assert len(set(event_ids)) == 47


def test_paced_schedule_spreads_records_evenly() -> None:
    schedule = list(paced_schedule(5, rate_per_s=100.0))
    assert [i for i, _ in schedule] == [0, 1, 2, 3, 4]
    assert [due for _, due in schedule] == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])


# --- report -------------------------------------------------------------------------------------------
def _run(
    scenario: str, subject: str, concurrency: int, throughput: float | None, **extra: Any
) -> dict[str, Any]:
    run: dict[str, Any] = {
        "scenario": scenario,
        "subject": subject,
        "latency_ms": 20.0 if scenario in ("api20", "sweep") else 0.0,
        "concurrency": concurrency,
        "events": 1000,
        "cap_s": 10.0,
        "paced_rate": None,
        "ok": throughput is not None,
        "error": None if throughput is not None else "boom",
        "count": 1000,
        "throughput": throughput,
        "p50_ms": 10.0,
        "p99_ms": 40.0,
        "cpu_s": 1.0,
        "cpu_s_per_1k": 1.0,
        "peak_rss_mb": 80.0,
        "statuses": {"applied": 1000} if throughput is not None else {},
        "copies": 0,
        "wall_s": 12.0,
        "extra": {"complete": True},
    }
    run.update(extra)
    return run


def _repeat_at_0ms(worker: float, ceiling_b: float, **more: float | None) -> list[dict[str, Any]]:
    """One repeat of the 0 ms scenario: the worker, ceiling A (far above) and ceiling B, then
    ``more`` subjects at the worker's concurrency, with these throughputs."""
    return [
        _run("api0", "worker", 256, worker),
        _run("api0", "ceiling_a", 1, 100_000.0),
        _run("api0", "ceiling_b", 256, ceiling_b),
        *(_run("api0", subject, 256, throughput) for subject, throughput in more.items()),
    ]


def _runs() -> list[dict[str, Any]]:
    return [
        _run("api0", "worker", 256, 700.0),
        _run("api0", "worker", 256, 900.0),
        _run("api0", "worker", 256, 800.0),
        _run("api0", "ceiling_a", 1, 100_000.0),
        _run("api0", "ceiling_b", 256, 1_000.0),
        _run("api20", "worker", 256, 2_000.0),
        _run("api20", "worker", 256, None),  # a failed repeat is left out of the medians
        _run("api20", "ceiling_a", 1, 100_000.0),
        _run("api20", "ceiling_b", 256, 3_000.0),
        _run("api20", "faststream", 12, 300.0),
        _run("sweep", "worker", 16, 500.0),
        _run("sweep", "ceiling_b", 16, 700.0),
        _run("paced", "worker", 256, 400.0, p99_ms=30.0, p50_ms=12.0),
        _run(
            "rss",
            "worker",
            256,
            800.0,
            peak_rss_mb=120.0,
            count=60_000,
            events=100_000,
            extra={"complete": False},
        ),
    ]


def test_summarize_takes_medians_of_the_good_repeats() -> None:
    summary = report.summarize(_runs())
    worker0 = summary[report.group_key("api0", "worker", 256)]
    assert worker0["throughput"] == 800.0
    assert worker0["runs"] == 3
    assert worker0["statuses"] == {"applied": 3000}
    worker20 = summary[report.group_key("api20", "worker", 256)]
    assert (worker20["runs"], worker20["ok_runs"], worker20["throughput"]) == (2, 1, 2000.0)
    assert worker20["errors"] == ["boom"]
    assert summary[report.group_key("rss", "worker", 256)]["complete"] is False


def test_targets_are_ratios_to_the_same_run() -> None:
    targets = report.evaluate_targets(report.summarize(_runs()), concurrency=256)
    by_name = {t.name.split(":")[0]: t for t in targets}
    assert len(targets) == 5
    t0, t20, peer, p99, rss = targets
    assert t0.met is True  # 800 vs min(100k, 1000) = 0.8 >= 0.7
    assert t0.ratio == pytest.approx(0.8 / 0.7)
    assert t20.met is False  # 2000 vs min(12800, 100k, 3000) = 0.67 < 0.8
    assert t20.ratio == pytest.approx((2000 / 3000) / 0.8)
    assert peer.met is True  # 2000 / 300 = 6.7 >= 5
    assert p99.met is True
    assert p99.ratio == pytest.approx(50 / 30)
    assert rss.met is True
    assert "only 60,000 of 100,000" in rss.measured
    assert {t.mark for t in targets} == {"✅", "❌"}
    assert "0 ms API" in by_name


def test_targets_show_the_ratio_of_each_repeat_when_the_repeats_pair_up() -> None:
    # the machine ran faster in the second repeat
    runs = _repeat_at_0ms(800.0, 1_000.0) + _repeat_at_0ms(1_000.0, 2_000.0)
    t0 = report.evaluate_targets(report.summarize(runs), concurrency=256)[0]
    # judged on the median of the per-repeat ratios: each repeat's subjects ran one after another,
    # while the ratio of the medians pairs the first repeat's worker with the second's ceiling
    assert t0.measured == (
        "0.65x, the median of the per-repeat ratios (0.80, 0.50); on the medians 900 ev/s vs min 1,500 ev/s = 0.60x"
    )
    assert t0.ratio == pytest.approx(0.65 / 0.7)
    # the 20 ms runs of _runs() do not pair up (a failed repeat): judged on the medians
    assert all(
        "per repeat" not in t.measured for t in report.evaluate_targets(report.summarize(_runs()), 256)
    )


def test_added_latency_is_the_worker_p99_over_the_pass_through_floor() -> None:
    """The worker's paced p99 minus the floor's, both medians of their runs; without a floor the
    end-to-end p99 is judged, and the row says so."""
    paced = [
        _run("paced", "worker", 256, 400.0, p99_ms=70.0, extra={"held_p99_ms": 30.0}),
        _run("paced", "passthrough", 256, 400.0, p99_ms=25.0),
        _run("paced", "worker", 256, 400.0, p99_ms=200.0, extra={"held_p99_ms": 34.0}),  # a hiccup
        _run("paced", "passthrough", 256, 400.0, p99_ms=40.0),
        _run("paced", "worker", 256, 400.0, p99_ms=75.0, extra={"held_p99_ms": 31.0}),
        _run("paced", "passthrough", 256, 400.0, p99_ms=30.0),
    ]
    summary = report.summarize(paced)
    added, text = report.added_latency(summary)
    assert added == pytest.approx(45.0)  # the median pair, not the mean (115 - 31.7)
    assert text.startswith("45.0 ms, the median of the per-pair differences (45.0, 160.0, 45.0)")
    assert "on the medians 45.0 ms = worker p99 75.0 ms - floor p99 30.0 ms" in text
    assert "held by the worker p99 31.0 ms" in text
    # pairs judged apart: a worker run whose own floor run was slow too is not charged with it
    drift = [{**r, "p99_ms": r["p99_ms"] + 100.0} if i in (2, 3) else r for i, r in enumerate(paced)]
    drift[2] = {**drift[2], "p99_ms": 135.0}  # worker 135 against its own floor 140: 0 added
    assert report.added_latency(report.summarize(drift))[0] == pytest.approx(45.0)
    p99 = report.evaluate_targets(summary, concurrency=256)[3]
    assert (p99.met, p99.ratio) == (True, pytest.approx(50 / 45))
    assert "ran at the same rate in 3 run(s) alternating" in report._floor_sentence(summary)

    # one floor run failed: counted apart, named; a floor above the worker is no negative latency
    broken = [*paced, _run("paced", "passthrough", 256, None)]
    assert "in 3 run(s) (1 more failed: boom) alternating" in report._floor_sentence(report.summarize(broken))
    assert "per-pair" not in report.added_latency(report.summarize(broken))[1]  # they no longer pair up
    high = [r if r["subject"] == "worker" else {**r, "p99_ms": 500.0} for r in paced]
    assert report.added_latency(report.summarize(high))[0] == 0.0
    assert report.evaluate_targets(report.summarize(high), concurrency=256)[3].met is True

    alone = report.summarize([r for r in paced if r["subject"] == "worker"])
    assert report.added_latency(alone) == (
        None,
        "end to end p99 75.0 ms (p50 10.0 ms), no floor measured: judged end to end",
    )
    judged = report.evaluate_targets(alone, concurrency=256)[3]
    assert (judged.met, judged.ratio) == (False, pytest.approx(50 / 75))


def test_targets_not_measured_are_not_applicable() -> None:
    targets = report.evaluate_targets({}, concurrency=256)
    assert all(t.met is None and t.mark == "n/a" for t in targets)


def test_sweep_points_merge_the_sweep_and_the_main_20ms_run() -> None:
    points = report.sweep_points(report.summarize(_runs()))
    assert points == [
        {"max_in_flight": 16, "worker": 500.0, "ceiling_b": 700.0},
        {"max_in_flight": 256, "worker": 2000.0, "ceiling_b": 3000.0},
    ]
    table = report.sweep_table(points, ceiling_a=100_000.0)
    assert "| 16 | 500 | 800 | 700 | 0.71 |" in table  # 500 / min(800, 100k, 700)


def test_markdown_has_the_targets_and_every_scenario() -> None:
    runs = _runs()
    summary = report.summarize(runs)
    targets = report.evaluate_targets(summary, concurrency=256)
    doc = {
        "environment": {
            "date": "2025-11-28 12:00 UTC",
            "git_commit": "abc1234",
            "git_dirty": False,
            "cpu_count": 2,
            "loadavg_start": "1.00",
            "loadavg_end": "1.50",
            "python": "3.11.7",
        },
        "config": {
            "mode": "full",
            "events": 50_000,
            "tickets": 1_000,
            "repeats": 3,
            "concurrency": 256,
            "paced_s": 15,
            "paced_rate": 400.0,
        },
        "elapsed_s": 480.0,
        "targets": [
            {"name": t.name, "measured": t.measured, "ratio": t.ratio, "met": t.met} for t in targets
        ],
        "summary": summary,
        "notes": ["a note"],
        "runs": runs,
    }
    text = report.markdown(doc)
    assert "## Targets (issue 5)" in text
    assert "| worker (coc-change-worker) | 256 | 800 | 0.80 |" in text
    assert "## max_in_flight sweep" in text
    assert "p99 30.0 ms" in text
    assert "No floor was measured, so the target is judged on the end-to-end figure." in text
    assert "Every process's CPU per 1,000 events during the paced runs" in text
    assert "400 events/s offered (half the worker's median 0 ms throughput)" in text
    assert "- a note" in text
    doc["config"]["paced_rate_given"] = True  # bench/run.py --paced-rate
    assert "400 events/s offered (set with --paced-rate)" in report.markdown(doc)


def test_cpu_budget_adds_every_process_on_the_machine() -> None:
    worker = {"simulator_cpu_s_per_1k": 0.5, "broker_cpu_s_per_1k": 0.25, "harness_cpu_s_per_1k": 0.05}
    runs = [
        _run("api0", "worker", 256, 800.0, extra={"complete": True, **worker}),
        _run("api0", "worker", 256, 900.0, extra={"complete": True, **worker, "broker_cpu_s_per_1k": 0.35}),
        # ceiling B runs without a broker: its column stays empty and out of the sum
        _run("api0", "ceiling_b", 256, 1_000.0, extra={"simulator_cpu_s_per_1k": 0.6}),
    ]
    summary = report.summarize(runs)
    assert summary[report.group_key("api0", "worker", 256)]["broker_cpu_s_per_1k"] == pytest.approx(0.3)
    table = report.cpu_budget_table(summary, "api0", 256)
    # worker: 1.0 (its own) + 0.5 + 0.3 + 0.05 = 1.85 s per 1k events, at 850 events/s = 1.57 cores
    assert "| worker (coc-change-worker) | 850 | 1.000 | 0.500 | 0.300 | 0.050 | 1.850 | 1.57 |" in table
    assert "| ceiling B: bare signed PUTs | 1,000 | 1.000 | 0.600 | - | - | 1.600 | 1.60 |" in table
    assert "ceiling A" not in table  # not measured here
    assert "| 1,000 |" not in report.cpu_budget_table(report.summarize(_runs()), "api0", 256)  # none sampled


def test_usage_puts_the_other_processes_on_the_subjects_window() -> None:
    def usage(*cpu: float) -> Usage:  # samples at t = 0, 10, 20 s
        return Usage(samples=[Sample(10.0 * i, c, 0) for i, c in enumerate(cpu)])

    result = RunResult(RunSpec("api0", "worker", 0.0, 256, 1000, 6.0))
    _usage(result, usage(0.0, 4.0, 8.0), 5.0, 15.0, 2000, {"simulator": usage(0.0, 2.0, 4.0)})
    assert result.cpu_s == pytest.approx(4.0)  # 2.0 -> 6.0 between t = 5 and 15
    assert result.cpu_s_per_1k == pytest.approx(2.0)
    assert result.extra["simulator_cpu_s_per_1k"] == pytest.approx(1.0)  # 1.0 -> 3.0, over 2,000 events


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib: pip install '.[bench]'"
)
def test_chart_is_written(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    report.write_chart(report.summarize(_runs()), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_shows_the_committed_latest_results() -> None:
    """make bench rewrites the README's block; it must match the committed latest.json."""
    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "bench" / "results" / "latest.json").read_text("utf-8"))
    readme = (root / "README.md").read_text("utf-8")
    section = report.readme_section(doc)
    assert section in readme
    assert "bench/results/latest.png" in section
    assert report.splice_readme(readme, section) == readme


def test_splice_readme_replaces_only_the_marked_block() -> None:
    text = f"a\n{report.README_START}\nold\n{report.README_END}\nb\n"
    assert report.splice_readme(text, "new") == "a\nnew\nb\n"
    with pytest.raises(ValueError, match="markers"):
        report.splice_readme("no markers", "new")


_DRAINS_BIG = """
import signal, sys, time
def drain(*_):
    block = bytearray(160 * 1024 * 1024)  # touched below: resident, not just reserved
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(0.5)  # a drain takes a while (the worker's: its in-flight jobs, a last commit)
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
print("ready", flush=True)
time.sleep(60)
"""


def test_peak_rss_includes_what_the_subject_uses_while_it_drains(tmp_path: Path) -> None:
    """The high-water mark was last read before SIGTERM, so memory used during the drain was
    never seen."""
    log = tmp_path / "subject.log"
    subject = Subject("drains-big", [sys.executable, "-c", _DRAINS_BIG], {}, log).start()
    deadline = datetime.now(UTC) + timedelta(seconds=20)
    while "ready" not in log.read_text():
        assert datetime.now(UTC) < deadline, "the subject never started"
        time.sleep(0.01)
    usage = subject.stop(timeout_s=20)
    assert usage.exit_code == 0
    assert usage.peak_rss_bytes > 150 * 1024 * 1024


# --- the time budget ----------------------------------------------------------------------------------
class _ClockedHarness:
    """Each run takes its window plus ``overhead_s`` on a fake clock and succeeds; with
    ``done_in_s`` the main scenarios' runs finish their backlog that soon, inside their cap."""

    def __init__(self, overhead_s: float, done_in_s: float | None = None) -> None:
        self.now = 0.0
        self.overhead_s = overhead_s
        self.done_in_s = done_in_s
        self.specs: list[RunSpec] = []

    def clock(self) -> float:
        return self.now

    def wall(self, spec: RunSpec) -> float:
        return self.window(spec) + self.overhead_s

    def window(self, spec: RunSpec) -> float:
        if self.done_in_s is not None and spec.scenario.startswith("api"):
            return min(spec.cap_s, self.done_in_s)
        return spec.cap_s

    async def run(self, spec: RunSpec) -> RunResult:
        self.specs.append(spec)
        self.now += self.wall(spec)
        return RunResult(
            spec,
            ok=True,
            count=1000,
            throughput=1000.0,
            wall_s=self.wall(spec),
            extra={"window_s": self.window(spec)},
        )


def _full_plan() -> Any:
    from bench.run import build_plan, parse_args

    return build_plan(parse_args([]))


def _measure(harness: _ClockedHarness, deadline: float) -> tuple[list[RunResult], dict[str, Any]]:
    import asyncio

    from bench.run import measure

    return asyncio.run(measure(_full_plan(), harness, lambda _: None, deadline, harness.clock))  # type: ignore[arg-type]


def test_with_time_to_spare_nothing_gives_way() -> None:
    harness = _ClockedHarness(overhead_s=2.0)
    results, extra = _measure(harness, deadline=10_000.0)
    plan = _full_plan()
    rss = [r.spec for r in results if r.spec.scenario == "rss"]
    assert [s.cap_s for s in rss] == [plan.rss_cap_s]
    assert sorted({s.concurrency for s in harness.specs if s.scenario == "sweep"}) == [16, 64, 1024]
    assert "rss_cap_trimmed_s" not in extra
    assert "sweep_skipped" not in extra


def test_without_a_budget_nothing_gives_way() -> None:
    """``--budget-s 0`` makes the deadline infinite: the RSS window must stay whole, not fail."""
    harness = _ClockedHarness(overhead_s=2.0)
    results, extra = _measure(harness, deadline=float("inf"))
    assert [r.spec.cap_s for r in results if r.spec.scenario == "rss"] == [_full_plan().rss_cap_s]
    assert "rss_cap_trimmed_s" not in extra
    assert "sweep_skipped" not in extra


def test_a_slow_hour_trims_the_rss_window_and_skips_sweep_points_but_never_a_target_scenario() -> None:
    """A slow hour (runs taking 7 s beyond their windows, as on 2026-11-29 19:22): everything the
    targets need still runs whole, the peak-RSS window shrinks, no further than its floor, and
    the sweep points that no longer fit are skipped and named; nothing runs past the deadline
    but what the targets need."""
    from bench.run import REPORT_RESERVE_S, RSS_MIN_CAP_S

    generous = _ClockedHarness(overhead_s=7.0)
    _measure(generous, deadline=10_000.0)
    targets_end = sum(s.cap_s + 7.0 for s in generous.specs if s.scenario in ("api0", "api20", "paced"))
    harness = _ClockedHarness(overhead_s=7.0)
    _results, extra = _measure(harness, deadline=targets_end + 40.0)
    plan = _full_plan()
    by_scenario = defaultdict(list)
    for spec in harness.specs:
        by_scenario[spec.scenario].append(spec)
    for scenario in ("api0", "api20", "paced"):
        assert len(by_scenario[scenario]) == len([s for s in generous.specs if s.scenario == scenario])
    assert [s.cap_s for s in by_scenario["rss"]] == [RSS_MIN_CAP_S]
    assert extra["rss_cap_trimmed_s"] == RSS_MIN_CAP_S < plan.rss_cap_s
    assert extra["sweep_skipped"] == [16, 64, 1024]
    assert not by_scenario["sweep"]
    assert harness.now <= targets_end + RSS_MIN_CAP_S + 7.0

    # with a little more time the window gives way first, and the points that fit still run
    roomier = _ClockedHarness(overhead_s=7.0)
    _, extra = _measure(roomier, deadline=targets_end + 120.0)
    ran = [s.concurrency for s in roomier.specs if s.scenario == "sweep"]
    assert ran
    assert "rss_cap_trimmed_s" in extra
    assert roomier.now <= targets_end + 120.0 - REPORT_RESERVE_S + 1e-6


def test_what_gave_way_is_said_in_the_report() -> None:
    from bench.run import _budget_notes

    plan = _full_plan()
    notes = _budget_notes(plan, {"rss_cap_trimmed_s": 15.0, "sweep_skipped": [16, 1024]})
    assert any("trimmed from 45 s to 15 s" in n for n in notes)
    assert any("16, 1024" in n and "not in the chart" in n for n in notes)
    assert _budget_notes(plan, {}) == []


def test_with_no_time_left_the_first_repeat_still_runs_and_only_the_rest_gives_way() -> None:
    """The first repeat, its paced pair and the shortest peak-RSS run always run: the targets get
    a verdict. The later repeats, their paced pairs and the sweep give way, and the report says so."""
    from bench.run import RSS_MIN_CAP_S, _budget_notes

    generous = _ClockedHarness(overhead_s=7.0)
    _measure(generous, deadline=10_000.0)
    harness = _ClockedHarness(overhead_s=7.0)
    _, extra = _measure(harness, deadline=0.0)
    first = [s for s in generous.specs if s.scenario in ("api0", "api20")]
    first = first[: len([s for s in harness.specs if s.scenario in ("api0", "api20")])]
    assert [s for s in harness.specs if s.scenario in ("api0", "api20")] == first
    assert {s.subject for s in first} == set(_full_plan().subjects)
    assert extra["repeats_done"] == 1
    assert [s.subject for s in harness.specs if s.scenario == "paced"] == ["worker", "passthrough"]
    assert [s.cap_s for s in harness.specs if s.scenario == "rss"] == [RSS_MIN_CAP_S]
    assert extra["sweep_skipped"] == [16, 64, 1024]
    assert any("1 of the 3 repeats" in n for n in _budget_notes(_full_plan(), extra))


def test_a_later_repeat_runs_only_when_the_paced_runs_and_the_rss_floor_still_fit_after_it() -> None:
    """A deadline with room for two repeats and what must follow them: the third is not started
    (in the slowest hour measured, 2026-11-30 23:40, the three repeats, the paced runs and the
    install left the whole run at the edge of 10 minutes)."""
    from bench.run import REPORT_RESERVE_S, RSS_MIN_CAP_S

    generous = _ClockedHarness(overhead_s=7.0)
    _measure(generous, deadline=10_000.0)
    mains = [s for s in generous.specs if s.scenario in ("api0", "api20")]
    per_subject = len(_full_plan().latencies)
    later = [s for s in mains if s.subject not in ("ceiling_b_rs", "pyrallel", "baseline")][
        : per_subject * 5
    ]  # what one later repeat runs: five subjects at both latencies
    first_s = sum(generous.wall(s) for s in mains) - 2 * sum(generous.wall(s) for s in later)
    repeat_s = sum(generous.wall(s) for s in later)
    after = 2 * 3 * (_full_plan().paced_s + 7.0) + RSS_MIN_CAP_S + 7.0 + 5.0 + REPORT_RESERVE_S
    harness = _ClockedHarness(overhead_s=7.0)
    _, extra = _measure(harness, deadline=first_s + 2 * repeat_s + after - 1.0)
    assert extra["repeats_done"] == 2
    assert len([s for s in harness.specs if s.scenario == "paced"]) == 4
    roomier = _ClockedHarness(overhead_s=7.0)
    _, extra = _measure(roomier, deadline=first_s + 3 * repeat_s + after + 1.0)
    assert "repeats_done" not in extra


def test_the_order_changes_every_repeat_and_the_untargeted_peers_run_in_the_first_only() -> None:
    """No subject always runs right after another (the worker came right before FastStream in
    every repeat: a drift within the run always landed on the same side of that pair), and peer
    2 and the baseline, which no target depends on, run once at each latency."""
    harness = _ClockedHarness(overhead_s=2.0)
    _measure(harness, deadline=10_000.0)
    mains = [s for s in harness.specs if s.scenario in ("api0", "api20")]
    first_repeat = mains[: 2 * len(_full_plan().subjects) - 1]  # ceiling B' runs at 0 ms only
    for subject in ("pyrallel", "baseline"):
        runs = [s for s in mains if s.subject == subject]
        assert sorted(s.scenario for s in runs) == ["api0", "api20"]
        assert all(s in first_repeat for s in runs)
    neighbours = set()
    for scenario in ("api0", "api20"):
        order = [s.subject for s in mains if s.scenario == scenario]
        neighbours |= set(itertools.pairwise(order))
    assert {("worker", "faststream"), ("faststream", "worker")} <= neighbours


def test_the_budget_counts_from_the_start_of_make_bench() -> None:
    import time

    from bench.run import _start_of

    now = time.monotonic()
    assert abs(_start_of(None) - now) < 1.0
    assert abs(_start_of(time.time() - 60.0) - (now - 60.0)) < 1.0
    assert abs(_start_of(time.time() + 60.0) - now) < 1.0  # a clock ahead of ours: now, not later
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text("utf-8")
    assert "bench/run.py --started-at $(BENCH_STARTED)" in makefile


def test_a_ceiling_answered_other_than_2xx_is_named_and_not_counted() -> None:
    from bench.run import _notes

    runs = [
        {
            "subject": "ceiling_b",
            "scenario": "api0",
            "concurrency": 256,
            "statuses": {},
            "ok": True,
            "extra": {"statuses": {"200": 900, "401": 40}},
        }
    ]
    notes = _notes(_full_plan(), runs)
    assert any("ceiling_b in api0" in n and "'401': 40" in n for n in notes)
    path = Path(__file__).resolve().parents[1] / "bench" / "peers" / "ceiling_http.py"
    spec = importlib.util.spec_from_file_location("ceiling_http", path)
    assert spec is not None
    assert spec.loader is not None
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    assert ceiling.accepted(Counter({200: 900, 204: 3, 401: 40, 409: 7, 500: 1})) == 903


def test_what_gave_way_is_in_the_readmes_block_too() -> None:
    doc = {
        "environment": {"date": "d", "git_commit": "c", "cpu_count": 2},
        "config": {"concurrency": 256, "events": 1, "tickets": 1, "repeats": 3},
        "summary": report.summarize(_runs()),
        "targets": [],
        "notes": [
            "Every subject is its own process.",
            "Time budget (570 s): the sweep's points at max_in_flight 16 did not fit and are not in the chart.",
        ],
    }
    section = report.readme_section(doc)
    assert "max_in_flight 16 did not fit" in section
    assert "Every subject is its own process" not in section


def test_a_run_that_finished_inside_its_cap_counts_only_the_window_it_used_as_its_own() -> None:
    """Runs that finish their backlog before the cap (a fast hour) must not make the set-up look
    free: the estimate of what a sweep point costs would be too small, and the peak-RSS window
    would not give way when it should."""
    from bench.run import REPORT_RESERVE_S

    generous = _ClockedHarness(overhead_s=7.0, done_in_s=5.0)
    _measure(generous, deadline=10_000.0)
    after_paced = sum(generous.wall(s) for s in generous.specs if s.scenario in ("api0", "api20", "paced"))
    plan = _full_plan()
    point = (plan.sweep_cap_s + 7.0) + (plan.sweep_cap_s / 2 + 7.0)  # worker + ceiling B
    spare = 30.0
    deadline = after_paced + REPORT_RESERVE_S + 3 * point + 7.0 + 5.0 + spare
    harness = _ClockedHarness(overhead_s=7.0, done_in_s=5.0)
    _, extra = _measure(harness, deadline=deadline)
    assert extra["rss_cap_trimmed_s"] == spare
    assert "sweep_skipped" not in extra


def test_ceiling_b_on_the_worker_client_runs_once_at_0_ms_and_is_no_target() -> None:
    """Ceiling B' (bare PUTs on the worker's own HTTP client) runs once, beside the others in the
    first repeat at 0 ms (every repeat cost the sweep's last point in a slow hour), and is shown as
    a comparison: the targets stay the issue's, against ceiling B (aiohttp)."""
    harness = _ClockedHarness(overhead_s=2.0)
    _measure(harness, deadline=10_000.0)
    own_client = [s for s in harness.specs if s.subject == "ceiling_b_rs"]
    assert [(s.scenario, s.concurrency) for s in own_client] == [("api0", 256)]
    first_repeat = harness.specs[: harness.specs.index(own_client[0]) + 1]
    assert {s.scenario for s in first_repeat} == {"api0"}

    runs = _repeat_at_0ms(800.0, 1_000.0, ceiling_b_rs=1_600.0) + _repeat_at_0ms(
        900.0, 1_000.0, ceiling_b_rs=1_200.0
    )
    summary = report.summarize(runs)
    t0 = report.evaluate_targets(summary, concurrency=256)[0]
    assert t0.measured.startswith("0.85x")  # against ceiling B alone: (0.80, 0.90)
    text = report.versus_own_client(summary, 256)
    assert text is not None
    assert "0.62x, the median of the per-repeat ratios (0.50, 0.75)" in text
    assert report.versus_own_client(report.summarize(_runs()), 256) is None  # not measured: no line
    failed = report.versus_own_client(
        report.summarize(_repeat_at_0ms(800.0, 1_000.0, ceiling_b_rs=None)), 256
    )
    assert failed is not None
    assert "there is no figure: it did not finish in this run" in failed
    assert "vs -" not in failed  # it read "the worker ran at 1,826 vs - ev/s = -x"
    doc = {
        "environment": {"date": "d", "git_commit": "c", "cpu_count": 2},
        "config": {"concurrency": 256, "events": 1, "tickets": 1, "repeats": 2},
        "summary": summary,
        "targets": [dataclasses.asdict(t) for t in report.evaluate_targets(summary, 256)],
    }
    assert text in report.readme_section(doc)


def test_readme_tallies_match_the_runs_recorded() -> None:
    """The README's "met in" column counts the rows of bench/runs.md, which are kept by hand: a
    run added there and not counted (or the reverse) fails here."""
    root = Path(__file__).resolve().parents[1]
    runs = (root / "bench" / "runs.md").read_text("utf-8").partition("## The runs")[2]
    rows = [line for line in runs.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    columns = {
        "| 0 ms API: >= 0.7": 2,
        "20 ms API: >= 0.8": 3,
        "FastStream": 4,
        "p99 added": 5,
        "peak RSS": 6,
    }
    met = {name: sum("✅" in row.strip("|").split("|")[col] for row in rows) for name, col in columns.items()}
    readme = (root / "README.md").read_text("utf-8")
    assert f"Over the {len(rows)} full runs since" in readme
    table = readme.partition("**Where it stands**")[2].partition("**Why")[0]
    for name, count in met.items():
        line = next(line for line in table.splitlines() if line.startswith("|") and name in line)
        assert re.search(rf"\| {count} of {len(rows)}\b", line), (name, count, line)
