"""``make bench``: measure the worker against its ceilings, two peers and a naive baseline, in one run.

Writes ``bench/results/latest.json`` (every run's raw numbers and the environment),
``latest.md`` (tables; the issue's targets as ratios) and ``latest.png`` (throughput vs
max_in_flight at 20 ms), then prints the Markdown. See ``bench/README.md``.

    python bench/run.py                     # full run, < 10 minutes on 2 cores
    python bench/run.py --quick             # smoke run (a 240 s budget)
    python bench/run.py --subjects worker,ceiling_a,ceiling_b --repeats 1 \\
        --worker-env COC_WORKER_KAFKA_FETCH_MAX_WAIT_MS=20   # quick re-measure while tuning
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.envs import pyrallel_python  # noqa: E402
from bench.scenarios import PARTITIONS, Harness, RunResult, RunSpec  # noqa: E402
from bench.stats import median  # noqa: E402
from worker.sandbox import tansu_binary  # noqa: E402

SUBJECTS = ("ceiling_a", "ceiling_b", "ceiling_b_rs", "worker", "faststream", "pyrallel", "baseline")
#: Measured once, at 0 ms API latency, in the first repeat: not a target's, a comparison
#: (``bench/peers/ceiling_http.py``). Once: a run in every repeat cost ~28 s of the budget, which
#: the sweep's last point paid for in a slow hour.
ONCE_AT_0_MS = frozenset({"ceiling_b_rs"})
#: No target depends on them: measured in the first repeat only, at each latency. Every repeat of
#: both cost ~70 s in the slowest hour (2026-11-30 23:40), which the sweep then had to give up.
FIRST_REPEAT_ONLY = frozenset({"pyrallel", "baseline"})


@dataclass(slots=True)
class Plan:
    """Sizes and time caps; ``--quick`` shrinks all of them."""

    mode: str
    events: int
    tickets: int
    repeats: int
    concurrency: int
    sweep: list[int]
    rss_events: int
    worker_cap_s: float
    peer_cap_s: float
    ceiling_cap_s: float
    sweep_cap_s: float
    paced_s: float
    rss_cap_s: float
    subjects: list[str] = field(default_factory=lambda: list(SUBJECTS))
    latencies: list[float] = field(default_factory=lambda: [0.0, 20.0])
    paced_rate: float = 0.0  # 0: half the worker's 0 ms median
    #: Wall seconds from the start of ``make bench`` (``--started-at``: the install of ``.venv``,
    #: ~50 s on a fresh machine, and the side environment included; else from the start of
    #: ``bench/run.py``) within which the whole run ends: repeats after the first, the sweep and the
    #: peak-RSS window give way (``measure``). Under 10 minutes, with room for the report.
    budget_s: float = 570.0  # 0: none


def build_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan("quick", 5_000, 200, 1, 256, [16, 256], 5_000, 3, 2, 2, 3, 4, 4, budget_s=240.0)
    else:
        # The worker and ceiling B get longer windows than the peers (in a fast hour they held the
        # whole backlog; on the slower machine of 2026-11-29 every worker run was capped, 27-35k
        # of 50k done), the peers 4 s: the windows differ in length (see bench/README.md).
        # (~7.5 minutes in a fast hour; in the slowest one seen, 19:22 on 2026-11-29, 595 s, when the
        # budget below did not exist yet.)
        plan = Plan("full", 50_000, 1_000, 3, 256, [16, 64, 256, 1024], 100_000, 14, 4, 8, 6, 10, 45)
    if args.events:
        plan.events = args.events
    if args.tickets:
        plan.tickets = args.tickets
    if args.repeats:
        plan.repeats = args.repeats
    if args.concurrency:
        plan.concurrency = args.concurrency
    if args.sweep is not None:
        plan.sweep = [int(c) for c in args.sweep.split(",") if c]
    if args.rss_events is not None:
        plan.rss_events = args.rss_events
    if args.paced_rate:
        plan.paced_rate = args.paced_rate
    if args.budget_s is not None:
        plan.budget_s = args.budget_s
    if args.latencies is not None:
        plan.latencies = [float(ms) for ms in args.latencies.split(",") if ms]
    if args.subjects:
        unknown = set(args.subjects.split(",")) - set(SUBJECTS)
        if unknown:
            raise SystemExit(f"unknown subjects: {', '.join(sorted(unknown))}; known: {', '.join(SUBJECTS)}")
        plan.subjects = [s for s in SUBJECTS if s in args.subjects.split(",")]
    return plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run with small sizes, within a 240 s budget"
    )
    parser.add_argument("--events", type=int, help="backlog size (default 50,000; quick 5,000)")
    parser.add_argument("--tickets", type=int, help="tickets the events are spread over (default 1,000)")
    parser.add_argument("--repeats", type=int, help="repeats of the 0 ms and 20 ms scenarios (default 3)")
    parser.add_argument("--concurrency", type=int, help="worker max_in_flight of the main scenarios (256)")
    parser.add_argument("--sweep", help="max_in_flight values at 20 ms, comma-separated ('' = none)")
    parser.add_argument("--rss-events", type=int, help="backlog of the peak-RSS run (100,000; 0 = skip)")
    parser.add_argument("--subjects", help="comma-separated subset of: " + ", ".join(SUBJECTS))
    parser.add_argument(
        "--budget-s",
        type=float,
        help="seconds the run keeps to by trimming the peak-RSS window and skipping sweep points "
        "(default 570; quick 240; 0 = no budget, for long A/B runs), counted from --started-at",
    )
    parser.add_argument(
        "--started-at",
        type=float,
        help="the Unix time the budget counts from (make bench passes its own start, so that the "
        "install before this script counts too; default: now)",
    )
    parser.add_argument(
        "--latencies", help="API latencies in ms of the main scenarios (default 0,20; '' = none)"
    )
    parser.add_argument("--no-paced", action="store_true", help="skip the paced latency scenario")
    parser.add_argument(
        "--paced-rate",
        type=float,
        help="offer this many events/s in the paced scenario instead of half the worker's 0 ms median "
        "(for A/B runs at one rate; the 0 ms worker runs are then optional)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="COC_WORKER_X=VALUE",
        help="extra worker setting for every worker run (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where latest.* go")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every run)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only the worker at 0 and 20 ms, once, under pyinstrument: writes profile-*.txt to --out "
        "(latest.* are left alone: profiled numbers are not comparable)",
    )
    return parser.parse_args(argv)


def _worker_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("COC_WORKER_"):
            raise SystemExit(f"--worker-env wants COC_WORKER_NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


# --- the run ------------------------------------------------------------------------------------------
#: The peak-RSS window is never trimmed below this: the peak comes while the buffer and the
#: prefetch fill up, in the first seconds (the 14 s windows of the 0 ms runs peak within ~5% of it).
RSS_MIN_CAP_S = 15.0
#: Kept for writing the report and the chart after the last run.
REPORT_RESERVE_S = 15.0
#: A run's time beyond its window (start-up, backlog, drain) before any was measured.
_OVERHEAD_GUESS_S = 8.0
#: The peak-RSS run's set-up beyond a main run's: twice the backlog, generated for the first time.
_RSS_EXTRA_OVERHEAD_S = 5.0


async def measure(
    plan: Plan,
    harness: Harness,
    log: Any,
    deadline: float = float("inf"),
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[RunResult], dict[str, Any]]:
    """Every run of the plan. The first repeat of the 0 and 20 ms scenarios, the paced scenario
    and the peak-RSS run always run; by ``deadline`` (on ``clock``) a later repeat that would leave
    no time for the paced runs and the shortest peak-RSS run is not started, the peak-RSS window is
    trimmed, to no less than ``RSS_MIN_CAP_S`` (the peak comes in the first seconds), to leave room
    for the sweep the chart draws, and sweep points that still do not fit are skipped. ``extra``
    says what gave way.
    """
    results: list[RunResult] = []
    extra: dict[str, Any] = {}

    async def run(spec: RunSpec) -> RunResult:
        result = await harness.run(spec)
        results.append(result)
        log(_line(result))
        return result

    def overhead(subject: str) -> float:
        """What a run of ``subject`` took beyond its window so far in this benchmark (a run that
        finished its backlog inside the cap used only part of it)."""
        spent = [
            r.wall_s - min(r.spec.cap_s, r.extra.get("window_s") or r.extra.get("elapsed_s") or r.spec.cap_s)
            for r in results
            if r.spec.subject == subject and r.ok and r.spec.scenario.startswith("api")
        ]
        return max(0.0, median(spent) or 0.0) if spent else _OVERHEAD_GUESS_S

    def after_repeats_s() -> float:
        """What must still fit once the repeats are done: the paced runs and the shortest
        peak-RSS run (the sweep gives way on its own)."""
        paced = 2 * plan.repeats * (plan.paced_s + overhead("worker")) if plan.paced_s > 0 else 0.0
        rss = RSS_MIN_CAP_S + overhead("worker") + _RSS_EXTRA_OVERHEAD_S if plan.rss_events > 0 else 0.0
        return paced + rss + REPORT_RESERVE_S

    main_subjects = list(plan.subjects)
    recurring_s = 0.0  # the last repeat's runs that every repeat has: what the next one will take
    for repeat in range(plan.repeats):
        if repeat and clock() + recurring_s + after_repeats_s() > deadline:
            extra["repeats_done"] = repeat
            break
        recurring_s = 0.0
        for latency in plan.latencies:
            scenario = f"api{latency:g}"
            # rotate the order every repeat so slow drifts of the machine's load hit every subject,
            # and reverse it every other one, so no subject always runs right after another
            shift = repeat % len(main_subjects) if main_subjects else 0
            order = main_subjects[shift:] + main_subjects[:shift]
            for subject in order[::-1] if repeat % 2 else order:
                if subject in ONCE_AT_0_MS and (latency or repeat):
                    continue
                if subject in FIRST_REPEAT_ONLY and repeat:
                    continue
                began = clock()
                await run(_spec(plan, scenario, subject, latency))
                if subject not in ONCE_AT_0_MS | FIRST_REPEAT_ONLY:
                    recurring_s += clock() - began
    if "worker" in plan.subjects and plan.paced_s > 0:
        saturating = median(
            r.throughput for r in results if r.spec.scenario == "api0" and r.spec.subject == "worker"
        )
        rate = plan.paced_rate or (saturating / 2 if saturating else 0.0)
        if rate:
            count = max(200, int(rate * plan.paced_s))
            extra["paced_rate"] = rate
            extra["paced_rate_given"] = bool(plan.paced_rate)
            # the p99 of one short run is at the mercy of one hiccup: repeats, each with the floor
            # (the pass-through) beside the worker, in alternating order
            for repeat in range(extra.get("repeats_done", plan.repeats)):
                pair = ("worker", "passthrough") if repeat % 2 == 0 else ("passthrough", "worker")
                for subject in pair:
                    await run(
                        RunSpec(
                            "paced", subject, 0.0, plan.concurrency, count, plan.paced_s + 20, paced_rate=rate
                        )
                    )
    sweep_subjects = [s for s in ("ceiling_b", "worker") if s in plan.subjects]
    main_20ms = 20.0 in plan.latencies  # its runs are the sweep's point at the main concurrency
    sweep = [c for c in plan.sweep if sweep_subjects and not (main_20ms and c == plan.concurrency)]

    def sweep_cap(subject: str) -> float:
        return plan.sweep_cap_s / 2 if subject == "ceiling_b" else plan.sweep_cap_s

    def point_s() -> float:
        return sum(sweep_cap(s) + overhead(s) for s in sweep_subjects)

    if "worker" in plan.subjects and plan.rss_events > 0:
        room = deadline - clock() - REPORT_RESERVE_S - point_s() * len(sweep)
        room -= overhead("worker") + _RSS_EXTRA_OVERHEAD_S
        cap = min(plan.rss_cap_s, max(RSS_MIN_CAP_S, room))  # no budget: room is infinite
        if cap < plan.rss_cap_s:
            cap = float(int(cap))  # whole seconds
            extra["rss_cap_trimmed_s"] = cap
        await run(RunSpec("rss", "worker", 0.0, plan.concurrency, plan.rss_events, cap))
    skipped = []
    for concurrency in sweep:
        if deadline - clock() - REPORT_RESERVE_S < point_s():
            skipped.append(concurrency)
            continue
        for subject in sweep_subjects:
            await run(RunSpec("sweep", subject, 20.0, concurrency, plan.events, sweep_cap(subject)))
    if skipped:
        extra["sweep_skipped"] = skipped
    return results, extra


def _spec(plan: Plan, scenario: str, subject: str, latency: float) -> RunSpec:
    if subject == "worker":
        return RunSpec(scenario, subject, latency, plan.concurrency, plan.events, plan.worker_cap_s)
    if subject == "ceiling_a":
        return RunSpec(scenario, subject, latency, 1, plan.events, 60.0)
    if subject in ("ceiling_b", "ceiling_b_rs"):
        return RunSpec(scenario, subject, latency, plan.concurrency, plan.events, plan.ceiling_cap_s)
    if subject == "faststream":
        # at-least-once FastStream runs one message at a time per partition: one worker per partition
        return RunSpec(scenario, subject, latency, PARTITIONS, plan.events, plan.peer_cap_s)
    if subject == "pyrallel":
        return RunSpec(scenario, subject, latency, plan.concurrency, plan.events, plan.peer_cap_s)
    return RunSpec(scenario, subject, latency, 1, plan.events, plan.peer_cap_s)


def _line(r: RunResult) -> str:
    s = r.spec
    tp = f"{r.throughput:,.0f} ev/s" if r.throughput else "-"
    cpu = f"{r.cpu_s_per_1k:.2f} CPU s/1k" if r.cpu_s_per_1k is not None else ""
    rss = f"{r.peak_rss_mb:.0f} MB" if r.peak_rss_mb else ""
    state = "ok" if r.ok else f"FAILED: {r.error}"
    return (
        f"  {s.scenario:>6} {s.subject:<12} c={s.concurrency:<5} {tp:>14} n={r.count:<6} "
        f"{cpu:>16} {rss:>7} {r.wall_s:5.1f}s {state}"
    )


# --- environment --------------------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _pyrallel_version(python: str | None) -> str | None:
    if python is None:
        return None
    try:
        out = subprocess.run(
            [
                python,
                "-c",
                "from importlib.metadata import version as v; print(v('pyrallel-consumer'), v('confluent-kafka'))",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return f"{out[0]} (confluent-kafka {out[1]})"
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(pyrallel: str | None) -> dict[str, Any]:
    try:
        tansu = subprocess.run(
            [tansu_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        tansu = "unknown"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "worker", "schemas")),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
        "tansu": tansu,
        "versions": {
            name: _version(name)
            for name in (
                "aiokafka",
                "aiohttp",
                "pydantic",
                "faststream",
                "psutil",
                "matplotlib",
                "uvloop",
                "orjson",
            )
        }
        | {"pyrallel-consumer": _pyrallel_version(pyrallel)},
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# --- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    if args.no_paced:
        plan.paced_s = 0
    if args.profile:
        plan.subjects, plan.repeats, plan.sweep, plan.paced_s, plan.rss_events = ["worker"], 1, [], 0, 0
    worker_env = _worker_env(args.worker_env)
    started = _start_of(args.started_at)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="coc-bench-"))

    def log(line: str) -> None:
        print(line, flush=True)

    notes: list[str] = []
    pyrallel: str | None = None
    if "pyrallel" in plan.subjects:
        log("peer 2: preparing pyrallel-consumer ...")
        pyrallel, how = pyrallel_python(workdir / "pyrallel-install.log")
        log(f"peer 2: {how}")
        if pyrallel is None:
            plan.subjects.remove("pyrallel")
            notes.append(f"Peer 2 (pyrallel-consumer) was not measured: {how}.")
        else:
            notes.append(f"Peer 2 (pyrallel-consumer) ran from the {how}.")
    env = environment(pyrallel)
    log(
        f"plan: {plan.mode}, {plan.events:,} events over {plan.tickets:,} tickets, {plan.repeats} repeat(s), "
        f"subjects {', '.join(plan.subjects)}; work directory {workdir}"
    )
    harness = Harness(
        workdir,
        plan.tickets,
        seed=7,
        worker_env=worker_env,
        pyrallel_python=pyrallel,
        profile_dir=args.out if args.profile else None,
    )
    harness.start()
    try:
        results, extra = asyncio.run(measure(plan, harness, log, deadline=_deadline(started, plan)))
    finally:
        harness.stop()
    env["loadavg_end"] = _loadavg()
    if args.profile:
        for path in sorted(args.out.glob("profile-*.txt")):
            print(f"profile: {path}")
        return 0
    runs = [r.to_json() for r in results]
    summary = report.summarize(runs)
    targets = report.evaluate_targets(summary, plan.concurrency, rss_events=plan.rss_events)
    notes += harness.incidents
    notes += _notes(plan, runs)
    notes += _budget_notes(plan, extra)
    config: dict[str, Any] = {
        "mode": plan.mode,
        "events": plan.events,
        "tickets": plan.tickets,
        "repeats": plan.repeats,
        "concurrency": plan.concurrency,
        "sweep": plan.sweep,
        "rss_events": plan.rss_events,
        "paced_s": plan.paced_s,
        "subjects": plan.subjects,
        "worker_env": worker_env,
        "budget_s": plan.budget_s,
        "budget_from": "make" if args.started_at is not None else "script",
        "caps_s": {  # as planned; what the budget trimmed is in rss_cap_trimmed_s and sweep_skipped
            "worker": plan.worker_cap_s,
            "peers": plan.peer_cap_s,
            "ceiling_b": plan.ceiling_cap_s,
            "sweep": plan.sweep_cap_s,
            "rss": plan.rss_cap_s,
        },
        **extra,
    }
    doc = {
        "environment": env,
        "config": config,
        "elapsed_s": time.monotonic() - started,
        "targets": [
            {"name": t.name, "measured": t.measured, "ratio": t.ratio, "met": t.met} for t in targets
        ],
        "summary": summary,
        "notes": notes,
        "runs": runs,
    }
    (args.out / "latest.json").write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    text = report.markdown(doc)
    (args.out / "latest.md").write_text(text, encoding="utf-8")
    report.write_chart(summary, args.out / "latest.png")
    readme = ROOT / "README.md"
    if plan.mode == "full" and args.out.resolve() == (ROOT / "bench" / "results").resolve():
        readme.write_text(
            report.splice_readme(readme.read_text("utf-8"), report.readme_section(doc)), "utf-8"
        )
    print()
    print(text)
    if args.keep:
        print(f"logs of every run: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _start_of(started_at: float | None) -> float:
    """``--started-at`` (Unix time, ``make bench``'s start) as a moment on the monotonic clock;
    without it, now."""
    now = time.monotonic()
    return now if started_at is None else now - max(0.0, time.time() - started_at)


def _deadline(started: float, plan: Plan) -> float:
    return started + plan.budget_s if plan.budget_s > 0 else float("inf")


def _budget_notes(plan: Plan, extra: dict[str, Any]) -> list[str]:
    """What gave way to the time budget, said in the report (never silently)."""
    notes = []
    if "rss_cap_trimmed_s" in extra:
        notes.append(
            f"{report.BUDGET_NOTE} ({plan.budget_s:g} s): the peak-RSS run's window was trimmed from "
            f"{plan.rss_cap_s:g} s to {extra['rss_cap_trimmed_s']:g} s."
        )
    if "repeats_done" in extra:
        notes.append(
            f"{report.BUDGET_NOTE} ({plan.budget_s:g} s): {extra['repeats_done']} of the {plan.repeats} repeats of the "
            "0 ms and 20 ms scenarios (and as many paced pairs) fitted; the medians are of those."
        )
    if extra.get("sweep_skipped"):
        points = ", ".join(str(c) for c in extra["sweep_skipped"])
        notes.append(
            f"{report.BUDGET_NOTE} ({plan.budget_s:g} s): the sweep's points at max_in_flight {points} did not "
            "fit and are not in the chart."
        )
    return notes


def _notes(plan: Plan, runs: list[dict[str, Any]]) -> list[str]:
    notes = []
    once = [s for s in plan.subjects if s in FIRST_REPEAT_ONLY] if plan.repeats > 1 else []
    if once:
        notes.append(
            f"Run once at each latency, {report.FIRST_REPEAT_ONLY_NOTE} (no target depends on them, and the "
            f"time went to the sweep): {'; '.join(report.LABELS[s] for s in once)}."
        )
    notes += [
        "Every subject is its own process; the simulator is another (one process for the whole run, reset "
        "before each run); broker: a fresh Tansu per run. All share the machine's cores.",
        "FastStream runs with `ack_policy=AckPolicy.NACK_ON_ERROR` (commit after the handler, i.e. after the "
        "outcome is confirmed; a handler that raised reads its message again) and `max_workers` = "
        "partitions: at-least-once FastStream handles one message at a time per partition, so its "
        "concurrency is the partition count, not max_in_flight.",
    ]
    bad = [r for r in runs if r["statuses"] and set(r["statuses"]) != {"applied"}]
    for r in bad:
        notes.append(
            f"{r['subject']} in {r['scenario']} (c={r['concurrency']}) had non-applied outcomes {r['statuses']}: "
            "an event applied out of order is refused by the simulator."
        )
    for r in runs:
        refused = {
            k: v for k, v in (r.get("extra") or {}).get("statuses", {}).items() if not k.startswith("2")
        }
        if r["subject"].startswith("ceiling_b") and refused:
            notes.append(
                f"{r['subject']} in {r['scenario']} (c={r['concurrency']}) had answers other than 2xx "
                f"{refused}, not counted in its rate: a signing or ordering fault of the ceiling."
            )
    failed = [r for r in runs if not r["ok"]]
    for r in failed:
        notes.append(f"{r['subject']} in {r['scenario']} (c={r['concurrency']}) failed: {r['error']}")
    return notes


if __name__ == "__main__":
    sys.exit(main())
