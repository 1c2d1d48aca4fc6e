"""The HTTP ingress for monitoring systems: events in over HTTP, onto the input topic.

Routes (mounted in the worker's HTTP server when ``COC_WORKER_INGEST_ENABLED``, or served alone
by ``coc-worker ingest``)::

    POST /v1/events          one event (a JSON object) or a batch (a JSON array)
                             202 {"event_ids": [...]}: every event validated, produced keyed by
                                 ticket_id with acks=all and acknowledged by the broker
                             400 {"error", "invalid": [{"index", "errors": [{"path", "message"}]}]}:
                                 nothing was produced
    POST /v1/alertmanager    an Alertmanager webhook notification (payload version 4)
                             202 {"event_ids": [...], "skipped": [{"index", "reason", ...}]}:
                                 the events produced in slices of ``COC_WORKER_INGEST_MAX_BATCH``, every slice
                                 acknowledged; a skipped firing alert that named a change
                                 (``invalid``) and ``truncatedAlerts`` are logged as warnings

Both: 401 without ``Authorization: Bearer <token>`` when tokens are configured
(``COC_WORKER_INGEST_TOKENS[_FILE]``, separated by commas or whitespace, re-read per request so a
rotated secret file is picked up; once configured, an empty list lets nobody in), 415 unless the
body is ``application/json``, 413 over ``COC_WORKER_INGEST_MAX_BODY_BYTES`` (and, on
``/v1/events`` only, over ``COC_WORKER_INGEST_MAX_BATCH`` events: Alertmanager cannot split a group), 408 when the
body does not arrive within ``body_timeout_s``, 400 for a body that cannot be decoded, 503 when the
broker does not acknowledge every event (``written`` and ``not_written`` list the event ids; nothing
is lost by retrying: the event ids dedupe). Alertmanager does not retry a 4xx: every refusal on its
route is logged. Responses and logs never carry a token or an input value; errors name JSON paths
only. Served alone, ``/readyz`` follows the broker (a metadata request every few seconds).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from worker.cancel import bounded_step, cancel_and_wait, unless_stopped
from worker.decode import describe, parse_json
from worker.errors import BrokerUnavailable, ConfigError, InvalidEvent
from worker.health import HealthServer
from worker.logs import get_logger
from worker.retry import StartupWait
from worker.settings import WorkerSettings, split_tokens
from worker.tools import alertmanager
from worker.tools.events import encode, event_errors, is_valid_event
from worker.tools.kafka_io import EventProducer, OutRecord, PartialWrite
from worker.tracing import HEADER as TRACEPARENT
from worker.tracing import new_trace, parse

log = get_logger(__name__)

_READ_CHUNK = 64 * 1024
#: Of a refused request: the invalid events listed, and the errors listed for each.
_INVALID_SHOWN = 20
_ERRORS_SHOWN = 20
_Handler = Callable[[web.Request, Any], Awaitable[web.Response]]
#: Why alerts were not produced (``coc_worker_ingest_skipped``): the skip reasons, and ``truncated``
#: for the alerts Alertmanager cut from the notification itself (``max_alerts``).
SKIPPED_REASONS = (*alertmanager.SKIP_REASONS, "truncated")


def _error(status: int, error: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "detail": detail, **extra}, status=status)


#: The bodies the ingress holds at once, in multiples of ``ingest_max_body_bytes``. A request holds
#: its body, the parsed document and its records until the broker acknowledges them: in an outage,
#: up to the producer's timeout (30 s), and ~11 times its body in memory (measured: 40 concurrent
#: 1 MB notifications took the process from 70 to 526 MB, past the 256 Mi of the README's
#: Deployment). Above it a request is answered 503 at once, with Retry-After: Alertmanager retries.
_IN_HAND_BODIES = 4
#: The Retry-After of that answer, in seconds.
_BUSY_RETRY_AFTER_S = 5


def _busy(budget: int) -> web.Response:
    response = _error(
        503,
        "busy",
        f"the ingress holds {budget} bytes of requests not yet acknowledged by the broker; retry",
    )
    response.headers["Retry-After"] = str(_BUSY_RETRY_AFTER_S)
    return response


def _error_code(response: web.Response) -> str | None:
    """The ``error`` of a refusal made by ``_error`` (what its log line names)."""
    try:
        found = json.loads(response.body) if isinstance(response.body, bytes) else None
    except ValueError:
        return None
    code = found.get("error") if isinstance(found, dict) else None
    return code if isinstance(code, str) else None


class _NotAcknowledged(Exception):
    """Some events were not acknowledged: which were (``written``) and which not, by event id."""

    def __init__(self, detail: str, written: list[str], not_written: list[str]) -> None:
        super().__init__(detail)
        self.written = written
        self.not_written = not_written


def _in_ticket_order(items: list[dict[str, Any]], acked: list[Any]) -> list[bool]:
    """Which events of a partly acknowledged slice count as written: those acknowledged with no
    earlier event of their ticket left unacknowledged. One stored after such a gap is out of
    order (the retry would put the earlier event behind it, and the worker would find, say, an
    end before its start and dead-letter it): it is reported not written, so that the retry sends
    it again after the earlier one, and the worker takes that later message of it."""
    gaps: set[str] = set()
    in_order = []
    for item, where in zip(items, acked, strict=True):
        ticket = str(item["ticket_id"])
        if where is None:
            gaps.add(ticket)
        in_order.append(where is not None and ticket not in gaps)
    return in_order


class Ingress:
    """``POST /v1/events`` and ``POST /v1/alertmanager``; owns one producer to the input topic."""

    def __init__(
        self,
        settings: WorkerSettings,
        registry: CollectorRegistry | None = None,
        *,
        body_timeout_s: float = 30.0,
        broker_check_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._producer = EventProducer(settings)
        self._started = False
        self._checked = False  # the settings checked and said (``start``)
        #: Tokens are required once either setting is given, even while the list is empty.
        self._auth = settings.ingest_auth_configured
        if not self._auth and not settings.ingest_allow_anonymous:
            # It let any request in, and a forgotten variable opened the API to the whole network
            # under the worker's credentials (it listens on 0.0.0.0 by default).
            raise ConfigError(
                "the ingress needs tokens: set COC_WORKER_INGEST_TOKENS or COC_WORKER_INGEST_TOKENS_FILE,"
                " or COC_WORKER_INGEST_ALLOW_ANONYMOUS=true to let anyone who reaches its port post"
                " events, which the worker sends with its own credentials"
            )
        self._body_timeout_s = body_timeout_s
        #: Bytes of the bodies in hand (read, not yet answered): bounded (``_IN_HAND_BODIES``).
        self._in_hand_bytes = 0
        self._broker_check_s = broker_check_s
        #: Whether the broker answered last: not before its first answer (a ``/readyz`` that said
        #: ``"broker": true`` while waiting for it sent a reader to the wrong place).
        self._broker_ok = False
        self._watcher: asyncio.Task[None] | None = None
        registry = registry or CollectorRegistry()
        self._requests = Counter(
            "coc_worker_ingest_requests",
            "Ingress requests by route and HTTP status.",
            ["route", "code"],
            registry=registry,
        )
        self._events = Counter(
            "coc_worker_ingest_events",
            "Events produced by the ingress, by route.",
            ["route"],
            registry=registry,
        )
        self._skipped = Counter(
            "coc_worker_ingest_skipped",
            "Alerts not produced, by route and reason (resolved, not_firing, no_ticket_labels, "
            "invalid, truncated by Alertmanager).",
            ["route", "reason"],
            registry=registry,
        )
        for reason in SKIPPED_REASONS:  # every reason shows from the start, at 0
            self._skipped.labels(route="alertmanager", reason=reason)

    # --- lifecycle -----------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/events", self._post_events), web.post("/v1/alertmanager", self._post_alerts)]

    async def start(self) -> None:
        """Tried again while the broker is away (``Worker._once_reachable``): the settings are
        checked and said once."""
        if not self._checked:
            tokens = self._tokens()  # fail at start, not at the first request, on an unreadable file
            if not self._auth:
                log.warning("ingest_auth_disabled", setting="COC_WORKER_INGEST_ALLOW_ANONYMOUS")
            elif not tokens:
                log.warning("ingest_no_tokens", detail="every request is refused until tokens are set")
            self._checked = True
        await self._producer.start()
        self._broker_ok = True  # its start is the broker's first answer (the metadata it fetched)
        self._started = True
        self._watcher = asyncio.create_task(self._watch_broker(), name="ingest-broker-check")
        log.info("ingest_started", topic=self._settings.input_topic, auth=self._auth)

    async def stop(self) -> None:
        self._started = False
        if self._watcher is not None:
            await cancel_and_wait([self._watcher])
        self._broker_ok = False
        await self._producer.stop()

    def status(self) -> dict[str, Any]:
        """Ready while the broker answers: served alone, the ingress is only as good as its producer."""
        return {
            "ready": self._started and self._broker_ok,
            "broker": self._broker_ok,
            "topic": self._settings.input_topic,
        }

    async def _watch_broker(self) -> None:
        while True:
            try:
                await self._producer.ping()
            except BrokerUnavailable:
                if self._broker_ok:
                    log.warning("ingest_broker_unreachable")
                self._broker_ok = False
            else:
                self._broker_ok = True
            await asyncio.sleep(self._broker_check_s)

    # --- handlers ------------------------------------------------------------------------------------
    async def _post_events(self, request: web.Request) -> web.StreamResponse:
        return await self._counted("events", request, self._events_body)

    async def _post_alerts(self, request: web.Request) -> web.StreamResponse:
        return await self._counted("alertmanager", request, self._alerts_body)

    async def _counted(self, route: str, request: web.Request, handle: _Handler) -> web.Response:
        code = "500"  # whatever escapes is answered 500 by aiohttp: count it so
        try:
            response = await self._guarded(request, handle)
            code = str(response.status)
            # Alertmanager does not retry a 4xx: the notification is gone, so say so (a 401 is
            # logged as it is answered).
            if route == "alertmanager" and 400 <= response.status < 500 and response.status != 401:
                log.warning("ingest_refused", route=route, code=code, error=_error_code(response))
            return response
        finally:
            self._requests.labels(route=route, code=code).inc()

    async def _guarded(self, request: web.Request, handle: _Handler) -> web.Response:
        """Auth, then the size limit, then strict JSON; ``handle(document)`` does the rest."""
        if not self._started:  # the worker's HTTP server is up before its ingress (Worker._start)
            return _error(503, "not_started", "the ingress is not started (waiting for the broker); retry")
        if self._auth:
            try:
                tokens = self._tokens()
            except ConfigError as exc:
                # Why (a short token, a file that is not UTF-8): the message names a length, never
                # a token. Without it, a readable file with a bad token looked unreadable.
                log.error("ingest_tokens_unreadable", detail=str(exc))
                return _error(503, "auth_unavailable", "the ingress cannot read its tokens")
            if not _authorized(request, tokens):
                return self._unauthorized(request)
        if request.content_type != "application/json":  # also refuses a browser's no-preflight post
            return _error(415, "unsupported_media_type", "the body must be application/json")
        budget = _IN_HAND_BODIES * self._settings.ingest_max_body_bytes
        if not self._room_for(request.content_length or 0, budget):  # before the body is read
            return _busy(budget)
        try:
            async with asyncio.timeout(self._body_timeout_s):
                body = await self._read_limited(request)
        except TimeoutError:
            return _error(408, "request_timeout", f"the body did not arrive within {self._body_timeout_s:g}s")
        except web.RequestPayloadError:  # a broken chunked or compressed body
            return _error(400, "bad_body", "the body could not be read (its encoding is broken)")
        if body is None:
            limit = self._settings.ingest_max_body_bytes
            return _error(413, "too_large", f"the body is over {limit} bytes")
        if not self._room_for(len(body), budget):  # a chunked body, or others read meanwhile
            return _busy(budget)
        self._in_hand_bytes += len(body)
        try:
            return await self._parsed(request, body, handle)
        finally:
            self._in_hand_bytes -= len(body)

    def _room_for(self, size: int, budget: int) -> bool:
        """Whether a body of ``size`` bytes fits beside those in hand; one alone always does."""
        return self._in_hand_bytes == 0 or self._in_hand_bytes + size <= budget

    async def _parsed(self, request: web.Request, body: bytes, handle: _Handler) -> web.Response:
        """Strict JSON, then ``handle(document)``; a write the broker did not acknowledge is a 503."""
        try:
            document = parse_json(body, self._settings.ingest_max_body_bytes)
        except InvalidEvent as exc:
            return _error(400, exc.reason, exc.detail)
        try:
            return await handle(request, document)
        except _NotAcknowledged as exc:
            return _error(
                503,
                "broker_unavailable",
                "the broker did not acknowledge every event; retry with the same event ids (those "
                "written are applied once)",
                written=exc.written,
                not_written=exc.not_written,
            )

    async def _read_limited(self, request: web.Request) -> bytes | None:
        """The body, or None when it is over the limit (read no further than the limit)."""
        limit = self._settings.ingest_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(_READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)

    async def _events_body(self, request: web.Request, document: Any) -> web.Response:
        items = document if isinstance(document, list) else [document]
        if not items:
            return _error(400, "empty_batch", "the array holds no event")
        if len(items) > self._settings.ingest_max_batch:
            return _error(
                413, "too_many_events", f"at most {self._settings.ingest_max_batch} events per request"
            )
        # Listed for the first few invalid events only, each with its first few errors: listing
        # every error of every event of a 1 MiB batch kept the event loop busy for seconds.
        invalid: list[dict[str, Any]] = []
        invalid_count = 0
        for index, item in enumerate(items):
            if len(invalid) >= _INVALID_SHOWN:
                invalid_count += not is_valid_event(item, self._settings.max_event_bytes)
                continue
            errors = event_errors(item, self._settings.max_event_bytes)
            if errors:
                where = f"$[{index}]" if isinstance(document, list) else "$"
                entry: dict[str, Any] = {
                    "index": index,
                    "errors": [
                        {"path": where + path[1:], "message": msg} for path, msg in errors[:_ERRORS_SHOWN]
                    ],
                }
                if len(errors) > _ERRORS_SHOWN:
                    entry["more_errors"] = len(errors) - _ERRORS_SHOWN
                invalid.append(entry)
                invalid_count += 1
        if invalid:
            log.info("ingest_rejected", route="events", invalid=invalid_count, events=len(items))
            return _error(
                400, "invalid_events", "nothing was produced", invalid=invalid, invalid_count=invalid_count
            )
        event_ids = await self._produce(request, items, route="events")
        return web.json_response({"event_ids": event_ids}, status=202)

    async def _alerts_body(self, request: web.Request, document: Any) -> web.Response:
        try:
            notification = alertmanager.Notification.model_validate(document)
        except ValidationError as exc:
            errors = [{"path": path, "message": msg} for path, msg in describe(exc)[:_ERRORS_SHOWN]]
            return _error(400, "not_an_alertmanager_notification", "see errors", errors=errors)
        if notification.version != alertmanager.SUPPORTED_VERSION:
            return _error(
                400, "unsupported_version", f"webhook payload version {alertmanager.SUPPORTED_VERSION} only"
            )
        events, skipped = alertmanager.to_events(notification, self._settings.max_event_bytes)
        self._report_skipped(notification, skipped)
        # No limit on the count here: Alertmanager cannot split a group, and would get the same
        # refusal on every repeat. The body size bounds it; the events go in acknowledged slices.
        event_ids = await self._produce(request, events, route="alertmanager") if events else []
        return web.json_response(
            {"event_ids": event_ids, "skipped": [s.as_json() for s in skipped]}, status=202
        )

    def _report_skipped(
        self, notification: alertmanager.Notification, skipped: list[alertmanager.Skipped]
    ) -> None:
        """Count every skipped alert; warn of those that were failures lost (a firing alert that
        named a change) and of the alerts Alertmanager itself cut. Never a label value."""
        route = "alertmanager"
        for item in skipped:
            self._skipped.labels(route=route, reason=item.reason).inc()
            if item.warns:
                log.warning("ingest_alert_skipped", route=route, **item.log_fields())
        if notification.truncatedAlerts > 0:
            self._skipped.labels(route=route, reason="truncated").inc(notification.truncatedAlerts)
            log.warning(
                "ingest_alerts_truncated",
                route=route,
                truncated=notification.truncatedAlerts,
                detail="Alertmanager left these alerts out of the notification (max_alerts)",
            )

    async def _produce(self, request: web.Request, items: list[dict[str, Any]], *, route: str) -> list[str]:
        """Produce every event keyed by ticket, in slices of ``ingest_max_batch`` (each acknowledged
        before the next); returns once the broker acknowledged them all. Raises ``_NotAcknowledged``
        naming the events written and not when it did not."""
        trace = parse(request.headers.get(TRACEPARENT)) or new_trace()
        records = [
            OutRecord(
                str(item["ticket_id"]).encode(),
                encode(item),
                [(TRACEPARENT, trace.child_traceparent().encode())],
            )
            for item in items
        ]
        event_ids = [str(item["event_id"]) for item in items]
        step = self._settings.ingest_max_batch
        for start in range(0, len(records), step):
            chunk = records[start : start + step]
            try:
                await self._producer.send_many(self._settings.input_topic, chunk)
            except BrokerUnavailable as exc:
                acked = exc.acked if isinstance(exc, PartialWrite) else [None] * len(chunk)
                stored = sum(where is not None for where in acked)
                self._events.labels(route=route).inc(stored)
                ids = event_ids[start : start + step]
                in_order = _in_ticket_order(items[start : start + step], acked)
                pairs = list(zip(ids, in_order, strict=True))
                written = event_ids[:start] + [i for i, ok in pairs if ok]
                # not acknowledged: maybe stored (a timeout), maybe not; the retry dedupes either way
                not_written = [i for i, ok in pairs if not ok] + event_ids[start + step :]
                log.warning(
                    "ingest_broker_unavailable",
                    route=route,
                    detail=str(exc),
                    events=len(items),
                    written=len(written),
                    not_written=len(not_written),
                    trace_id=trace.trace_id,
                )
                raise _NotAcknowledged(str(exc), written, not_written) from exc
            self._events.labels(route=route).inc(len(chunk))
        log.info("ingest_accepted", route=route, events=len(items), trace_id=trace.trace_id)
        return event_ids

    # --- auth ----------------------------------------------------------------------------------------
    def _tokens(self) -> list[str]:
        # each token on its own (``secret`` registers them with the log redactor)
        return split_tokens(self._settings.secret("ingest_tokens") or "")

    @staticmethod
    def _unauthorized(request: web.Request) -> web.Response:
        log.warning("ingest_unauthorized", path=request.path, remote=request.remote)
        return web.json_response(
            {"error": "unauthorized", "detail": "a valid Authorization: Bearer token is required"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="coc-worker"'},
        )


def _authorized(request: web.Request, tokens: list[str]) -> bool:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return False
    # A header's non-UTF-8 bytes arrive as surrogates: keep them, so they simply match nothing.
    offered = credentials.strip().encode("utf-8", "surrogateescape")
    # compare with every token (no early exit), in constant time per token
    matches = [hmac.compare_digest(offered, token.encode()) for token in tokens]
    return any(matches)


async def serve(
    settings: WorkerSettings, stop: asyncio.Event, ready: Callable[[int], None] | None = None
) -> None:
    """``coc-worker ingest``: the ingress on its own HTTP server (with /healthz, /readyz, /metrics);
    ``ready(port)`` once it takes events.

    It serves first and waits for the broker as the worker does (``startup_wait_s``, its routes
    answering 503 meanwhile): started during a broker outage it exited at once, and a rollout
    then crash-looped through the outage the ingress is there to carry alerts across."""
    # Its own metrics only: the worker's (outcomes, API calls, lag) would all show 0 here.
    registry = CollectorRegistry()
    ingress = Ingress(settings, registry)
    startup = StartupWait(settings)
    server = HealthServer(
        settings, registry, lambda: {**ingress.status(), "waiting_for": startup.waiting_for}, ingress.routes()
    )
    startup.begin()
    await server.start()
    starting = asyncio.ensure_future(startup.once_reachable("broker", ingress.start))
    try:
        log.info("ingest_listening", host=settings.http_host, port=server.port)
        if await unless_stopped(starting, stop) is not None:
            starting.result()  # the broker never answered within the wait: exit 1
            if ready is not None and server.port is not None:
                ready(server.port)  # serving, and taking events
            await stop.wait()
    finally:
        await cancel_and_wait([starting])
        await server.stop()
        # bounded as the worker's steps: the producer waited for unsent records until they expired
        # (30 s with the broker gone), the whole of a pod's default grace
        await bounded_step(ingress.stop(), "ingress_stop")
