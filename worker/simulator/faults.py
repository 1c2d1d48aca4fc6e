"""Fault injection: what can go wrong between the worker and the API, and when it does.

One seeded ``random.Random`` makes every decision, so a run with the same ``rng_seed`` and the
same request order injects the same faults. Per request there is at most one fault, drawn with a
single number against the cumulative ratios in this order: hang, drop, error, throttle,
drop-after-apply, timeout-after-apply (so ratios summing past 1 starve the later kinds). Latency is
independent and is spent once the request has been read, before it is handled: a client that
times out during it leaves a change that is applied all the same, later, as a slow service's
would be; ``drop_after_apply_ratio`` (the connection drops) and ``timeout_after_apply_ratio`` (the
gateway answers 504 while its backend applied the change) lose the answer to a change applied at
once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.simulator.tickets import FAULT_CODES


class FaultConfig(BaseModel):
    """Which faults to inject; everything defaults to off. Ratios are probabilities per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    #: The 5xx statuses an ``error`` picks from, uniformly.
    error_statuses: tuple[int, ...] = (500, 502, 503, 504)
    throttle_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    #: Sent as ``Retry-After``; a fractional value is sent as is so tests can stay fast.
    retry_after_s: float = Field(default=1.0, ge=0.0)
    latency_ms: float = Field(default=0.0, ge=0.0)
    latency_jitter_ms: float = Field(default=0.0, ge=0.0)
    spike_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    spike_ms: float = Field(default=0.0, ge=0.0)
    hang_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    #: How long a hung request holds its connection before it is closed unanswered.
    hang_s: float = Field(default=3600.0, ge=0.0)
    drop_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    drop_after_apply_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    timeout_after_apply_ratio: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator("error_statuses")
    @classmethod
    def _known_statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        unknown = sorted(set(value) - FAULT_CODES.keys())
        if not value or unknown:
            raise ValueError(f"error_statuses must be a non-empty subset of {sorted(FAULT_CODES)}")
        return value

    def updated(self, **changes: Any) -> FaultConfig:
        """A validated copy with ``changes`` applied (the partial update of ``PUT /_sim/faults``)."""
        return FaultConfig.model_validate({**self.model_dump(), **changes})


class FaultKind(StrEnum):
    HANG = "hang"
    DROP = "drop"
    ERROR = "error"
    THROTTLE = "throttle"
    DROP_AFTER_APPLY = "drop_after_apply"
    TIMEOUT_AFTER_APPLY = "timeout_after_apply"


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one request."""

    delay_s: float = 0.0
    kind: FaultKind | None = None
    #: The 5xx status of an ``error``.
    status: int | None = None


NO_FAULT = Decision()


class FaultInjector:
    """Turns a ``FaultConfig`` into per-request decisions; cheap when everything is off."""

    def __init__(self, config: FaultConfig, rng_seed: int | None) -> None:
        self._rng = random.Random(rng_seed)
        self.config = config

    @property
    def config(self) -> FaultConfig:
        return self._config

    @config.setter
    def config(self, config: FaultConfig) -> None:
        self._config = config
        self._thresholds = [
            (kind, ratio)
            for kind, ratio in (
                (FaultKind.HANG, config.hang_ratio),
                (FaultKind.DROP, config.drop_ratio),
                (FaultKind.ERROR, config.error_ratio),
                (FaultKind.THROTTLE, config.throttle_ratio),
                (FaultKind.DROP_AFTER_APPLY, config.drop_after_apply_ratio),
                (FaultKind.TIMEOUT_AFTER_APPLY, config.timeout_after_apply_ratio),
            )
            if ratio > 0
        ]
        self._delays = config.latency_ms > 0 or config.latency_jitter_ms > 0 or config.spike_ratio > 0
        self._active = self._delays or bool(self._thresholds)

    def decide(self) -> Decision:
        if not self._active:
            return NO_FAULT
        config = self._config
        rng = self._rng
        delay_ms = 0.0
        if self._delays:
            delay_ms = config.latency_ms
            if config.latency_jitter_ms > 0:
                delay_ms += rng.uniform(0.0, config.latency_jitter_ms)
            if config.spike_ratio > 0 and rng.random() < config.spike_ratio:
                delay_ms += config.spike_ms
        kind: FaultKind | None = None
        status: int | None = None
        if self._thresholds:
            draw = rng.random()
            cumulative = 0.0
            for candidate, ratio in self._thresholds:
                cumulative += ratio
                if draw < cumulative:
                    kind = candidate
                    break
            if kind is FaultKind.ERROR:
                status = rng.choice(config.error_statuses)
        return Decision(delay_ms / 1000.0, kind, status)
