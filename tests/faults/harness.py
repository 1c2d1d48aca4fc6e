"""One fault scenario's rig: topics, the simulator, worker processes, readers, and the ledger.

::

    async with Rig("crash", bootstrap=..., simulator=sim, dedup_url=..., tmp_path=...) as rig:
        await rig.produce(stream)
        worker = await rig.spawn()                # python -m worker run, COC_WORKER_* env
        worker.kill(); worker = await rig.restart(worker)
        await rig.wait_finished(timeout_s=120)      # every message has an outcome
        result = await rig.ledger()               # faults.ledger.LedgerResult

``ProxiedBroker`` is a Tansu broker whose advertised address is a ``TcpProxy``: Kafka clients
connect to the advertised address, so every connection (the worker's, the test's) crosses the
proxy and ``cut()`` really cuts the worker off its broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from faults.ledger import DLQ_STATUSES, CommitSnapshot, InputMessage, LedgerResult, check
from faults.process import WorkerProcess
from faults.proxy import TcpProxy
from faults.stream import StreamEvent, records
from worker.cancel import cancel_and_wait
from worker.sandbox import (
    committed_offsets,
    create_topics,
    free_port,
    produce,
    read_topic,
    tansu_binary,
    wait_for_port,
)
from worker.simulator import SimulatorServer

AK = "fault-access-key"
SK = "fault-secret-key-0123456789abcdef"

#: Worker settings every scenario starts from: fast group protocol, fast commits, JSON logs.
BASE_ENV: dict[str, str] = {
    "COC_WORKER_HTTP_HOST": "127.0.0.1",
    "COC_WORKER_HTTP_PORT": "0",
    "COC_WORKER_KAFKA_SESSION_TIMEOUT_MS": "2000",
    "COC_WORKER_KAFKA_HEARTBEAT_INTERVAL_MS": "300",
    "COC_WORKER_KAFKA_FETCH_MAX_WAIT_MS": "20",
    "COC_WORKER_COMMIT_INTERVAL_S": "0.2",
    "COC_WORKER_RETRY_BASE_DELAY_S": "0.05",
    "COC_WORKER_RETRY_MAX_DELAY_S": "0.5",
    "COC_WORKER_PROBE_MAX_DELAY_S": "0.5",
    "COC_WORKER_SHUTDOWN_GRACE_S": "10",
    "COC_WORKER_REVOKE_GRACE_S": "5",
    "COC_WORKER_LOG_LEVEL": "INFO",
    "COC_WORKER_LOG_FORMAT": "json",
    # Every run starts on a fresh key prefix, a store younger than the window: every event would
    # have its ticket read first, which is not what the scenarios measure (a store that keeps its
    # records: the crash windows' figure, the slow consumer's pace).
    "COC_WORKER_DEDUP_FORGOTTEN_WINDOW_S": "0",
}


class ProxiedBroker:
    """A Tansu broker (own process) that advertises the address of a ``TcpProxy`` in front of it."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.proxy = TcpProxy("127.0.0.1", self.port)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return self.proxy.address

    async def start(self) -> ProxiedBroker:
        await self.proxy.start()
        self._proc = self._launch()
        await asyncio.to_thread(wait_for_port, "127.0.0.1", self.port, 10.0)
        return self

    def _launch(self) -> subprocess.Popen[bytes]:
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        out = self._log or subprocess.DEVNULL
        return subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://{self.proxy.address}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )

    async def stop(self) -> None:
        await self.proxy.stop()
        if self._proc is not None:
            self._proc.terminate()
            try:
                await asyncio.to_thread(self._proc.wait, 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait, 5)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> ProxiedBroker:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class TopicTail:
    """Reads one topic from the beginning, without a group, accumulating what it has read."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[Any] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def _ensure(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                enable_auto_commit=False,
                fetch_max_wait_ms=50,
                max_partition_fetch_bytes=4 << 20,
            )
            await consumer.start()
            deadline = time.monotonic() + 30
            while not consumer.partitions_for_topic(self.topic):
                if time.monotonic() > deadline:
                    await consumer.stop()
                    raise AssertionError(f"topic {self.topic} has no partitions")
                await consumer.topics()
                await asyncio.sleep(0.05)
            parts = [TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic))]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            self._consumer = consumer
        return self._consumer

    async def poll(self, timeout_ms: int = 200) -> int:
        consumer = await self._ensure()
        batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=20_000)
        n = 0
        for batch in batches.values():
            self.records.extend(batch)
            n += len(batch)
        return n

    async def until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what} on {self.topic}")
            await self.poll()

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


class ReadyWatch:
    """Samples a worker's ``/readyz`` in the background: which status when (for fault windows)."""

    def __init__(self, worker: WorkerProcess, session: aiohttp.ClientSession, every_s: float = 0.1) -> None:
        self.worker = worker
        self.samples: list[tuple[float, int | None]] = []  # (monotonic time, HTTP status or None)
        self._session = session
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> ReadyWatch:
        self._task = asyncio.create_task(self._run(), name=f"readyz-{self.worker.name}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            answer = await self.worker.ready(self._session)
            self.samples.append((time.monotonic(), None if answer is None else answer[0]))
            await asyncio.sleep(self._every_s)

    def not_ready_s(self, start: float, end: float) -> float:
        """How long, within ``[start, end]`` (monotonic), ``/readyz`` answered 503."""
        window = [(t, s) for t, s in self.samples if start <= t <= end]
        return sum(t2 - t1 for (t1, s1), (t2, _) in itertools.pairwise(window) if s1 == 503)


class Rig:
    """Everything one scenario run needs; an async context manager that cleans up after itself."""

    def __init__(
        self,
        name: str,
        *,
        bootstrap: str,
        simulator: SimulatorServer,
        dedup_url: str,
        tmp_path: Path,
        partitions: int = 4,
        env: dict[str, str] | None = None,
        commit_sample_s: float = 1.0,
    ) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.simulator = simulator
        self.dedup_url = dedup_url
        self.tmp_path = tmp_path
        self.partitions = partitions
        run = uuid.uuid4().hex[:8]
        self.run = run
        self.topics = {"input": f"f-in-{run}", "results": f"f-out-{run}", "dlq": f"f-dlq-{run}"}
        self.group = f"f-group-{run}"
        self.extra_env = dict(env or {})
        self.workers: list[WorkerProcess] = []
        self.snapshots: list[CommitSnapshot] = []
        self.produced: list[StreamEvent] = []
        self.started_mono = time.monotonic()
        self.outcomes = TopicTail(bootstrap, self.topics["results"])
        self.session: aiohttp.ClientSession | None = None
        self._seen_sources: set[tuple[int, int]] = set()
        self._parsed = 0
        self.commit_sample_s = commit_sample_s
        self._sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        await create_topics(self.bootstrap, list(self.topics.values()), partitions=self.partitions)
        self.session = aiohttp.ClientSession()
        self.started_mono = time.monotonic()
        self._sampler = asyncio.create_task(self._sample_commits(self.commit_sample_s), name="commit-sampler")
        return self

    async def _stop_sampler(self) -> None:
        """The sampler loops around ``wait_for``, which on Python 3.11 can swallow a cancellation
        (``worker/cancel.py``): cancelled once, it ran on and a CI run hung here."""
        task, self._sampler = self._sampler, None
        if task is not None:
            await cancel_and_wait([task])

    async def __aexit__(self, *exc_info: object) -> None:
        self.disarm()
        await self._stop_sampler()
        for w in self.workers:
            await w.ensure_dead()
        await self.outcomes.close()
        if self.session is not None:
            await self.session.close()

    # --- workers ------------------------------------------------------------------------------------
    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COC_WORKER_")}
        env.update(BASE_ENV)
        env.update(
            {
                "COC_WORKER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "COC_WORKER_INPUT_TOPIC": self.topics["input"],
                "COC_WORKER_RESULTS_TOPIC": self.topics["results"],
                "COC_WORKER_DLQ_TOPIC": self.topics["dlq"],
                "COC_WORKER_GROUP_ID": self.group,
                "COC_WORKER_API_ENDPOINT": self.simulator.url,
                "COC_WORKER_API_AK": AK,
                "COC_WORKER_API_SK": SK,
                "COC_WORKER_DEDUP_URL": self.dedup_url,
            }
        )
        env.update(self.extra_env)
        env.update({f"COC_WORKER_{k.upper()}": str(v) for k, v in overrides.items()})
        return env

    async def spawn(self, *, wait_assigned: bool = True, **overrides: str) -> WorkerProcess:
        """Start a new worker process (its log in ``tmp_path``) and wait until it serves HTTP."""
        return await self._launch(self.env(**overrides), wait_assigned)

    async def restart(self, old: WorkerProcess, *, wait_assigned: bool = False) -> WorkerProcess:
        """A new process with the same settings (a new worker id, as a new pod would have)."""
        return await self._launch(old.env, wait_assigned)

    async def _launch(self, env: dict[str, str], wait_assigned: bool) -> WorkerProcess:
        n = len(self.workers) + 1
        w = WorkerProcess(f"worker-{n}", env, self.tmp_path / f"{self.name}-worker-{n}.log")
        self.workers.append(w)
        await w.spawn()
        if wait_assigned:
            await w.wait_assigned(self.http)
        return w

    @property
    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None, "use the Rig as an async context manager"
        return self.session

    @property
    def peak_rss(self) -> int:
        return max((w.peak_rss for w in self.workers), default=0)

    async def stop_all(self, timeout_s: float = 60.0) -> None:
        """SIGTERM every live worker; each must drain and exit 0."""
        live = self.alive
        for w in live:
            w.terminate()
        for w in live:
            rc = await w.wait(timeout_s)
            assert rc == 0, f"{w.name} exited {rc} after SIGTERM:\n{w.tail()}"

    async def wait_ready(self, w: WorkerProcess, ready: bool, timeout_s: float) -> float:
        """Wait until ``/readyz`` answers 200 (``ready``) or 503; returns the monotonic time it did."""
        deadline = time.monotonic() + timeout_s
        want = 200 if ready else 503
        while True:
            answer = await w.ready(self.http)
            if answer is not None and answer[0] == want:
                return time.monotonic()
            if not w.alive:
                raise AssertionError(f"{w.name} died waiting for /readyz {want}:\n{w.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"/readyz of {w.name} not {want} within {timeout_s}s: {answer}")
            await asyncio.sleep(0.05)

    def pauses(self) -> Counter[str]:
        """Why the workers paused (``worker_paused`` log lines): ``cause: detail`` -> count. The
        detail whole: cut at its first colon, an address in it (``http://host:port``) was cut too."""
        found: Counter[str] = Counter()
        for w in self.workers:
            for line in w.events("worker_paused"):
                found[f"{line.get('cause')}: {line.get('detail', '')}"] += 1
        return found

    # --- input / progress ---------------------------------------------------------------------------
    async def produce(self, stream: list[StreamEvent]) -> None:
        await produce(self.bootstrap, self.topics["input"], records(stream))
        self.produced.extend(stream)

    def applied_count(self) -> int:
        return len(self.simulator.state.applied_log)

    async def wait_applied(self, at_least: int, timeout_s: float) -> None:
        """Wait until the simulator's applied log holds ``at_least`` entries."""
        try:
            await self.simulator.state.wait_for(lambda: self.applied_count() >= at_least, timeout_s)
        except TimeoutError:
            tails = "\n".join(f"--- {w.name}\n{w.tail(15)}" for w in self.workers[-2:])
            raise AssertionError(
                f"only {self.applied_count()} of {at_least} applied after {timeout_s}s\n{tails}"
            ) from None

    def _finished_sources(self) -> set[tuple[int, int]]:
        records_ = self.outcomes.records
        for record in records_[self._parsed :]:
            source = json.loads(record.value)["source"]
            self._seen_sources.add((source["partition"], source["offset"]))
        self._parsed = len(records_)
        return self._seen_sources

    def finished(self) -> int:
        return len(self._finished_sources())

    async def wait_finished(self, timeout_s: float) -> None:
        """Wait until every produced message has an outcome (read from the results topic)."""
        total = len(self.produced)
        try:
            await self.outcomes.until(lambda: self.finished() >= total, timeout_s, f"{total} outcomes")
        except AssertionError as exc:
            tails = "\n".join(f"--- {w.name}\n{w.tail(15)}" for w in self.alive)
            raise AssertionError(f"{exc}: have {self.finished()}\n{tails}") from None

    async def snapshot_commits(self, label: str = "") -> CommitSnapshot:
        """The group's committed positions now; the ledger checks each offset below was finished
        before this moment (taken *after* the read: whatever it shows was committed by then)."""
        positions = await committed_offsets(self.bootstrap, self.group, self.topics["input"], self.partitions)
        snap = CommitSnapshot(time.time(), {p: o for p, o in positions.items() if o >= 0}, label)
        self.snapshots.append(snap)
        return snap

    async def _sample_commits(self, every_s: float) -> None:
        """Committed positions all through the run (one admin client; failures during cuts skipped)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        tps = [TopicPartition(self.topics["input"], p) for p in range(self.partitions)]
        started = False
        try:
            while True:
                await asyncio.sleep(every_s)
                try:
                    if not started:
                        await asyncio.wait_for(admin.start(), 10)
                        started = True
                    found = await asyncio.wait_for(
                        admin.list_consumer_group_offsets(self.group, partitions=tps), 10
                    )
                except (KafkaError, TimeoutError, OSError):
                    continue
                at = time.time()
                positions = {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}
                if positions:
                    self.snapshots.append(CommitSnapshot(at, positions, "sampled"))
        finally:
            if started:
                await admin.close()

    # --- fault helpers --------------------------------------------------------------------------------
    def kill_on_next_apply(self, w: WorkerProcess, delay_s: float = 0.0) -> asyncio.Future[str]:
        """SIGKILL ``w`` when the simulator next applies a change: at once (inside the API handler,
        before the answer is sent) or ``delay_s`` later (between the answer and the outcome write).
        The future gives the event id that triggered it."""
        state = self.simulator.state
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[str] = loop.create_future()
        original = state.record_applied

        def hooked(
            ticket_id: str, changes: Any, body: Any, event_id: str | None, traceparent: str | None
        ) -> None:
            original(ticket_id, changes, body, event_id, traceparent)
            if fired.done():
                return
            del state.record_applied  # back to the class's method
            if delay_s <= 0:
                w.kill()
            else:
                loop.call_later(delay_s, w.kill)
            fired.set_result(event_id or "")

        state.record_applied = hooked  # type: ignore[method-assign]
        return fired

    def disarm(self) -> None:
        with contextlib.suppress(AttributeError):
            del self.simulator.state.record_applied

    # --- the ledger -----------------------------------------------------------------------------------
    async def ledger(self, *, timeout_s: float = 60.0) -> LedgerResult:
        """Read everything back and check it. The workers were stopped cleanly, so everything
        finished must be committed."""
        await self._stop_sampler()
        by_value = {e.value: e for e in self.produced}
        total = len(self.produced)
        input_records = await read_topic(
            self.bootstrap, self.topics["input"], until=lambda read: len(read) >= total, timeout_s=timeout_s
        )
        assert len(input_records) >= total, (
            f"timed out after {timeout_s}s reading the input: {len(input_records)} of {total}"
        )
        await self.outcomes.poll(500)
        outcomes = [json.loads(r.value) for r in self.outcomes.records]
        expected_dlq = sum(o["status"] in DLQ_STATUSES for o in outcomes)
        dlq_tail = TopicTail(self.bootstrap, self.topics["dlq"])
        try:
            with contextlib.suppress(AssertionError):
                await dlq_tail.until(lambda: len(dlq_tail.records) >= expected_dlq, 10, "dead letters")
            await dlq_tail.poll(300)
        finally:
            await dlq_tail.close()
        inputs = []
        for r in input_records:
            e = by_value.get(r.value)
            inputs.append(
                InputMessage(
                    r.partition,
                    r.offset,
                    e.event_id if e and e.valid else None,
                    e.ticket_id if e else None,
                    e.index if e else -1,
                    bool(e and e.valid),
                )
            )
        dead_letters = []
        for r in dlq_tail.records:
            headers = dict(r.headers or ())
            dead_letters.append(
                (int(headers["coc-dlq-source-partition"]), int(headers["coc-dlq-source-offset"]))
            )
        final = (await self.snapshot_commits("final")).positions
        state = self.simulator.state
        result = check(
            self.name,
            inputs=inputs,
            outcomes=outcomes,
            dead_letters=dead_letters,
            applied_log=list(state.applied_log),
            requests=[asdict(q) for q in state.requests],
            snapshots=self.snapshots,
            final_positions=final,
        )
        result.peak_rss_bytes = self.peak_rss
        result.duration_s = time.monotonic() - self.started_mono
        return result


def timeline(rig: Rig, event_id: str) -> str:
    """Everything known about one event, in time order: requests, applications, outcomes, log lines."""
    rows: list[tuple[float, str]] = []
    for q in rig.simulator.state.requests:
        if q.event_id == event_id:
            rows.append((q.at, f"api   {q.method} -> {q.status} {q.error_code} fault={q.fault}"))
    for entry in rig.simulator.state.applied_log:
        if entry.get("event_id") == event_id:
            rows.append((entry["at"], f"api   APPLIED {entry['action']} {entry.get('sub_ticket_id')}"))
    for r in rig.outcomes.records:
        o = json.loads(r.value)
        if o.get("event_id") == event_id:
            at = datetime.fromisoformat(o["finished_at"]).timestamp()
            rows.append(
                (
                    at,
                    f"out   {o['status']} redelivered={o['redelivered']} attempts={o['attempts']} "
                    f"reason={o.get('reason')} err={o.get('error_code')} worker={o['worker'][-12:]}",
                )
            )
    for w in rig.workers:
        for line in w.lines():
            if line.get("event_id") == event_id:
                at = datetime.fromisoformat(line["timestamp"]).timestamp()
                extra = {
                    k: v for k, v in line.items() if k not in ("timestamp", "event_id", "ticket_id", "level")
                }
                rows.append((at, f"{w.name:<9} {extra}"))
    rows.sort()
    return "\n".join(
        f"{datetime.fromtimestamp(at, UTC).strftime('%H:%M:%S.%f')[:-3]} {text}" for at, text in rows
    )
