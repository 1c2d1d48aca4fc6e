"""One measured run: a fresh broker and topics, the backlog, one subject process, its outcomes.

Subjects (``RunSpec.subject``):

=============  ==============================================================================
``worker``     ``python -m worker run`` with ``COC_WORKER_*`` settings (the thing under test)
``faststream`` ``bench/peers/faststream_app.py`` (peer 1)
``pyrallel``   ``bench/peers/pyrallel_app.py`` (peer 2, in its own Python >= 3.12 environment)
``baseline``   ``bench/peers/sequential.py``: consume -> call -> produce -> commit, one at a time
``ceiling_a``  ``bench/peers/ceiling_consume.py``: read the backlog, nothing else
``ceiling_b``  ``bench/peers/ceiling_http.py``: signed PUTs only, at the same concurrency
``ceiling_b_rs`` the same on the worker's HTTP client (pyreqwest): a comparison, not a target's
``passthrough`` ``bench/peers/passthrough.py``: consume -> outcome at once (the paced latency floor)
=============  ==============================================================================

A pipeline subject runs until every input has an outcome on the results topic, or for at most
``cap_s`` after its first outcome (the slow subjects are measured on a steady-state window rather
than the whole backlog; in the paced scenario, after the load generator began). The simulator is
one long-lived process, reset before every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.procs import BENCH, ROOT, Bystanders, SimulatorProcess, Subject, Usage
from bench.stats import analyze_outcomes, cpu_between, last_finished_at, percentile, ratio
from bench.workload import Record, Timestamps, Workload, generate, produce_backlog, produce_paced
from worker.sandbox import TansuBroker, create_topics, free_port
from worker.settings import WorkerSettings

AK, SK = "bench-ak", "bench-sk-0123456789abcdef"
PARTITIONS = 12
#: Group timings for every group member in the benchmark: they only shorten the first join
#: (Tansu settles a join in ~max(1 s, session/2)); steady-state throughput does not depend on them.
SESSION_TIMEOUT_MS, HEARTBEAT_MS = 4000, 500
STARTUP_TIMEOUT_S = 60.0
#: The environment of every script under ``bench/peers``: the API's credentials, and the project.
PEER_ENV = {"BENCH_API_AK": AK, "BENCH_API_SK": SK, "PYTHONPATH": str(ROOT)}


@dataclass(frozen=True, slots=True)
class RunSpec:
    scenario: str
    subject: str
    latency_ms: float
    concurrency: int
    events: int
    cap_s: float
    paced_rate: float | None = None


@dataclass(slots=True)
class RunResult:
    spec: RunSpec
    ok: bool = False
    error: str | None = None
    count: int = 0
    throughput: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s: float | None = None
    cpu_s_per_1k: float | None = None
    peak_rss_mb: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    copies: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("spec"))
        return data


class Harness:
    """Owns the simulator process and the generated data; ``await run(spec)`` measures one run."""

    def __init__(
        self,
        workdir: Path,
        tickets: int,
        seed: int,
        worker_env: dict[str, str],
        pyrallel_python: str | None,
        profile_dir: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.tickets = tickets
        self.seed = seed
        self.worker_env = worker_env
        self.pyrallel_python = pyrallel_python
        self.profile_dir = profile_dir
        self.sim = SimulatorProcess(AK, SK, workdir / "simulator.log")
        self._records: dict[int, list[Record]] = {}
        self._runs = 0
        #: Things that went wrong around the runs (not in one subject), for the report's notes.
        self.incidents: list[str] = []

    def start(self) -> None:
        self.sim.start()

    def stop(self) -> None:
        self.sim.stop()

    def records(self, events: int) -> list[Record]:
        if events not in self._records:
            self._records[events] = generate(Workload(events, self.tickets, self.seed))
        return self._records[events]

    # --- one run ------------------------------------------------------------------------------------
    async def run(self, spec: RunSpec) -> RunResult:
        self._runs += 1
        started = time.monotonic()
        result = RunResult(spec)
        code = self.sim.exit_code()
        if code is not None:
            self.incidents.append(
                f"The simulator process died (exit code {code}) before run {self._runs} "
                f"({spec.scenario}/{spec.subject}); restarted. Its log: {self.sim.log_tail()!r}"
            )
            self.sim.stop()
            self.sim.start()
        try:
            if spec.subject in ("ceiling_b", "ceiling_b_rs"):
                await self._run_ceiling_b(spec, result)
            else:
                with TansuBroker(log_path=self.workdir / f"tansu-{self._runs}.log") as broker:
                    if spec.subject == "ceiling_a":
                        await self._run_ceiling_a(broker, spec, result)
                    else:
                        await self._run_pipeline(broker, spec, result)
        except Exception as exc:  # one failed run is reported, it does not end the benchmark
            result.ok, result.error = False, f"{type(exc).__name__}: {exc}"[:500]
        result.wall_s = time.monotonic() - started
        return result

    def _bystanders(self, broker: TansuBroker | None) -> Bystanders:
        """Start sampling the other processes on the machine (right after a subject started)."""
        return Bystanders(
            {"simulator": self.sim.pid, "broker": broker.pid if broker else None, "harness": os.getpid()}
        )

    def _topics(self) -> tuple[str, str, str]:
        n = self._runs
        return f"bench{n}.events", f"bench{n}.outcomes", f"bench{n}.dlq"

    async def _run_pipeline(self, broker: TansuBroker, spec: RunSpec, result: RunResult) -> None:
        bootstrap = broker.bootstrap
        topic_in, topic_out, topic_dlq = self._topics()
        await create_topics(bootstrap, [topic_in, topic_out, topic_dlq], partitions=PARTITIONS)
        records = self.records(spec.events)
        timestamps: Timestamps = {}
        if spec.paced_rate is None:
            timestamps = await produce_backlog(bootstrap, topic_in, records)
        self.sim.reset(spec.latency_ms)
        http_port = free_port()
        subject = self._subject(spec, bootstrap, topic_in, topic_out, topic_dlq, http_port).start()
        bystanders = self._bystanders(broker)
        started = time.monotonic()
        outcomes: list[tuple[bytes, int]] = []
        first_at: float | None = None
        capped_at: int | None = None
        try:
            if spec.paced_rate is None:
                outcomes, first_at, capped_at = await collect(
                    bootstrap, topic_out, spec.events, spec.cap_s, subject
                )
            else:
                await wait_ready(http_port, subject)
                offered_from = time.monotonic()
                with _collector_paused():
                    timestamps, achieved = await produce_paced(bootstrap, topic_in, records, spec.paced_rate)
                result.extra["paced_rate_achieved"] = achieved
                # Read once the load is offered, not beside it: every outcome carries its own
                # timestamp, and a live reader's fetches cost the broker and this process CPU
                # that the subject and the load generator share (see bench/README.md). The cap
                # still counts from when the load began.
                outcomes, _, capped_at = await collect(
                    bootstrap, topic_out, spec.events, spec.cap_s, subject, window_from=offered_from
                )
        finally:
            # the worker gets its whole shutdown grace (its drain is part of what it promises)
            # (peers are killed sooner: their shutdown is not measured, FastStream's takes ~10 s)
            usage = subject.stop(timeout_s=40.0 if spec.subject == "worker" else 3.0)
            others = bystanders.stop()
        result.extra["stop_s"] = usage.stop_s
        if usage.killed:
            result.extra["killed_after_sigterm"] = True
        if first_at is not None:
            result.extra["first_outcome_after_s"] = first_at - started
        # A capped window ends at the last outcome read when the cap struck; everything finished by
        # then counts, also what was read during the grace.
        cutoff = last_finished_at(outcomes[:capped_at]) if capped_at is not None else None
        result.extra["capped"] = capped_at is not None
        stats = analyze_outcomes(outcomes, timestamps, finished_by=cutoff)
        result.count, result.copies, result.statuses = stats.count, stats.copies, stats.statuses
        result.throughput = stats.throughput
        result.p50_ms = percentile(stats.latencies_ms, 50)
        result.p99_ms = percentile(stats.latencies_ms, 99)
        _usage(result, usage, stats.first_received, stats.last_finished, stats.count, others)
        result.extra["window_s"] = stats.window_s
        for name, values in (("wait", stats.wait_ms), ("held", stats.held_ms)):
            for q in (50, 99):
                result.extra[f"{name}_p{q}_ms"] = percentile(values, q)
        result.ok = stats.count > 0
        result.extra["complete"] = stats.count >= spec.events
        if stats.count == 0:
            result.error = f"no outcome (exit code {usage.exit_code}): {subject.log_tail(8)}"
        elif usage.exit_code not in (0, -15, None):
            result.extra["exit_code"] = usage.exit_code
            result.extra["log_tail"] = subject.log_tail(8)

    async def _run_ceiling_a(self, broker: TansuBroker, spec: RunSpec, result: RunResult) -> None:
        bootstrap = broker.bootstrap
        topic_in, *_ = self._topics()
        await create_topics(bootstrap, [topic_in], partitions=PARTITIONS)
        await produce_backlog(bootstrap, topic_in, self.records(spec.events))
        await self._run_script(
            spec,
            result,
            broker,
            "ceiling_consume.py",
            f"--bootstrap={bootstrap}",
            f"--input={topic_in}",
            f"--expected={spec.events}",
            f"--max-seconds={spec.cap_s}",
        )

    async def _run_ceiling_b(self, spec: RunSpec, result: RunResult) -> None:
        self.sim.reset(spec.latency_ms)
        await self._run_script(
            spec,
            result,
            None,
            "ceiling_http.py",
            f"--api={self.sim.url}",
            f"--concurrency={spec.concurrency}",
            f"--events={spec.events}",
            f"--tickets={self.tickets}",
            f"--seed={self.seed}",
            f"--max-seconds={spec.cap_s}",
            # ceiling B' sends with the worker's own HTTP client (and ceiling B's event loop)
            f"--client={'pyreqwest' if spec.subject == 'ceiling_b_rs' else 'aiohttp'}",
        )

    async def _run_script(
        self, spec: RunSpec, result: RunResult, broker: TansuBroker | None, script: str, *flags: str
    ) -> None:
        """Run a ceiling script to its end and read the JSON line it prints last."""
        cmd = [sys.executable, str(BENCH / "peers" / script), *flags]
        subject = Subject(spec.subject, cmd, PEER_ENV, self._log(spec)).start()
        bystanders = self._bystanders(broker)
        assert subject.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(subject.proc.wait, STARTUP_TIMEOUT_S + spec.cap_s * 2)
        # The script has exited (or is stopped now): its last CPU/RSS sample is from just before.
        usage = subject.stop()
        others = bystanders.stop()
        lines = subject.log_tail(3).splitlines()
        try:
            report = json.loads(lines[-1])
        except (IndexError, ValueError):
            result.error = f"no result (exit code {usage.exit_code}): {subject.log_tail(8)}"
            return
        result.count = int(report["count"])
        result.throughput = float(report["rate"]) or None
        result.extra.update({k: v for k, v in report.items() if k not in ("count", "rate")})
        end = usage.samples[-1].at if usage.samples else time.time()
        _usage(result, usage, end - float(report["elapsed_s"]), end, result.count, others)
        result.ok = result.count > 0

    # --- subjects -----------------------------------------------------------------------------------
    def _log(self, spec: RunSpec) -> Path:
        return self.workdir / f"run-{self._runs}-{spec.subject}.log"

    def _subject(
        self, spec: RunSpec, bootstrap: str, topic_in: str, topic_out: str, topic_dlq: str, http_port: int
    ) -> Subject:
        group = f"bench-{self._runs}-{spec.subject}"
        log = self._log(spec)
        if spec.subject == "worker":
            env = {
                "COC_WORKER_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "COC_WORKER_INPUT_TOPIC": topic_in,
                "COC_WORKER_RESULTS_TOPIC": topic_out,
                "COC_WORKER_DLQ_TOPIC": topic_dlq,
                "COC_WORKER_GROUP_ID": group,
                "COC_WORKER_API_ENDPOINT": self.sim.url,
                "COC_WORKER_API_AK": AK,
                "COC_WORKER_API_SK": SK,
                "COC_WORKER_DEDUP_URL": f"sqlite:///{self.workdir}/dedup-{self._runs}.sqlite3",
                "COC_WORKER_HTTP_HOST": "127.0.0.1",
                "COC_WORKER_HTTP_PORT": str(http_port),
                "COC_WORKER_MAX_IN_FLIGHT": str(spec.concurrency),
                "COC_WORKER_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
                "COC_WORKER_KAFKA_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
                "COC_WORKER_LOG_FORMAT": "json",
                "COC_WORKER_WORKER_ID": f"bench-worker-{self._runs}",
                **self.worker_env,
            }
            cmd = [sys.executable, "-m", "worker", "run"]
            if self.profile_dir is not None:
                out = self.profile_dir / f"profile-{spec.scenario}-c{spec.concurrency}.txt"
                cmd[1:1] = ["-m", "pyinstrument", "--renderer=text", f"--outfile={out}"]
            return Subject("worker", cmd, env, log)
        script = {
            "faststream": "faststream_app.py",
            "pyrallel": "pyrallel_app.py",
            "baseline": "sequential.py",
            "passthrough": "passthrough.py",
        }
        python = sys.executable
        if spec.subject == "pyrallel":
            if self.pyrallel_python is None:
                raise RuntimeError("pyrallel-consumer is not available here")
            python = self.pyrallel_python
        cmd = [
            python,
            str(BENCH / "peers" / script[spec.subject]),
            f"--bootstrap={bootstrap}",
            f"--input={topic_in}",
            f"--results={topic_out}",
            f"--group={group}",
            f"--api={self.sim.url}",
            f"--concurrency={spec.concurrency}",
            f"--session-timeout-ms={SESSION_TIMEOUT_MS}",
            f"--heartbeat-ms={HEARTBEAT_MS}",
        ]
        if spec.subject == "passthrough":  # the floor fetches as the worker does, tuned or not
            wait = self.worker_env.get("COC_WORKER_KAFKA_FETCH_MAX_WAIT_MS") or str(
                WorkerSettings.model_fields["kafka_fetch_max_wait_ms"].default
            )
            cmd.append(f"--fetch-max-wait-ms={wait}")
        return Subject(spec.subject, cmd, PEER_ENV, log)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """This process's garbage collector off while it paces the load.

    The load generator lives here, with every record and acknowledgement of the run (and, until
    the outcomes were read after the load, the outcome reader): the collector's full passes took
    26-69 ms each, once or twice a run, and stalled the load generator with records stamped but
    not yet sent, inflating the measured latency of whatever subject was running. Ten seconds of
    cyclic garbage is freed right after."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _usage(
    result: RunResult,
    usage: Usage,
    start: float | None,
    end: float | None,
    count: int,
    others: dict[str, Usage],
) -> None:
    """The subject's CPU and peak RSS; and, over the same window, the other processes' CPU per
    1,000 events as ``extra["<name>_cpu_s_per_1k"]`` (simulator, broker, harness)."""
    if usage.peak_rss_bytes:
        result.peak_rss_mb = usage.peak_rss_bytes / 2**20
    if start is not None and end is not None:
        result.cpu_s = cpu_between(usage.samples, start, end)
        per_event = ratio(result.cpu_s, count)
        result.cpu_s_per_1k = per_event * 1000 if per_event is not None else None
        for name, other in others.items():
            per_event = ratio(cpu_between(other.samples, start, end), count)
            if per_event is not None:
                result.extra[f"{name}_cpu_s_per_1k"] = per_event * 1000
    if usage.samples:
        result.extra["cpu_s_total"] = usage.samples[-1].cpu_s


async def wait_ready(http_port: int, subject: Subject, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Until the subject holds its partitions: the worker's ``/readyz`` answers 200 (it has joined
    the group), a peer has printed ``ready``."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{http_port}/readyz"
    while time.monotonic() < deadline:
        if not subject.alive:
            raise RuntimeError(f"the subject exited before it was ready: {subject.log_tail(8)}")
        if subject.name != "worker":
            if "ready" in subject.log_path.read_text(errors="replace").splitlines():
                return
        else:
            with contextlib.suppress(OSError):
                ready = await asyncio.to_thread(_get_status, url)
                if ready == 200:
                    return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"not ready after {timeout_s}s")


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


#: After a capped window, how long the reader goes on: outcomes written inside the window but not
#: yet read (other partitions, the subject's publish queue) are counted, not left out.
CAP_GRACE_S = 0.75


#: How often ``collect`` reads the results topic beside a running subject.
READ_EVERY_S = 0.25


async def collect(
    bootstrap: str,
    topic: str,
    expected: int,
    cap_s: float,
    subject: Subject,
    *,
    window_from: float | None = None,
) -> tuple[list[tuple[bytes, int]], float | None, int | None]:
    """Read the results topic from the start until ``expected`` inputs have an outcome.

    Also stops ``cap_s`` after the first outcome, or after ``window_from`` when given (then reads
    ``CAP_GRACE_S`` more), once the subject has exited and nothing more comes, or when nothing at
    all arrives within the startup timeout (from ``window_from`` when given). Returns the records,
    when the first was read, and how many had been read when the cap struck (None when it did
    not: the whole backlog, or the subject's end).
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=200)
    await consumer.start()
    out: list[tuple[bytes, int]] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        started = window_from if window_from is not None else time.monotonic()
        first: float | None = None
        cap_from = window_from  # else the first outcome's arrival
        capped_at: int | None = None
        checked = 0
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                out.extend((r.value or b"{}", r.timestamp) for r in batch)
            now = time.monotonic()
            if out and first is None:
                first = now
                cap_from = now if cap_from is None else cap_from
            if len(out) >= expected and len(out) != checked:
                checked = len(out)
                if len({_source(value) for value, _ in out}) >= expected:
                    break
            if capped_at is None and cap_from is not None and now - cap_from > cap_s:
                capped_at = len(out)
            if capped_at is not None and cap_from is not None and now - cap_from > cap_s + CAP_GRACE_S:
                break
            if first is None and now - started > STARTUP_TIMEOUT_S:
                break
            if not subject.alive and not batches:  # what it wrote before it exited is read first
                break
            if window_from is None:
                # Read in bulk beside a running subject: a fetch for every few outcomes cost this
                # process and the broker ~3% of the machine's CPU per event, which ceiling B, with
                # no reader, never paid. The window comes from the outcomes' own times, so reading
                # later moves only the cap, by up to this much.
                await asyncio.sleep(READ_EVERY_S)
    finally:
        await consumer.stop()
    return out, first, capped_at


def _source(value: bytes) -> tuple[int, int]:
    source = json.loads(value)["source"]
    return int(source["partition"]), int(source["offset"])
