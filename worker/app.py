"""The worker: wires the stages together and owns the lifecycle, top to bottom.

start:    HTTP server (/readyz 503 until joined) [-> ingress] [-> topics] -> dedup store -> API client ->
          producer -> consumer (joins the group); the broker and the dedup store are tried again
          while they do not answer, for up to ``startup_wait_s``
run:      fetch -> decode -> submit to the ticket's lane (at most ``max_in_flight`` run at once, up
          to ``buffer_limit`` wait; fetching pauses when full or when the gate is closed) ; every
          second commit the watermarks
revoke:   let the revoked partitions' jobs finish within ``revoke_grace_s``, cancel the rest,
          commit what is finished, forget the partitions
stop:     (SIGTERM/SIGINT only sets an event) stop fetching -> drain within ``shutdown_grace_s``
          -> cancel the rest -> commit -> leave the group -> flush the producer -> close
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from worker.api_client import CocApiClient
from worker.apply import ApiCaller
from worker.cancel import bounded_step, cancel_and_wait, unless_stopped
from worker.consumer import Consumer, Message
from worker.decode import decode_or_salvage
from worker.dedup import DedupStore, open_store
from worker.errors import BrokerUnavailable, ConfigError, JobCrashed, KafkaClientStopped
from worker.gate import Gate
from worker.health import HealthServer
from worker.kafka_config import ensure_topics
from worker.lanes import Lanes
from worker.logs import get_logger, redact_cut, register_secrets
from worker.metrics import HOLD_REASONS, KEY_MISMATCH_KINDS, Metrics
from worker.offsets import NotAssigned, OffsetTracker, OffsetWentBack, PartitionKey
from worker.pipeline import Job, Pipeline
from worker.publisher import Publisher
from worker.ratelimit import AdaptiveConcurrency, build_rate_limit
from worker.redis_config import dedup_target
from worker.retry import RetryPolicy, StartupWait
from worker.settings import REVOKE_CANCEL_WAIT_S, WorkerSettings, env_var
from worker.tracing import from_headers

log = get_logger(__name__)
T = TypeVar("T")

_FETCH_TIMEOUT_S = 0.5
#: How long a stop waits for a pause to end once every running job waits at the gate: a short
#: outage (a Redis failover, a broker's leader election) ends within it, and its jobs finish.
_PAUSED_STOP_WAIT_S = 5.0
_HEALTH_EVERY_S = 2.0  # how quickly /readyz notices the broker is gone
_TOPICS_CREATE_S = 5.0  # making lost topics again from the health check, at most


class Worker:
    """One worker process's lifecycle: start the clients, consume and dispatch, watch health,
    commit, stop. It owns the flow control (the buffer and each partition's share of it) and the
    rebalance hooks; what happens to one message is the pipeline's."""

    def __init__(self, settings: WorkerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        register_secrets(settings.secret_values())
        self._keys = _KeyWatch(self.metrics)
        self._stopping = asyncio.Event()
        self._hurried = asyncio.Event()  # a second stop request: no more waiting for the jobs
        self._room = asyncio.Event()
        #: Fetching pauses at the buffer limit and resumes once this few are left (hysteresis).
        self._buffer_limit = settings.buffer_limit
        self._resume_at = max(1, self._buffer_limit * 3 // 4)
        #: The same in bytes of keys and values: a run of large records (invalid ones waiting
        #: behind their ticket's earlier events) must not fill ``buffer_limit`` slots of 1 MiB each.
        self._bytes_limit = settings.max_buffered_bytes
        self._bytes_resume_at = self._bytes_limit * 3 // 4
        self._buffered_bytes = 0
        #: Per partition, as its share of the buffer in messages (below): large records stuck
        #: behind one ticket must not pause the fetching of every partition.
        self._partition_bytes: dict[PartitionKey, int] = {}
        self._partition_bytes_share = self._bytes_limit // 2
        #: A partition this far behind its oldest unfinished message stops being fetched, until half
        #: of that is left: a stuck message must not hold an ever longer tail in memory.
        self._uncommitted_limit = settings.max_uncommitted
        #: A partition's unfinished messages at most: a ticket stuck on a retrying event keeps its
        #: later events in the buffer, and one partition's must not fill it for all the others.
        #: Never below max_in_flight (a worker with one partition keeps every slot busy); none when
        #: that is the whole buffer, whose own pause then comes first (and resumes sooner).
        share = max(settings.max_in_flight, self._buffer_limit // 2)
        self._partition_share = share if share < self._buffer_limit else sys.maxsize
        self._gate = Gate(self.metrics, probe_max_s=settings.probe_max_delay_s)
        self._offsets = OffsetTracker()
        self._lanes: Lanes[Job] = Lanes(
            self._run_job, self._job_left, settings.max_in_flight, on_crash=self._job_crashed
        )
        #: The first job that ended without an outcome (``_job_crashed``): the consume loop stops.
        self._crashed: JobCrashed | None = None
        # read when scraped, not set twice per message
        self.metrics.in_flight.set_function(lambda: len(self._lanes))
        self.metrics.buffered_bytes.set_function(lambda: self._buffered_bytes)
        self.metrics.ready.set_function(lambda: float(self.ready))
        self._commit_lock = asyncio.Lock()
        self._store: DedupStore = open_store(
            dedup_target(settings),
            settings.dedup_ttl_s,
            settings.dedup_redis_min_replicas,
            settings.dedup_forgotten_window_s,
        )
        self._client = CocApiClient(settings, self.metrics)
        self._publisher = Publisher(settings)
        self._consumer = Consumer(settings, self)
        for reason in HOLD_REASONS:
            self.metrics.partitions_held.labels(reason=reason).set_function(
                functools.partial(self._consumer.held_count, reason)
            )
        self._rate_limit = build_rate_limit(settings, self.metrics)
        self._pipeline = Pipeline(
            settings,
            self._store,
            ApiCaller(
                self._client,
                RetryPolicy.from_settings(settings),
                self._gate,
                self.metrics,
                settings.api_unreachable_threshold_s,
                rate_limit=self._rate_limit,
                # As many as the HTTP client has connections for: above that, calls would queue
                # inside the client, their timeout running, instead of here.
                concurrency=AdaptiveConcurrency(settings.api_request_limit, self.metrics),
                settle_s=settings.api_request_timeout_s,
                # one total timeout to get a connection (the client may queue it), one to be sent
                abandon_s=settings.api_abandon_s,
            ),
            self._publisher,
            self._gate,
            self.metrics,
        )
        self._ingress = None
        if settings.ingest_enabled:  # monitoring systems may post events to the worker itself
            from worker.ingest import Ingress

            self._ingress = Ingress(settings, self.metrics.registry)
        self._http = HealthServer(
            settings, self.metrics.registry, self.status, self._ingress.routes() if self._ingress else None
        )
        self._assigned: set[PartitionKey] | None = None
        #: The group's committed offset of each assigned partition (``None``: the group has none),
        #: the lag's base until this member commits it.
        self._group_committed: dict[PartitionKey, int | None] = {}
        #: Replaced on every assignment: a lookup that spans one is not taken for the new one.
        self._assignment = object()
        self._broker_answered = False  # the last metadata request was answered (``_check_health``)
        self._fetch_failing = False  # the last fetch failed (``_poll``)
        #: setting -> topic, of the three the broker's last metadata did not list (``_check_health``)
        self._topics_missing: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Partitions starting over after their offsets went back (``_start_over``): key -> token.
        self._rewinding: dict[PartitionKey, object] = {}
        #: Partitions whose revoke is under way (``on_revoked``).
        self._revoking: set[PartitionKey] = set()
        self.started = asyncio.Event()
        #: The start's steps that need the broker or the dedup store, and what it waits for.
        self._startup = StartupWait(settings)

    # --- public ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to shut down gracefully (safe to call from a signal handler). Asked
        again, it stops waiting for the jobs in hand (a second Ctrl-C or SIGTERM): they are
        cancelled, as after the grace, and their claims make the next owner read the ticket."""
        if self._stopping.is_set():
            self._hurried.set()
        self._stopping.set()

    @property
    def _broker_ok(self) -> bool:
        """Not while fetches fail: the broker may answer a metadata request while every fetch
        fails (a topic's ACL revoked)."""
        return self._broker_answered and not self._fetch_failing

    @property
    def ready(self) -> bool:
        return (
            self._assigned is not None
            and self._broker_ok
            and not self._topics_missing
            and self._gate.is_open
            and not self._stopping.is_set()
        )

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "worker": self.settings.worker_id,
            "assigned": sorted(f"{t}/{p}" for t, p in (self._assigned or set())),
            "broker_reachable": self._broker_ok,
            "paused_by": self._gate.causes,
            "topics_missing": sorted(self._topics_missing.values()),
            "in_flight": len(self._lanes),  # taken from Kafka, not yet finished
            "buffered_bytes": self._buffered_bytes,  # their keys and values
            "running": self._lanes.running,  # of those, being processed now (<= max_in_flight)
            "held": sorted(f"{t}/{p}" for t, p in self._consumer.held),  # not fetched for now
            "stopping": self._stopping.is_set(),
            "waiting_for": self._startup.waiting_for,  # while starting: "broker" or "dedup_store"
        }

    @property
    def http_port(self) -> int | None:
        return self._http.port

    async def run(self) -> None:
        """Run until ``stop()``; always shuts down in order, whatever ended the loop. A stop during
        the start ends it too: each of its broker steps may otherwise wait 40 s per bootstrap
        server for a broker that takes connections and never answers."""
        start = asyncio.ensure_future(self._start())
        try:
            if await unless_stopped(start, self._stopping) is not None:
                start.result()  # the start's own failure, if any
                await self._consume()
        finally:
            await cancel_and_wait([start])  # a start cut short unwinds before the shutdown begins
            await self._shutdown()

    # --- lifecycle ------------------------------------------------------------------------------------
    async def _start(self) -> None:
        s = self.settings
        self._startup.begin()
        log.info(
            "worker_starting",
            worker=s.worker_id,
            input_topic=s.input_topic,
            results_topic=s.results_topic,
            dlq_topic=s.dlq_topic,
            group_id=s.group_id,
            max_in_flight=s.max_in_flight,
            max_buffered=self._buffer_limit,
            max_buffered_bytes=self._bytes_limit,
            dedup=s.dedup_url_shown,
            bootstrap_servers=s.kafka_bootstrap_servers,  # credentials are refused there
            api=s.api_base_url,  # an endpoint with credentials is refused too
        )
        # First, so that /healthz answers while the steps below wait (the ingress's routes say
        # 503 until its producer has started).
        await self._http.start()
        if self._ingress is not None:
            await self._startup.once_reachable("broker", self._ingress.start)
        if s.create_topics:
            created = await self._startup.once_reachable("broker", lambda: ensure_topics(s))
            if created:
                log.info("topics_created", topics=created)
        if self._store.remote:
            await self._startup.once_reachable("dedup_store", self._store.ping)
        else:  # a local file or memory: waiting would not make it work
            await self._store.ping()
        await self._client.start()
        await self._startup.once_reachable("broker", self._publisher.start)
        await self._startup.once_reachable("broker", self._consumer.start)
        self._broker_answered = True
        self._tasks = [
            asyncio.create_task(self._commit_periodically(), name="committer"),
            asyncio.create_task(self._watch_health(), name="health"),
        ]
        self.started.set()
        loop = type(asyncio.get_running_loop())
        log.info("worker_started", http_port=self._http.port, event_loop=f"{loop.__module__}.{loop.__name__}")

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            if self._crashed is not None:
                raise self._crashed
            if (ended := self._publisher.ended()) is not None:
                # Every outcome would fail for ever, the worker paused and /healthz alive: stop
                # (exit 1) to be started afresh, as for the consumer's coordination.
                raise KafkaClientStopped(f"the Kafka producer's sender ended ({ended}): restart")
            in_flight = len(self._lanes)
            full = in_flight >= self._buffer_limit or self._buffered_bytes >= self._bytes_limit
            if not self._consumer.paused and (full or not self._gate.is_open):
                self._consumer.pause()
            elif self._consumer.paused and self._may_resume() and self._gate.is_open:
                self._consumer.resume()
            if self._consumer.paused or self._consumer.all_held:
                # Waiting for room, the gate or a partition's release, polling all the same: it keeps
                # the group membership. The poll takes nothing and touches nothing prefetched
                # (``Consumer.fetch``). Cleared before the poll: a job that finishes during it wakes
                # the wait below at once.
                self._room.clear()
                await self._poll(0, 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        unless_stopped(self._room.wait(), self._stopping), _FETCH_TIMEOUT_S
                    )
                continue
            for message in await self._poll(self._buffer_limit - in_flight, _FETCH_TIMEOUT_S):
                self._dispatch(message)

    def _may_resume(self) -> bool:
        """A paused fetch resumes once a quarter of the buffer is free, in messages and in bytes
        (hysteresis: not a pause and a resume per finished job)."""
        return len(self._lanes) <= self._resume_at and self._buffered_bytes <= self._bytes_resume_at

    async def _poll(self, max_records: int, timeout_s: float) -> list[Message]:
        """A fetch that a stop interrupts: while a rebalance is under way aiokafka's fetch waits for
        the new assignment whatever its timeout (for ever, if the broker left), and a stop must
        still begin at once."""
        fetch = await unless_stopped(self._consumer.fetch(max_records, timeout_s), self._stopping)
        if fetch is None:
            return []
        try:
            messages = fetch.result()
        except BrokerUnavailable as exc:
            log.warning("fetch_failed", detail=str(exc))
            self._fetch_failing = True  # not ready until a fetch succeeds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            return []
        if self._fetch_failing:  # a fetch answered: so did the broker
            self._fetch_failing = False
            self._broker_answered = True
        return messages

    def _dispatch(self, message: Message) -> None:
        if self._rewinding and message.partition_key in self._rewinding:
            return  # read again once its partition starts over
        try:
            if self._revoking and message.partition_key in self._revoking:
                raise NotAssigned(message.partition_key)
            taken_in = self._offsets.take(message.partition_key, message.offset)
        except NotAssigned:
            # Fetched before a revocation that began while the fetch was handed over (a loop step
            # or two; the revoke's commit may still be under way): the partition's new owner
            # reads it from the committed offset.
            log.info(
                "message_of_revoked_partition",
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
            )
            return
        except OffsetWentBack:
            self._start_over(message)
            return
        self.metrics.count_consumed()
        key = message.partition_key
        size = _size(message)
        partition_bytes = self._partition_bytes[key] = self._partition_bytes.get(key, 0) + size
        stuck = taken_in.pending >= self._uncommitted_limit
        at_share = taken_in.unfinished >= self._partition_share
        # In bytes only beside other partitions: alone, its share would halve the byte limit.
        at_bytes = partition_bytes >= self._partition_bytes_share and len(self._assigned or ()) > 1
        if (stuck or at_share or at_bytes) and key not in self._consumer.held:
            reason = "uncommitted" if stuck else "share" if at_share else "bytes"
            self._consumer.hold(key, reason)
            # Far behind its oldest unfinished message: one is stuck, worth a look. At its share
            # of the buffer: flow control, which a plain backlog meets every few hundred messages.
            (log.warning if stuck else log.info)(
                "partition_held",
                topic=key[0],
                partition=key[1],
                reason=reason,
                uncommitted=taken_in.pending,
                unfinished=taken_in.unfinished,
                unfinished_bytes=partition_bytes,
            )
        event, invalid, salvaged = decode_or_salvage(
            message.value, self.settings.max_event_bytes, key=message.key, unreadable=message.unreadable
        )
        if event is not None and message.key != event.ticket_id.encode():
            self._keys.mismatch(message, event.ticket_id)
        job = Job(
            message,
            event,
            invalid,
            from_headers(
                message.headers, (message.topic, message.partition, message.offset, message.timestamp_ms)
            ),
            datetime.now(UTC),
            time.monotonic(),
            salvaged,
            taken_in,
        )
        self._buffered_bytes += size
        self._lanes.submit(job.lane, job)

    def _start_over(self, message: Message) -> None:
        """An offset at or below one already taken: the partition's log was truncated or the topic
        recreated (an unclean leader election; the broker lost its data), and aiokafka went back
        to its start. These are new messages: dropped as seen twice, they had no outcome, and the
        commit of a later offset went past them. The partition is tracked afresh from this offset
        at once (what is committed meanwhile is this offset), paused until its jobs of the old log
        have finished, then read again from this offset."""
        key = message.partition_key
        token = self._rewinding[key] = object()
        self._consumer.hold(key, "rewinding")
        log.error(
            "partition_offset_went_back",
            topic=key[0],
            partition=key[1],
            offset=message.offset,
            in_flight=self._offsets.pending_of(key),
        )
        self._offsets.start_over(key, message.offset)  # commits meanwhile name the new log's start
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(self._rewind(key, message.offset, token)))

    async def _rewind(self, key: PartitionKey, offset: int, token: object) -> None:
        def of_partition(job: Job) -> bool:
            return job.message.partition_key == key

        while not await self._lanes.wait_for(of_partition, _FETCH_TIMEOUT_S):
            pass
        if self._rewinding.get(key) is not token:
            return  # revoked meanwhile: its next owner reads it from the last commit
        del self._rewinding[key]
        self._consumer.seek(key, offset)
        self._release(key)
        log.info("partition_started_over", topic=key[0], partition=key[1], offset=offset)

    def _release(self, key: PartitionKey) -> None:
        """Fetch a held partition again, waking the consume loop: it may be waiting with every
        partition held (``Consumer.all_held``)."""
        self._consumer.release(key)
        self._room.set()

    async def _run_job(self, job: Job) -> None:
        await self._pipeline.process(job)

    def _job_crashed(self, job: Job, error: BaseException) -> None:
        """A job raised instead of ending as an outcome (a bug): its partition could never be
        committed past it, and would stop for good once held. The worker stops (exit 1) instead,
        what it finished committed, and a fresh process reads the message again. Named by its
        position and the error's type only: the error's text may hold anything (the traceback's
        line goes through the redactor). The log line names the message as the job's own lines
        do: this runs in a done-callback, outside the job's log context."""
        log.error("job_crashed", error=type(error).__name__, exc_info=error, **job.log_context())
        if self._crashed is None:
            m = job.message
            self._crashed = JobCrashed(
                f"a job ended without an outcome ({type(error).__name__}) at {m.topic}/{m.partition}"
                f" offset {m.offset}: restart"
            )
        self._room.set()  # a paused consume loop sees it at once

    def _job_left(self, job: Job, finished: bool) -> None:
        key = job.message.partition_key
        size = _size(job.message)
        self._buffered_bytes -= size
        # a message of no bytes (a tombstone without a key, an unreadable record) leaves the sum
        # at 0, which is dropped: another of them may leave after it
        if (partition_bytes := self._partition_bytes.get(key, 0) - size) > 0:
            self._partition_bytes[key] = partition_bytes
        else:
            self._partition_bytes.pop(key, None)
        taken_in = job.taken_in
        if finished and taken_in is not None:
            self._offsets.finish(key, job.message.offset, taken_in)
        if key in self._consumer.held and self._releasable(key, partition_bytes):
            self._release(key)
            log.info("partition_released", topic=key[0], partition=key[1])
        elif self._may_resume():  # wake the consumer only when it may resume fetching
            self._room.set()

    def _releasable(self, key: PartitionKey, partition_bytes: int) -> bool:
        """A held partition may be fetched again once it is down to half of every limit that holds
        it. One held for its share of the buffer whose messages finish while its oldest one does
        not is then held by that one alone: its reason becomes ``uncommitted`` (a hold that
        alerts), not flow control for as long as that message is stuck."""
        if key in self._rewinding:
            return False
        room = (
            self._offsets.unfinished_of(key) <= self._partition_share // 2
            and partition_bytes <= self._partition_bytes_share // 2
        )
        pending = self._offsets.pending_of(key)
        if pending <= self._uncommitted_limit // 2:
            return room
        if room and self._consumer.hold_reason(key) != "uncommitted":
            self._consumer.hold(key, "uncommitted")
            log.warning(
                "partition_held",
                topic=key[0],
                partition=key[1],
                reason="uncommitted",
                uncommitted=pending,
                unfinished=self._offsets.unfinished_of(key),
                unfinished_bytes=partition_bytes,
            )
        return False

    async def _commit(self, keys: set[PartitionKey] | None = None) -> None:
        async with self._commit_lock:
            positions = self._offsets.to_commit(keys)
            if not positions:
                return
            try:
                await self._consumer.commit(positions)
            except BrokerUnavailable as exc:
                log.warning("commit_failed", detail=str(exc), partitions=len(positions))
                return
            self._offsets.committed(positions)
            self.metrics.commits.inc()

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_s)
            try:
                await self._commit()
            except Exception as exc:  # a bug here must not end every later commit, unseen
                log.exception("commit_round_failed", error=type(exc).__name__)

    async def _watch_health(self) -> None:
        while True:
            try:
                await self._check_health()
            except Exception as exc:  # a bug here must not freeze readiness and lag, unseen
                log.exception("health_check_failed", error=type(exc).__name__)
            await asyncio.sleep(_HEALTH_EVERY_S)

    async def _check_health(self) -> None:
        try:
            listed = await self._consumer.ping()
        except BrokerUnavailable as exc:
            # Not ready at once; paused from the second check in a row (one slow metadata answer,
            # a broker of several restarting, is no outage). A pause like any outage's
            # (``coc_worker_paused``, ``worker_paused``, the pause count): an idle worker writes
            # nothing, so only this check learns that the broker is away, and the alerts on a
            # pause never fired for it. The probe is this same request.
            if not self._broker_answered:
                self._gate.trip(exc, self._consumer.ping)
            self._broker_answered = False
        else:
            self._broker_answered = True
            # Back: if this check paused it, probe now, not after a backoff of up to
            # probe_max_delay_s (30 s).
            self._gate.probe_now(BrokerUnavailable.kind, self._consumer.ping)
            self._note_missing_topics(listed)
            if self._topics_missing and self.settings.create_topics:
                await self._create_missing_topics()
        await self._report_lag()

    async def _report_lag(self) -> None:
        """Lag from this member's last commit or, before its first one, from the group's: without
        that base a restarted pod reported no lag for a backlog it could not work off (the API
        away), and each partition's lag came back only after its first commit. A partition the
        group never committed is read from the log's start, and its lag counts from there: a new
        group (or one whose offsets expired) whose events could not finish showed no lag at all.
        The group's offset is looked up once per assignment (only this member commits the
        partition now); the log's start each round (retention moves it)."""
        for key in list(self._assigned or ()):
            high = self._consumer.highwater(key)
            if high is None:
                continue
            position = self._offsets.committed_position(key)
            if position is None:
                if not self._broker_answered and (
                    key not in self._group_committed or self._group_committed[key] is None
                ):
                    continue  # a lookup would wait out its timeout, holding readiness back
                assignment = self._assignment
                try:
                    if key not in self._group_committed:
                        found = await self._consumer.group_committed(key)
                        if assignment is not self._assignment:
                            continue  # revoked (and maybe assigned back) meanwhile: asked again
                        self._group_committed[key] = found
                    position = self._group_committed[key]
                    if position is None:
                        position = await self._consumer.log_start(key)
                except BrokerUnavailable:
                    return  # the broker check above says so; asked again on the next round
                if assignment is not self._assignment:
                    continue  # revoked meanwhile: its lag is another member's now
            self.metrics.lag.labels(partition=str(key[1])).set(max(0, high - position))

    def _note_missing_topics(self, listed: set[str]) -> None:
        """Not ready while the broker lists one of the three topics no more (it lost its data, the
        topic was deleted): ready with partitions of a topic that was gone, nothing said so."""
        missing = {
            env_var(field): topic
            for field in ("input_topic", "results_topic", "dlq_topic")
            if (topic := getattr(self.settings, field)) not in listed
        }
        if missing and missing != self._topics_missing:
            log.error("topics_missing", topics=missing)
        elif not missing and self._topics_missing:
            log.info("topics_listed_again", topics=self._topics_missing)
        self._topics_missing = missing
        self.metrics.topics_missing.set(len(missing))

    async def _create_missing_topics(self) -> None:
        """With ``create_topics`` on, what the broker lists no more (it lost its data) is made again,
        as at start: the worker stayed not ready until someone restarted it."""
        try:
            created = await asyncio.wait_for(ensure_topics(self.settings), _TOPICS_CREATE_S)
        except (BrokerUnavailable, ConfigError, TimeoutError) as exc:
            log.warning("topics_not_created", detail=str(exc) or type(exc).__name__)
            return
        if created:
            log.info("topics_created", topics=created)

    async def _shutdown(self) -> None:
        s = self.settings
        self._stopping.set()
        log.info("worker_stopping", in_flight=len(self._lanes))
        with contextlib.suppress(Exception):
            self._consumer.pause()
        if not await self._drain(s.shutdown_grace_s):
            await self._lanes.close(timeout_s=5.0)
        await cancel_and_wait(self._tasks)
        # With the broker gone, aiokafka would retry each of these for ever: bound them, so that a
        # stop request always ends the process. What is not committed is read again (deduplicated).
        await bounded_step(self._commit(), "final_commit")
        await self._gate.close()
        await bounded_step(self._consumer.stop(), "consumer_stop")
        await bounded_step(self._publisher.stop(), "producer_stop")
        await self._client.close()
        if self._rate_limit is not None:
            await self._rate_limit.close()
        await self._pipeline.handed_on()  # a job cancelled twice may still be handing its claim on
        await self._store.close()
        await self._http.stop()
        if self._ingress is not None:
            await bounded_step(self._ingress.stop(), "ingress_stop")  # its producer, the broker gone
        log.info("worker_stopped")

    async def _drain(self, grace_s: float) -> bool:
        """Wait up to ``grace_s`` for the jobs in hand, polling meanwhile as a paused worker does:
        aiokafka leaves the group of a member that has not polled for ``kafka_max_poll_interval_ms``
        (10 s at least; the grace is 25 s by default), and the final commit would then be refused.

        Nor while the worker is paused and every running job has waited at the gate (or for jobs
        that do: one of its event, the API slots' holders) for ``_PAUSED_STOP_WAIT_S``: none of
        them can finish before the outage ends, and a stop during one (a rolling update, a node
        drained) waited out the whole grace. Meanwhile every cause but a flapping one is probed
        each turn, not after its backoff (up to ``probe_max_delay_s``): an outage that ends within
        the wait lets the jobs finish (``Gate.probe_every_cause_now``). Their claims are handed on
        as they are cancelled (``Pipeline._let_go``); their messages are read again by the next
        owner."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        polling = True
        stalled_since: float | None = None  # since when every running job is held by the pause
        while not await self._lanes.wait_idle(min(_FETCH_TIMEOUT_S, max(0.0, deadline - loop.time()))):
            now = loop.time()
            if now >= deadline or self._hurried.is_set():
                self._abandon("stopped", _every, "shutdown_grace_exceeded")
                return False
            held = (
                not self._gate.is_open
                and self._gate.waiting + self._pipeline.waiting_on_other_jobs >= self._lanes.running
            )
            if not held:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = now
            elif now - stalled_since >= _PAUSED_STOP_WAIT_S:
                self._abandon(
                    "stopped",
                    _every,
                    "shutdown_while_paused",
                    paused_by=self._gate.causes,
                )
                return False
            if held:
                self._gate.probe_every_cause_now()  # each turn (0.5-1 s): the wait sees the outage end
            if not polling:
                continue
            try:  # bounded: during a rebalance aiokafka's poll waits for the new assignment
                await asyncio.wait_for(self._consumer.fetch(0, 0.0), _FETCH_TIMEOUT_S)
            except (BrokerUnavailable, TimeoutError):
                pass
            except KafkaClientStopped:
                # The group coordination ended (the stop this shutdown follows, most likely):
                # nothing left to keep alive, and the jobs in hand still get their grace.
                polling = False
        return True

    def _abandon(self, kind: str, which: Callable[[Job], bool], event: str, **fields: Any) -> None:
        """The jobs about to be cancelled without an outcome here (their claims are handed on; the
        partition's next reader reads their messages again): counted, and named by partition and
        offsets, so that consumed minus outcomes can be accounted for. Not those cancelled before
        (an earlier revoke's, still unwinding: counted then), nor those whose outcome is written
        (a dead letter still owed: counted as outcomes)."""
        jobs = [job for job in self._lanes.select(which, cancelled=False) if not job.outcome_written]
        self.metrics.abandoned.labels(kind=kind).inc(len(jobs))
        offsets: dict[str, list[int]] = {}
        for job in jobs:
            m = job.message
            offsets.setdefault(f"{m.topic}/{m.partition}", []).append(m.offset)
        log.warning(
            event,
            abandoned=len(jobs),
            # first and last offset and how many, per partition: bounded whatever the buffer holds
            offsets={part: f"{min(o)}-{max(o)} ({len(o)})" for part, o in sorted(offsets.items())},
            **fields,
        )

    # --- rebalance (called by the consumer inside the group protocol) -------------------------------
    async def on_revoked(self, partitions: set[PartitionKey]) -> None:
        if not partitions:
            return

        def revoked(job: Job) -> bool:
            return job.message.partition_key in partitions

        # Before the first await: messages of these partitions fetched just before the rebalance
        # and dispatched while the revoke waits are not taken (they would run after it returned).
        self._revoking |= partitions
        try:
            await self._revoke(partitions, revoked)
        finally:
            self._revoking -= partitions

    async def _revoke(self, partitions: set[PartitionKey], revoked: Callable[[Job], bool]) -> None:
        pending = self._lanes.matching(revoked)
        if pending and not await self._lanes.wait_for(revoked, self.settings.revoke_grace_s):
            self._abandon("revoked", revoked, "revoke_grace_exceeded")
            self._lanes.drop(revoked)
            await self._lanes.wait_for(revoked, REVOKE_CANCEL_WAIT_S)
        await self._commit(partitions)
        self._offsets.drop(partitions)
        for key in partitions:
            self._rewinding.pop(key, None)
            self._group_committed.pop(key, None)
        # Its tail is dropped with its offsets: held on, a partition assigned back at once (eager
        # rebalances revoke everything first) would never have a job left to release it.
        self._consumer.forget_held(partitions)
        for _, partition in partitions:  # another member reports their lag now
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(partition))
        if self._assigned is not None:
            self._assigned -= partitions
        log.info("partitions_revoked", partitions=sorted(f"{t}/{p}" for t, p in partitions), drained=pending)

    async def on_assigned(self, partitions: set[PartitionKey]) -> None:
        self._assignment = object()
        for key in partitions:
            self._offsets.assign(key)
            self._group_committed.pop(key, None)  # another member may have committed it since
        self._assigned = set(partitions)
        self._consumer.reapply_pause()
        log.info("partitions_assigned", partitions=sorted(f"{t}/{p}" for t, p in partitions))


def _every(_: Job) -> bool:
    return True


def _size(message: Message) -> int:
    """What a message holds in the buffer, as ``max_buffered_bytes`` counts it."""
    return len(message.value or b"") + len(message.key or b"")


class _KeyWatch:
    """Events whose message key is not their ticket_id. A ticket's events keep their order only
    while they share a partition, which keying by ticket_id makes sure of: without a key (or with
    one its events do not share) a later step may run first and be refused. Counted
    (``coc_worker_key_mismatches_total``) and said at most once a minute, with how many since:
    a producer that sets no key sends every message so."""

    EVERY_S = 60.0

    def __init__(self, metrics: Metrics) -> None:
        self._counters = {kind: metrics.key_mismatches.labels(kind=kind) for kind in KEY_MISMATCH_KINDS}
        self._since = 0
        self._next_at = 0.0

    def mismatch(self, message: Message, ticket_id: str) -> None:
        kind = "missing" if message.key is None else "other"
        self._counters[kind].inc()
        self._since += 1
        now = time.monotonic()
        if now < self._next_at:
            return
        log.warning(
            "message_key_not_ticket_id",
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            ticket_id=ticket_id,
            # Redacted whole, then cut: a key may hold a secret (a producer's mistake).
            key=None if message.key is None else redact_cut(message.key.decode("utf-8", "replace"), 80),
            since_last_said=self._since,
            detail="key each event by its ticket_id: a ticket's events keep their order only on one partition",
        )
        self._since = 0
        self._next_at = now + self.EVERY_S
