"""From raw runs to the report: medians per group, the issue's targets as ratios, Markdown, chart.

Everything but ``write_chart`` is pure (dicts in, dicts or text out) and tested in
``tests/test_bench.py``. A run is the dict of ``RunResult.to_json()``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import median, ratio

Run = dict[str, Any]
Group = dict[str, Any]

LABELS = {
    "worker": "worker (coc-change-worker)",
    "ceiling_a": "ceiling A: bare consumer",
    "ceiling_b": "ceiling B: bare signed PUTs",
    "ceiling_b_rs": "ceiling B': the same on the worker's HTTP client (not a target's)",
    "faststream": "peer 1: FastStream",
    "pyrallel": "peer 2: pyrallel-consumer",
    "baseline": "baseline: sequential loop",
    "passthrough": "floor: pass-through (consume -> outcome)",
}
ORDER = list(LABELS)

#: The processes that share the machine with a subject, sampled over its window (``bench/procs.py``).
BYSTANDERS = ("simulator", "broker", "harness")

#: Thresholds of the issue's targets.
T0_MIN_RATIO = 0.7  # worker >= 0.7 x min(A, B) at 0 ms
T20_MIN_RATIO = 0.8  # worker >= 0.8 x min(max_in_flight / 20 ms, A, B) at 20 ms
T20_VS_PEER1 = 5.0  # worker >= 5 x peer 1 at 20 ms
P99_LIMIT_MS = 50.0  # paced at half the saturating rate, 0 ms API latency
RSS_LIMIT_MB = 250.0  # 100k-event backlog


def summarize(runs: Iterable[Run]) -> dict[str, Group]:
    """Medians over repeats per (scenario, subject, concurrency); key ``scenario/subject/concurrency``."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[group_key(run["scenario"], run["subject"], run["concurrency"])].append(run)
    out: dict[str, Group] = {}
    for key, members in groups.items():
        good = [r for r in members if r["ok"]]
        statuses: Counter[str] = Counter()
        for r in good:
            statuses.update(r["statuses"])
        first = members[0]
        out[key] = {
            "scenario": first["scenario"],
            "subject": first["subject"],
            "latency_ms": first["latency_ms"],
            "concurrency": first["concurrency"],
            "events": first["events"],
            "cap_s": first.get("cap_s"),
            "runs": len(members),
            "ok_runs": len(good),
            "throughput": median(r["throughput"] for r in good),
            "throughputs": [r["throughput"] for r in good],
            "p50_ms": median(r["p50_ms"] for r in good),
            "p99_ms": median(r["p99_ms"] for r in good),
            "p99s": [r["p99_ms"] for r in good],
            **{
                name: median(r["extra"].get(name) for r in good)
                for name in ("wait_p50_ms", "wait_p99_ms", "held_p50_ms", "held_p99_ms")
            },
            "cpu_s_per_1k": median(r["cpu_s_per_1k"] for r in good),
            **{
                f"{name}_cpu_s_per_1k": median(r["extra"].get(f"{name}_cpu_s_per_1k") for r in good)
                for name in BYSTANDERS
            },
            "peak_rss_mb": max((r["peak_rss_mb"] for r in good if r["peak_rss_mb"]), default=None),
            "count": median(r["count"] for r in good),
            "complete": all(r["extra"].get("complete", True) for r in good) if good else False,
            "statuses": dict(statuses),
            "errors": [r["error"] for r in members if r["error"]],
        }
    return out


def group_key(scenario: str, subject: str, concurrency: int) -> str:
    return f"{scenario}/{subject}/{concurrency}"


def find(
    summary: dict[str, Group], scenario: str, subject: str, concurrency: int | None = None
) -> Group | None:
    """The group of ``subject`` in ``scenario`` (any concurrency when None: the first one)."""
    for group in summary.values():
        if (
            group["scenario"] == scenario
            and group["subject"] == subject
            and (concurrency is None or group["concurrency"] == concurrency)
        ):
            return group
    return None


def _group(summary: dict[str, Group], scenario: str, subject: str, concurrency: int) -> Group | None:
    """A subject's group at the scenario's concurrency: only the worker and ceiling B run at
    ``max_in_flight``; the others have their own (one consumer, the partition count)."""
    at_max_in_flight = ("worker", "ceiling_b", "ceiling_b_rs")
    return find(summary, scenario, subject, concurrency if subject in at_max_in_flight else None)


def _tp(group: Group | None) -> float | None:
    return group["throughput"] if group else None


def _min(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    ratio: float | None  # measured / threshold, oriented so that >= 1 means met
    met: bool | None  # None: not measured

    @property
    def mark(self) -> str:
        return "n/a" if self.met is None else ("✅" if self.met else "❌")


def _at_least(name: str, measured: str, value: float | None, threshold: float) -> Target:
    return Target(name, measured, ratio(value, threshold), None if value is None else value >= threshold)


def _below(name: str, measured: str, value: float | None, limit: float) -> Target:
    if value is None:
        return Target(name, measured, None, None)
    return Target(name, measured, ratio(limit, value) if value > 0 else float("inf"), value < limit)


def _paired(
    worker: Group | None, others: Sequence[Group | None], cap: float | None = None
) -> list[float] | None:
    """The worker's throughput over the smallest of the others' (and ``cap``), repeat by repeat.
    A repeat runs the subjects one after another, so these ratios see less of the machine's drift
    than the ratio of the medians, which may pair a fast hour's run with a slow one's. None unless
    every run of every group succeeded and there are repeats to pair."""
    groups = [g for g in (worker, *others) if g is not None]
    if worker is None or len(groups) < 2 or len(worker["throughputs"]) < 2:
        return None
    if any(g["ok_runs"] != g["runs"] or len(g["throughputs"]) != len(worker["throughputs"]) for g in groups):
        return None
    ratios = [
        ratio(own, _min(cap, *(g["throughputs"][i] for g in groups[1:])))
        for i, own in enumerate(worker["throughputs"])
    ]
    return None if any(r is None for r in ratios) else [r for r in ratios if r is not None]


def _ratio_target(
    name: str,
    worker: Group | None,
    others: Sequence[Group | None],
    threshold: float,
    cap: float | None = None,
) -> Target:
    """Judged on the median of the per-repeat ratios when the repeats pair up, else on the ratio of
    the medians; both are shown."""
    own = _tp(worker)
    floor = _min(cap, *(_tp(g) for g in others))
    on_medians = ratio(own, floor)
    versus = (
        f"{_fmt(own)} ev/s vs min {_fmt(floor)} ev/s"
        if len(others) > 1 or cap
        else f"{_fmt(own)} vs {_fmt(floor)} ev/s"
    )
    paired = _paired(worker, others, cap)
    if paired is None:
        return _at_least(name, f"{versus} = {_fmt(on_medians, 2)}x", on_medians, threshold)
    judged = median(paired)
    measured = (
        f"{_fmt(judged, 2)}x, the median of the per-repeat ratios ({', '.join(_fmt(r, 2) for r in paired)}); "
        f"on the medians {versus} = {_fmt(on_medians, 2)}x"
    )
    return _at_least(name, measured, judged, threshold)


def evaluate_targets(
    summary: dict[str, Group], concurrency: int, api_latency_ms: float = 20.0, rss_events: int = 100_000
) -> list[Target]:
    """The four targets of the issue, each as a ratio from the same run."""
    targets: list[Target] = []

    worker0, a0, b0 = (_group(summary, "api0", s, concurrency) for s in ("worker", "ceiling_a", "ceiling_b"))
    targets.append(
        _ratio_target(
            f"0 ms API: worker >= {T0_MIN_RATIO} x min(ceiling A, ceiling B)", worker0, [a0, b0], T0_MIN_RATIO
        )
    )
    worker20, a20, b20, peer1_group = (
        _group(summary, "api20", s, concurrency) for s in ("worker", "ceiling_a", "ceiling_b", "faststream")
    )
    theory = concurrency / (api_latency_ms / 1000)
    targets.append(
        _ratio_target(
            f"20 ms API: worker >= {T20_MIN_RATIO} x min(max_in_flight / 20 ms, A, B)",
            worker20,
            [a20, b20],
            T20_MIN_RATIO,
            cap=theory,
        )
    )
    targets.append(
        _ratio_target(
            f"20 ms API: worker >= {T20_VS_PEER1:g} x peer 1 (FastStream)",
            worker20,
            [peer1_group],
            T20_VS_PEER1,
        )
    )

    paced = find(summary, "paced", "worker")
    p99 = paced["p99_ms"] if paced else None
    added, measured = added_latency(summary)
    targets.append(
        _below(
            f"p99 added latency at half the saturating rate (0 ms API) < {P99_LIMIT_MS:g} ms",
            measured,
            added if added is not None else p99,
            P99_LIMIT_MS,
        )
    )

    rss = find(summary, "rss", "worker")
    peak = rss["peak_rss_mb"] if rss else None
    note = ""
    if rss and not rss["complete"]:
        window = f"its {rss['cap_s']:g} s window" if rss.get("cap_s") else "the time cap"
        note = f" (only {_fmt(rss['count'])} of {_fmt(rss['events'])} events done within {window})"
    targets.append(
        _below(
            f"peak RSS with a {_fmt(rss['events'] if rss else rss_events)}-event backlog < {RSS_LIMIT_MB:g} MB",
            f"{_fmt(peak, 1)} MB{note}",
            peak,
            RSS_LIMIT_MB,
        )
    )
    return targets


def versus_own_client(summary: dict[str, Group], concurrency: int) -> str | None:
    """The 0 ms ratio against ceiling B' (bare signed PUTs on the worker's own HTTP client), which
    no target names: the issue's ceiling B is aiohttp, whose calls cost more CPU than the worker's
    client's, so this says how much of the 0 ms ratio that difference is worth."""
    worker, own_client = (_group(summary, "api0", s, concurrency) for s in ("worker", "ceiling_b_rs"))
    if worker is None or own_client is None:
        return None
    said = (
        "Not a target: at 0 ms against ceiling B' (the same bare signed PUTs on the worker's own "
        "HTTP client, pyreqwest, instead of aiohttp)"
    )
    if own_client["throughput"] is None:  # every run of it failed: why is in the notes
        return f"{said} there is no figure: it did not finish in this run (see the report's notes)."
    target = _ratio_target("", worker, [own_client], T0_MIN_RATIO)
    return f"{said} the worker ran at {target.measured}."


def added_latency(summary: dict[str, Group]) -> tuple[float | None, str]:
    """The worker's p99 in the paced runs minus the pass-through's (the floor: the same broker,
    load generator, rate and runs, with no work between consume and outcome), and how it reads.

    Judged on the median of the per-pair differences when the runs pair up (each worker run with
    the floor run right before or after it), else on the difference of the medians; both are shown.
    Without a floor (an older report) the end-to-end p99 is all there is, and the text says so."""
    paced = find(summary, "paced", "worker")
    if paced is None or paced["p99_ms"] is None:
        return None, "-"
    floor = find(summary, "paced", "passthrough")
    ends = f"end to end p99 {_fmt(paced['p99_ms'], 1)} ms (p50 {_fmt(paced['p50_ms'], 1)} ms)"
    if floor is None or floor["p99_ms"] is None:
        failed = f" ({len(floor['errors'])} floor run(s) failed)" if floor and floor["errors"] else ""
        return None, ends + f", no floor measured{failed}: judged end to end"
    # A floor above the worker is a fluke of the machine, not a worker that removes latency.
    on_medians = max(0.0, paced["p99_ms"] - floor["p99_ms"])
    medians = (
        f"worker p99 {_fmt(paced['p99_ms'], 1)} ms - floor p99 {_fmt(floor['p99_ms'], 1)} ms "
        "(pass-through, same rate, alternating runs)"
    )
    held = f"held by the worker p99 {_fmt(paced['held_p99_ms'], 1)} ms"
    pairs = _pairs(paced, floor)
    if pairs is None:
        return on_medians, f"{_fmt(on_medians, 1)} ms = {medians}; {held}"
    added = median(pairs)
    assert added is not None
    return added, (
        f"{_fmt(added, 1)} ms, the median of the per-pair differences ({', '.join(_fmt(p, 1) for p in pairs)}); "
        f"on the medians {_fmt(on_medians, 1)} ms = {medians}; {held}"
    )


def _pairs(worker: Group, floor: Group) -> list[float] | None:
    """Each repeat's worker p99 minus its own floor run's, which ran right before or after it. None
    unless every run of both succeeded and they pair up."""
    runs = (worker["runs"], worker["ok_runs"], floor["runs"], floor["ok_runs"])
    if len(set(runs)) != 1 or runs[0] < 2:
        return None
    return [max(0.0, own - base) for own, base in zip(worker["p99s"], floor["p99s"], strict=True)]


def _failed(group: Group) -> str:
    errors = group["errors"]
    return f" ({len(errors)} more failed: {'; '.join(errors)})" if errors else ""


def _floor_sentence(summary: dict[str, Group]) -> str:
    floor = find(summary, "paced", "passthrough")
    added, _ = added_latency(summary)
    if floor is None or added is None:
        why = f" (every floor run failed: {'; '.join(floor['errors'])})" if floor and floor["errors"] else ""
        return f"No floor was measured{why}, so the target is judged on the end-to-end figure."
    return (
        f"The floor, a pass-through that writes each record's outcome as it reads it with the "
        f"worker's Kafka settings (`bench/peers/passthrough.py`), ran at the same rate in "
        f"{floor['ok_runs']} run(s){_failed(floor)} alternating with the worker's: "
        f"p50 {_fmt(floor['p50_ms'], 1)} ms, "
        f"p99 {_fmt(floor['p99_ms'], 1)} ms (per run: {', '.join(_fmt(v, 1) for v in floor['p99s'])} "
        f"ms). The latency the worker adds, the target's figure, is the worker's p99 minus the floor's: "
        f"{_fmt(added, 1)} ms (the median of the per-pair differences when the runs pair up, else "
        f"the difference of the medians)."
    )


def _paragraph(text: str | None) -> list[str]:
    return [text, ""] if text else []


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def scenario_table(summary: dict[str, Group], scenario: str, concurrency: int) -> str:
    """One row per subject: throughput and its ratios to the ceilings and to peer 1."""
    floor = _min(*(_tp(_group(summary, scenario, s, concurrency)) for s in ("ceiling_a", "ceiling_b")))
    peer1 = _tp(_group(summary, scenario, "faststream", concurrency))
    rows = []
    for subject in ORDER:
        group = _group(summary, scenario, subject, concurrency)
        if group is None:
            continue
        tp = group["throughput"]
        statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(group["statuses"].items())) or "-"
        if group["errors"] and group["ok_runs"] < group["runs"]:
            statuses += f" ({group['runs'] - group['ok_runs']} run(s) failed)"
        rows.append(
            [
                LABELS[subject],
                str(group["concurrency"]),
                _fmt(tp),
                _fmt(ratio(tp, floor), 2),
                _fmt(ratio(tp, peer1), 2),
                _fmt(group["p50_ms"]),
                _fmt(group["p99_ms"]),
                _fmt(group["cpu_s_per_1k"], 2),
                _fmt(group["peak_rss_mb"]),
                statuses,
            ]
        )
    header = [
        "subject",
        "concurrency",
        "events/s",
        "x min(A,B)",
        "x peer 1",
        "p50 ms",
        "p99 ms",
        "CPU s / 1k ev",
        "peak RSS MB",
        "outcomes (all repeats)",
    ]
    return _table(header, rows)


def cpu_budget_table(summary: dict[str, Group], scenario: str, concurrency: int) -> str:
    """Per subject: CPU per 1,000 events of the subject and of every other process on the machine,
    over the subject's window, and how many cores that keeps busy at its throughput.

    On a machine whose cores are all busy, a subject's throughput is the cores divided by the
    whole column, so the ratios between subjects follow from it.
    """
    rows = []
    for subject in ORDER:
        group = _group(summary, scenario, subject, concurrency)
        if group is None or group["cpu_s_per_1k"] is None:
            continue
        others = [group.get(f"{name}_cpu_s_per_1k") for name in BYSTANDERS]
        if all(other is None for other in others):
            continue  # a report from before the other processes were sampled
        parts = [group["cpu_s_per_1k"], *others]
        total = sum(part for part in parts if part is not None)
        cores = ratio(group["throughput"] * total, 1000) if group["throughput"] else None
        shares = [_fmt(part, 3) for part in parts]
        rows.append([LABELS[subject], _fmt(group["throughput"]), *shares, _fmt(total, 3), _fmt(cores, 2)])
    header = ["subject", "events/s", "its process", *BYSTANDERS, "all", "cores busy"]
    return _table(header, rows)


def sweep_points(
    summary: dict[str, Group], latency_scenarios: Sequence[str] = ("sweep", "api20")
) -> list[dict[str, Any]]:
    """Worker and ceiling B throughput per max_in_flight at 20 ms (sweep runs plus the main run)."""
    points: dict[int, dict[str, Any]] = {}
    for group in summary.values():
        if group["scenario"] not in latency_scenarios or group["subject"] not in ("worker", "ceiling_b"):
            continue
        point = points.setdefault(group["concurrency"], {"max_in_flight": group["concurrency"]})
        point.setdefault(group["subject"], group["throughput"])
    return [points[c] for c in sorted(points)]


def sweep_table(points: list[dict[str, Any]], ceiling_a: float | None, api_latency_ms: float = 20.0) -> str:
    rows = []
    for point in points:
        theory = point["max_in_flight"] / (api_latency_ms / 1000)
        floor = _min(theory, ceiling_a, point.get("ceiling_b"))
        rows.append(
            [
                str(point["max_in_flight"]),
                _fmt(point.get("worker")),
                _fmt(theory),
                _fmt(point.get("ceiling_b")),
                _fmt(ratio(point.get("worker"), floor), 2),
            ]
        )
    header = [
        "max_in_flight",
        "worker events/s",
        "max_in_flight / 20 ms",
        "ceiling B events/s",
        "x min(theory, A, B)",
    ]
    return _table(header, rows)


def markdown(report: dict[str, Any]) -> str:
    """The whole Markdown report from the JSON report's content."""
    summary: dict[str, Group] = report["summary"]
    env = report["environment"]
    config = report["config"]
    concurrency = config["concurrency"]
    targets = [Target(**t) for t in report["targets"]]
    out = [
        "# coc-change-worker benchmark",
        "",
        f"{env['date']} · commit `{env['git_commit']}`{' (dirty)' if env.get('git_dirty') else ''} · "
        f"{env['cpu_count']} CPUs · load average {env['loadavg_start']} → {env['loadavg_end']} · "
        f"Python {env['python']} · {config['mode']} run: {config['events']:,} events over "
        f"{config['tickets']:,} tickets, {config['repeats']} repeat(s), medians shown · "
        f"took {report['elapsed_s']:.0f} s"
        f"{' from the start of `make bench`' if config.get('budget_from') == 'make' else ''}",
        "",
        "## Targets (issue 5), as ratios from this run",
        "",
        _table(
            ["target", "measured", "ratio to threshold", "met"],
            [[t.name, t.measured, _fmt(t.ratio, 2), t.mark] for t in targets],
        ),
        "",
        *_paragraph(versus_own_client(summary, concurrency)),
        f"## 0 ms API latency (backlog, worker max_in_flight {concurrency})",
        "",
        scenario_table(summary, "api0", concurrency),
        "",
        f"## 20 ms API latency (backlog, worker max_in_flight {concurrency})",
        "",
        scenario_table(summary, "api20", concurrency),
        "",
        "## Where the machine's CPU goes, per 1,000 events (CPU s; that is, ms per event)",
        "",
        "Every process on the machine, over each subject's own window: the subject, the API simulator,",
        "the broker, and this harness (its outcome reader). The two cores are shared by all of them, so",
        "a subject's throughput is about the cores it keeps busy divided by the `all` column.",
        "",
        "0 ms API latency:",
        "",
        cpu_budget_table(summary, "api0", concurrency),
        "",
        "20 ms API latency:",
        "",
        cpu_budget_table(summary, "api20", concurrency),
        "",
        "## max_in_flight sweep at 20 ms API latency",
        "",
        sweep_table(sweep_points(summary), _tp(find(summary, "api20", "ceiling_a"))),
        "",
    ]
    paced = find(summary, "paced", "worker")
    if paced:
        why = (
            "set with --paced-rate"
            if config.get("paced_rate_given")
            else "half the worker's median 0 ms throughput"
        )
        out += [
            "## Paced at half the saturating rate (0 ms API latency)",
            "",
            f"{_fmt(config.get('paced_rate'))} events/s offered ({why}) for {config['paced_s']:g} s, "
            f"{paced['runs']} run(s), medians: p50 {_fmt(paced['p50_ms'], 1)} ms, "
            f"p99 {_fmt(paced['p99_ms'], 1)} ms from the input record's timestamp to the outcome "
            f"record's (p99 per run: {', '.join(_fmt(v, 1) for v in paced['p99s'])} ms). Split at the "
            f"worker's `received_at`: waiting to be fetched p50/p99 {_fmt(paced['wait_p50_ms'], 1)}/"
            f"{_fmt(paced['wait_p99_ms'], 1)} ms, held by the worker p50/p99 "
            f"{_fmt(paced['held_p50_ms'], 1)}/{_fmt(paced['held_p99_ms'], 1)} ms. "
            f"CPU {_fmt(paced['cpu_s_per_1k'], 2)} s / 1k events. These figures are end to end: "
            "they include the load generator's produce queueing, the broker and its fetch wait. "
            + _floor_sentence(summary)
            + " Both slow down within a run: the broker's in-memory store takes longer for every "
            "batch it holds (bench/README.md).",
            "",
            "Every process's CPU per 1,000 events during the paced runs (the load generator is the harness):",
            "",
            cpu_budget_table(summary, "paced", concurrency),
            "",
        ]
    out += ["## Notes", ""]
    out += [f"- {note}" for note in report.get("notes", [])]
    out += [
        "- Latency columns of the backlog scenarios are queueing time (the whole backlog is written "
        "before the subject starts) and depend on how long each subject's window is: they do not "
        "compare between subjects. The paced scenario measures latency under load.",
        "- Throughput windows: each subject is measured from its first consume (the earliest "
        "`received_at`; ceiling B: its first request) to its last outcome written, until it has "
        "finished the backlog or its cap (counted from its first outcome) strikes: the worker 14 s, ceiling B 8 s, "
        "the peers 4 s (`caps_s` in latest.json; a capped run counts every outcome finished by the last "
        "one read when the cap struck). The windows differ in length: warm-up weighs more in the "
        "peers' short windows, the broker's slowdown within a run more in the worker's long one.",
        "- The sweep's 256 point is the 20 ms scenario's median; the other points are single runs.",
        "- The outcomes column adds up every repeat and peak RSS is the highest of the repeats; the "
        "other columns are medians.",
        "",
        "![throughput vs max_in_flight](latest.png)",
        "",
    ]
    return "\n".join(out)


README_START = "<!-- bench:start: written by make bench from bench/results/latest.json -->"
README_END = "<!-- bench:end -->"


def readme_section(report: dict[str, Any]) -> str:
    """The README's performance block: the targets and both backlog tables of the latest full run.

    Generated, so the README can never show figures other than the committed ``latest.json``'s.
    """
    env = report["environment"]
    config = report["config"]
    concurrency = config["concurrency"]
    targets = [Target(**t) for t in report["targets"]]
    return "\n".join(
        [
            README_START,
            f"Last full run: {env['date']}, commit `{env['git_commit']}`, {env['cpu_count']} CPUs, "
            f"{config['events']:,} events over {config['tickets']:,} tickets, medians of "
            f"{config['repeats']} repeat(s). Full report: [bench/results/latest.md](bench/results/latest.md).",
            "",
            _table(
                ["target (issue 5)", "measured", "met"],
                [[t.name, t.measured, t.mark] for t in targets],
            ),
            "",
            *_paragraph(versus_own_client(report["summary"], concurrency)),
            *_paragraph(" ".join(n for n in report.get("notes", []) if _shapes_the_run(n))),
            f"0 ms API latency, worker max_in_flight {concurrency}:",
            "",
            scenario_table(report["summary"], "api0", concurrency),
            "",
            f"20 ms API latency, worker max_in_flight {concurrency}:",
            "",
            scenario_table(report["summary"], "api20", concurrency),
            "",
            "Where the machine's CPU goes at 0 ms, per 1,000 events (CPU s), every process over each"
            " subject's window; the two cores are shared by all of them:",
            "",
            cpu_budget_table(report["summary"], "api0", concurrency),
            "",
            "![throughput vs max_in_flight at 20 ms API latency](bench/results/latest.png)",
            README_END,
        ]
    )


#: How ``bench/run.py`` begins a note on what its time budget cut, and marks one on which subjects
#: ran in the first repeat only: the notes the README's block repeats.
BUDGET_NOTE = "Time budget"
FIRST_REPEAT_ONLY_NOTE = "in the first repeat only"


def _shapes_the_run(note: str) -> bool:
    return note.startswith(BUDGET_NOTE) or FIRST_REPEAT_ONLY_NOTE in note


def splice_readme(readme: str, section: str) -> str:
    """``readme`` with the text between the markers replaced by ``section``."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError("README.md has no bench:start/bench:end markers")
    return readme[:start] + section + readme[end + len(README_END) :]


def write_chart(summary: dict[str, Group], path: Path, api_latency_ms: float = 20.0) -> None:
    """Throughput vs max_in_flight at 20 ms, with the max_in_flight / 20 ms line and the ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep_points(summary)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    if points:
        xs = [p["max_in_flight"] for p in points]
        lo, hi = min(xs), max(xs)
        theory_x = [lo, hi]
        ax.plot(
            theory_x,
            [x / (api_latency_ms / 1000) for x in theory_x],
            "k--",
            lw=1,
            label="max_in_flight / 20 ms",
        )
        worker = [(p["max_in_flight"], p["worker"]) for p in points if p.get("worker")]
        if worker:
            ax.plot(*zip(*worker, strict=True), "o-", color="tab:blue", lw=2, label="worker")
        ceiling_b = [(p["max_in_flight"], p["ceiling_b"]) for p in points if p.get("ceiling_b")]
        if ceiling_b:
            ax.plot(
                *zip(*ceiling_b, strict=True), "s:", color="tab:orange", label="ceiling B: bare signed PUTs"
            )
        ceiling_a = _tp(find(summary, "api20", "ceiling_a"))
        if ceiling_a:
            ax.axhline(
                ceiling_a, color="tab:green", ls="-.", label=f"ceiling A: bare consumer ({ceiling_a:,.0f}/s)"
            )
        for subject, color in (
            ("faststream", "tab:red"),
            ("pyrallel", "tab:purple"),
            ("baseline", "tab:gray"),
        ):
            value = _tp(find(summary, "api20", subject))
            if value:
                ax.axhline(value, color=color, ls=":", lw=1, label=f"{LABELS[subject]} ({value:,.0f}/s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        tops = [v for p in points for v in (p.get("worker"), p.get("ceiling_b")) if v]
        if ceiling_a:
            tops.append(ceiling_a)
        ax.set_ylim(bottom=10, top=max([*tops, hi / (api_latency_ms / 1000)]) * 2)
    ax.set_xlabel("max_in_flight (concurrency)")
    ax.set_ylabel("events per second (log)")
    ax.set_title("Throughput at 20 ms API latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
