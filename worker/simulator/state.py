"""The simulator's configuration and its whole in-memory state (tickets, logs, counters, faults, keys).

Kept free of aiohttp so tests and the benchmark can read and steer it directly through
``sim.state``. Everything the admin endpoints do is a method here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.simulator.faults import FaultConfig, FaultInjector
from worker.simulator.tickets import Change, Seed, Ticket, TicketBook


class SimulatorConfig(BaseModel):
    """How one simulator run starts; ``POST /_sim/reset`` returns to exactly this."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    #: 0 binds a free port; ``SimulatorServer.url`` tells which.
    port: int = Field(default=0, ge=0, le=65535)
    #: AK -> SK. With no credentials and no tokens, authentication is off.
    credentials: dict[str, str] = Field(default_factory=dict, repr=False)
    tokens: set[str] = Field(default_factory=set, repr=False)
    #: Take any ticket and sub-ticket id (an unknown sub-ticket is ``pending``), for benchmarks: an
    #: unknown ticket reads as a fresh one and is stored once a write to it is accepted.
    auto_create: bool = False
    #: Tickets to start with, the seed file's JSON (see ``tickets.Seed``).
    seed: dict[str, Any] | None = None
    faults: FaultConfig = FaultConfig()
    rng_seed: int | None = 0
    request_log_size: int = Field(default=100_000, ge=1)
    #: Entries the applied log keeps (the last ones); None keeps every one, as the tests' ledgers
    #: need. Each entry holds its request body: a benchmark's log of every change made its
    #: garbage collector's full passes take tens of milliseconds, answers stalled behind them.
    applied_log_size: int | None = Field(default=None, ge=1)
    #: The ticket detail (``GET``) with the SDK detail model's keys only, as the real API is
    #: expected to answer: no sub-ticket ``state``, ``change_result`` or result fields. A
    #: sub-ticket change whose answer was lost can then not be confirmed from the ticket.
    detail_as_sdk: bool = False
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    #: How long stopping waits for in-flight requests (hung ones are released at once).
    shutdown_timeout_s: float = Field(default=1.0, ge=0.0)

    @field_validator("seed")
    @classmethod
    def _valid_seed(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            Seed.model_validate(value)
        return value


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class RequestRecord:
    """One API request as the simulator answered it.

    ``status`` is None when the connection was dropped; ``error_code`` is then still the service's
    own answer after a ``drop_after_apply`` (``GOM.00000000`` if the change was applied).
    """

    seq: int
    at: float
    method: str
    path: str
    status: int | None
    error_code: str | None
    event_id: str | None
    fault: str | None


class SimulatorState:
    """Tickets, the applied and request logs, counters, faults and credentials of one run."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        #: Set when the server stops: releases hung requests so shutdown is quick.
        self.stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self.book = TicketBook(auto_create=config.auto_create)
        #: Every state change, in order: ``{seq, at, ticket_id, sub_ticket_id, action,
        #: change_result, body, event_id, traceparent}``; ``at`` is epoch seconds.
        self.applied_log: list[dict[str, Any]] = []
        #: Every change counted (``seq`` and ``stats()["applied"]``), kept in the log or not.
        self.applied_total = 0
        self.requests: deque[RequestRecord] = deque(maxlen=config.request_log_size)
        #: Requests received, counted on arrival (``requests`` records them once answered)
        self.arrived = 0
        self.status_counts: Counter[str] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.injector = FaultInjector(config.faults, config.rng_seed)
        self.credentials: dict[str, str] = {}
        self.tokens: set[str] = set()
        self.revoked = False
        self.read_only = False
        self.write_only = False
        self.detail_as_sdk = config.detail_as_sdk
        self._request_seq = 0
        self.reset()

    def reset(self) -> None:
        """Back to the configured start: seed tickets, empty logs, configured faults and keys."""
        config = self._config
        self.book.tickets.clear()
        if config.seed is not None:
            self.book.seed(config.seed, now_ms=now_ms())
        self.applied_log.clear()
        self.applied_total = 0
        self.requests.clear()
        self.arrived = 0
        self.status_counts.clear()
        self.fault_counts.clear()
        self.injector = FaultInjector(config.faults, config.rng_seed)
        self.credentials = dict(config.credentials)
        self.tokens = set(config.tokens)
        self.revoked = False
        self.read_only = False
        self.write_only = False
        self.detail_as_sdk = config.detail_as_sdk
        self._request_seq = 0
        self._changed.set()

    @property
    def tickets(self) -> dict[str, Ticket]:
        return self.book.tickets

    @property
    def faults(self) -> FaultConfig:
        return self.injector.config

    @property
    def auth_enabled(self) -> bool:
        return bool(self.credentials or self.tokens) or self.revoked

    def seed(self, data: Mapping[str, Any]) -> int:
        return self.book.seed(data, now_ms=now_ms())

    def set_faults(self, **changes: Any) -> FaultConfig:
        """Partial update of the fault config (validated); the random sequence carries on."""
        self.injector.config = self.injector.config.updated(**changes)
        return self.injector.config

    def revoke(self, revoked: bool = True) -> None:
        """Make every credential fail (a 401 storm) or work again, without forgetting them."""
        self.revoked = revoked

    def restrict_to_reads(self, read_only: bool = True) -> None:
        """Credentials that authenticate but may only read (an IAM policy without the ticket
        update permission): every write is refused with 403, reads still answer."""
        self.read_only = read_only

    def restrict_to_writes(self, write_only: bool = True) -> None:
        """Credentials that authenticate but may only change tickets (an IAM policy with the
        update permission alone, the one the reference names for this call): every read is
        refused with 403, writes still answer."""
        self.write_only = write_only

    def set_credentials(
        self, credentials: Mapping[str, str] | None = None, tokens: Iterable[str] | None = None
    ) -> None:
        if credentials is not None:
            self.credentials = dict(credentials)
        if tokens is not None:
            self.tokens = set(tokens)

    def record_applied(
        self,
        ticket_id: str,
        changes: list[Change],
        body: dict[str, Any],
        event_id: str | None,
        traceparent: str | None,
    ) -> None:
        at = time.time()
        log = self.applied_log
        for change in changes:
            self.applied_total += 1
            log.append(
                {
                    "seq": self.applied_total,
                    "at": at,
                    "ticket_id": ticket_id,
                    "sub_ticket_id": change.sub_ticket_id,
                    "action": change.action,
                    "change_result": change.change_result,
                    "body": body,
                    "event_id": event_id,
                    "traceparent": traceparent,
                }
            )
        keep = self._config.applied_log_size
        if keep is not None and len(log) > keep:
            del log[: len(log) - keep]
        self._changed.set()

    def record_request(
        self,
        method: str,
        path: str,
        status: int | None,
        error_code: str | None,
        event_id: str | None,
        fault: str | None,
    ) -> None:
        self._request_seq += 1
        self.requests.append(
            RequestRecord(self._request_seq, time.time(), method, path, status, error_code, event_id, fault)
        )
        self.status_counts["dropped" if status is None else str(status)] += 1
        if fault is not None:
            self.fault_counts[fault] += 1
        self._changed.set()

    def applied_for(self, event_id: str) -> list[dict[str, Any]]:
        return [entry for entry in self.applied_log if entry["event_id"] == event_id]

    def request_dicts(self, limit: int | None = None) -> list[dict[str, Any]]:
        records = list(self.requests)
        if limit is not None:
            records = records[-limit:] if limit > 0 else []
        return [asdict(record) for record in records]

    def stats(self) -> dict[str, Any]:
        return {
            "requests_total": self._request_seq,
            "by_status": dict(self.status_counts),
            "faults": dict(self.fault_counts),
            "applied": self.applied_total,
            "tickets": len(self.book.tickets),
        }

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Return once ``predicate()`` holds, re-checked after every request; ``TimeoutError`` past the deadline."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
