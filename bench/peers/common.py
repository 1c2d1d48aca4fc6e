"""What every peer shares: its command line, and the pipeline step a user of that framework would write.

The step is the worker's pipeline without its framework: validate with the contract's pydantic
models, build the same request body, sign it with the same AK/SK signer, ``PUT`` it (retrying
connection errors, 408/429/5xx a few times), and build the same ``OutcomeEvent``. Each peer adds
only what its framework gives: consuming, ordering, committing (after the outcome is confirmed:
at-least-once) and producing. No dedup store and no dead-letter topic: the peers are the
*framework* baseline, the worker's extra guarantees are its own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from schemas.api import UpdateTicketResponse
from schemas.events import CHANGE_EVENT_ADAPTER
from schemas.outcomes import OutcomeEvent, OutcomeStatus, SourceRef
from worker.mapping import request_path, request_wire
from worker.signing import sign

RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
MAX_ATTEMPTS = 3


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--api", required=True, help="simulator base URL")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=100)
    parser.add_argument("--session-timeout-ms", type=int, default=10_000)
    parser.add_argument("--heartbeat-ms", type=int, default=3_000)
    args = parser.parse_args()
    args.ak = os.environ["BENCH_API_AK"]  # secrets by environment, as the worker takes them
    args.sk = os.environ["BENCH_API_SK"]
    return args


def group_consumer(args: argparse.Namespace, *topics: str) -> AIOKafkaConsumer:
    """A consumer-group member as the aiokafka peers run one: offsets committed by the peer after
    its outcome is written, from the earliest offset, with the command line's group timings."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        session_timeout_ms=args.session_timeout_ms,
        heartbeat_interval_ms=args.heartbeat_ms,
    )


@dataclass(slots=True)
class ApiResult:
    status: OutcomeStatus
    attempts: int
    http_status: int | None = None
    error_code: str | None = None
    error_msg: str | None = None


class Step:
    """validate -> map -> sign -> PUT (with retries) -> OutcomeEvent, for one consumed message."""

    def __init__(self, api: str, ak: str, sk: str, connections: int) -> None:
        self._api = api.rstrip("/")
        self._host = urlsplit(api).netloc
        self._ak, self._sk = ak, sk
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(1, self._connections)),
            timeout=aiohttp.ClientTimeout(total=13, sock_connect=3, sock_read=10),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def process(
        self, value: bytes | None, topic: str, partition: int, offset: int, received_at: datetime
    ) -> tuple[bytes | None, bytes]:
        """The outcome's key and JSON value for one message (never raises for a bad message)."""
        source = SourceRef(topic=topic, partition=partition, offset=offset)
        try:
            event = CHANGE_EVENT_ADAPTER.validate_json(value or b"")
        except ValidationError as exc:
            outcome = self._outcome(
                None, source, received_at, ApiResult(OutcomeStatus.INVALID, 0, error_msg=str(exc)[:500]), None
            )
            return None, outcome.model_dump_json().encode()
        body = request_wire(event)
        result = await self._call(
            event.ticket_id, json.dumps(body, separators=(",", ":")).encode(), event.event_id
        )
        outcome = self._outcome(event, source, received_at, result, body)
        return event.ticket_id.encode(), outcome.model_dump_json().encode()

    async def _call(self, ticket_id: str, payload: bytes, event_id: str) -> ApiResult:
        assert self._session is not None
        path = request_path(ticket_id)
        attempts = 0
        while True:
            attempts += 1
            headers = sign(
                ak=self._ak,
                sk=self._sk,
                method="PUT",
                host=self._host,
                path=path,
                headers={"Content-Type": "application/json;charset=UTF-8", "X-Event-Id": event_id},
                body=payload,
            )
            try:
                async with self._session.put(self._api + path, data=payload, headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempts >= MAX_ATTEMPTS:
                    return ApiResult(OutcomeStatus.FAILED, attempts, error_msg=type(exc).__name__)
                await asyncio.sleep(0.1 * 2**attempts)
                continue
            if status in RETRYABLE and attempts < MAX_ATTEMPTS:
                await asyncio.sleep(0.1 * 2**attempts)
                continue
            try:
                parsed: UpdateTicketResponse | None = UpdateTicketResponse.model_validate_json(raw)
            except ValidationError:
                parsed = None
            code = parsed.error_code if parsed else None
            if 200 <= status < 300 and parsed is not None and parsed.succeeded:
                return ApiResult(OutcomeStatus.APPLIED, attempts, status, code)
            kind = OutcomeStatus.FAILED if status in RETRYABLE else OutcomeStatus.REJECTED
            return ApiResult(kind, attempts, status, code, parsed.error_msg if parsed else None)

    def _outcome(
        self,
        event: Any,
        source: SourceRef,
        received_at: datetime,
        result: ApiResult,
        body: dict[str, Any] | None,
    ) -> OutcomeEvent:
        finished_at = datetime.now(UTC)
        return OutcomeEvent(
            event_id=event.event_id if event else None,
            ticket_id=event.ticket_id if event else None,
            sub_ticket_id=getattr(event, "sub_ticket_id", None),
            type=event.type.value if event else None,
            status=result.status,
            reason=None if result.status is OutcomeStatus.APPLIED else result.status.value,
            attempts=result.attempts,
            http_status=result.http_status,
            error_code=result.error_code,
            error_msg=result.error_msg,
            request=body,
            source=source,
            received_at=received_at,
            finished_at=finished_at,
            duration_ms=max(0.0, (finished_at - received_at).total_seconds() * 1000),
            worker=self.worker_id,
        )


def now() -> datetime:
    return datetime.now(UTC)


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@contextlib.asynccontextmanager
async def running(step: Step, producer: Service, consumer: Service) -> AsyncIterator[None]:
    """Start the step, the outcome producer and the consumer; stop them in reverse order.

    The consumer's stop may fail at shutdown (the broker or the group going away): that is ignored.
    """
    await step.start()
    await producer.start()
    await consumer.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        await producer.stop()
        await step.close()
