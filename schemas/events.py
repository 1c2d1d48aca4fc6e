"""The inbound change event, schema version 1: the contract producers code against.

One JSON object per Kafka message (UTF-8), keyed by ``ticket_id``. ``type`` selects the shape;
each shape is strict: unknown fields, wrong types and out-of-range values are rejected, so
nothing that could not be mapped faithfully to the API ever reaches it. ``ticket_id`` and
``sub_ticket_id`` go into a URL path and request body: only ``[A-Za-z0-9_-]`` passes (ASCII only;
the pattern is checked by pydantic's Rust regex engine, where ``$`` is the end of the text).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    model_validator,
)

from schemas.api import Phase

SCHEMA_VERSION = 1

EVENT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
TICKET_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_RFC3339 = re.compile(
    r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII
)
#: Epoch milliseconds from 2000-01-01 (a time in epoch *seconds* is below that, so the common mix-up
#: is refused instead of sent as a date in January 1970) to year 9999, well inside a Java ``Long``.
MIN_EPOCH_MS = 946_684_800_000
_MAX_EPOCH_MS = 253_402_300_799_999


class EventType(StrEnum):
    STARTED = "change.started"
    ENDED = "change.ended"
    SUCCEEDED = "change.succeeded"
    FAILED = "change.failed"
    CANCELLED = "change.cancelled"
    TICKET_UPDATE = "ticket.update"


def _rfc3339_string(value: Any) -> Any:
    """Accept only RFC 3339 text with an offset; lax datetime parsing would take epoch numbers too."""
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time string with a timezone, e.g. 2025-06-26T19:19:38Z")
    return value


def _exact_int(value: Any) -> Any:
    """``Literal[1]`` alone would also take ``true`` and ``1.0``: only a JSON integer passes."""
    if type(value) is not int:
        raise ValueError("must be the integer 1")
    return value


EventId = Annotated[str, Field(pattern=EVENT_ID_PATTERN, description="Idempotency key, unique per event.")]
TicketId = Annotated[
    str, Field(pattern=TICKET_ID_PATTERN, description="Change ticket number (goes into the URL path).")
]
SubTicketId = Annotated[
    str, Field(pattern=TICKET_ID_PATTERN, description="Change sub-ticket id (one per change region).")
]
OccurredAt = Annotated[
    AwareDatetime,
    Field(
        strict=False,
        description="When the change happened, RFC 3339 with timezone.",
        # The exported schema says it too: "format" alone is an annotation most validators skip,
        # so a producer's schema check passed a time without a zone that the worker refuses.
        json_schema_extra={
            # Ranges too (month 13, hour 24, a leap second, year 0000 passed the schema, not the
            # worker); not a day past its month's end. No look-ahead: not every validator has one.
            "pattern": r"^([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
            r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
            r"(\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
        },
    ),
    BeforeValidator(_rfc3339_string),
]
EpochMs = Annotated[
    int,
    Field(
        ge=MIN_EPOCH_MS,
        le=_MAX_EPOCH_MS,
        description="Epoch milliseconds (from 2000-01-01: a time in seconds is refused).",
    ),
]
Comment = Annotated[str, Field(max_length=2000, description="Free text shown on the ticket.")]
ShortText = Annotated[str, Field(max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SucceededResult(_Strict):
    """Result of a successful change (reference example 3)."""

    comment: Comment | None = None
    is_verified_in_change_time: bool | None = Field(
        default=None, description="Whether verification could be done in the change window."
    )
    verified_docs: ShortText | None = Field(default=None, description="Verification document id.")


class FailedResult(SucceededResult):
    """Result of a failed change (reference example 4), possibly reported by monitoring."""

    change_fail_type: ShortText | None = Field(
        default=None, description="Failure category, e.g. fr_dependent_service_issue."
    )
    rollback_start_time: EpochMs | None = None
    rollback_end_time: EpochMs | None = None
    is_rollback_success: bool | None = None
    is_monitor_found: bool | None = Field(
        default=None, description="True when a monitoring system detected the failure."
    )

    @model_validator(mode="after")
    def _rollback_window(self) -> FailedResult:
        start, end = self.rollback_start_time, self.rollback_end_time
        if start is not None and end is not None and end < start:
            raise ValueError("rollback_end_time must be >= rollback_start_time")
        return self


class CancelledResult(_Strict):
    """Result of a cancelled change (reference example 5)."""

    comment: Comment | None = None


class TicketInfo(_Strict):
    """Operation on the change ticket itself (not a sub-ticket)."""

    # Either key, not null: what the validator below checks (minProperties would let {"phase": null}).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["phase"], "properties": {"phase": {"type": "string"}}},
                {"required": ["work_flow_status"], "properties": {"work_flow_status": {"type": "string"}}},
            ]
        }
    )

    # strict=False: strict mode would want a Phase instance; lax enum validation still takes only
    # the seven strings.
    phase: Phase | None = Field(
        default=None, strict=False, description="One of the seven phase_change_* values."
    )
    work_flow_status: ShortText | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> TicketInfo:
        if self.phase is None and self.work_flow_status is None:
            raise ValueError("ticket_info needs phase and/or work_flow_status")
        return self


class _EventBase(_Strict):
    schema_version: Annotated[Literal[1], BeforeValidator(_exact_int)] = Field(
        default=1, description="Contract version; only 1 exists."
    )
    event_id: EventId
    ticket_id: TicketId
    occurred_at: OccurredAt | None = None
    source: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="Who emitted the event, e.g. argo-cd or alertmanager."
    )


def _absent_if_null(value: Any) -> Any:
    """A result given as JSON null is one left out: producers that serialize every field of one
    envelope class (Jackson's default, Go without omitempty) write null for the unset ones."""
    return {} if value is None else value


class ChangeStarted(_EventBase):
    type: Literal[EventType.STARTED]
    sub_ticket_id: SubTicketId


class ChangeEnded(_EventBase):
    type: Literal[EventType.ENDED]
    sub_ticket_id: SubTicketId


class ChangeSucceeded(_EventBase):
    type: Literal[EventType.SUCCEEDED]
    sub_ticket_id: SubTicketId
    result: Annotated[
        SucceededResult, BeforeValidator(_absent_if_null, json_schema_input_type=SucceededResult | None)
    ] = Field(default_factory=SucceededResult)


class ChangeFailed(_EventBase):
    type: Literal[EventType.FAILED]
    sub_ticket_id: SubTicketId
    result: Annotated[
        FailedResult, BeforeValidator(_absent_if_null, json_schema_input_type=FailedResult | None)
    ] = Field(default_factory=FailedResult)


class ChangeCancelled(_EventBase):
    type: Literal[EventType.CANCELLED]
    sub_ticket_id: SubTicketId
    result: Annotated[
        CancelledResult, BeforeValidator(_absent_if_null, json_schema_input_type=CancelledResult | None)
    ] = Field(default_factory=CancelledResult)


class TicketUpdate(_EventBase):
    type: Literal[EventType.TICKET_UPDATE]
    ticket_info: TicketInfo


def _event_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        tag = value.get("type")
        return tag if isinstance(tag, str) else None
    return getattr(value, "type", None)


ChangeEvent = Annotated[
    Annotated[ChangeStarted, Tag(EventType.STARTED)]
    | Annotated[ChangeEnded, Tag(EventType.ENDED)]
    | Annotated[ChangeSucceeded, Tag(EventType.SUCCEEDED)]
    | Annotated[ChangeFailed, Tag(EventType.FAILED)]
    | Annotated[ChangeCancelled, Tag(EventType.CANCELLED)]
    | Annotated[TicketUpdate, Tag(EventType.TICKET_UPDATE)],
    Discriminator(
        _event_tag,
        custom_error_type="invalid_event_type",
        custom_error_message="type must be one of: " + ", ".join(t.value for t in EventType),
    ),
]
"""Any inbound event; ``type`` picks the model."""

#: Validates a decoded JSON object into one of the event models.
CHANGE_EVENT_ADAPTER: TypeAdapter[ChangeEvent] = TypeAdapter(ChangeEvent)

AnyChangeEvent = ChangeStarted | ChangeEnded | ChangeSucceeded | ChangeFailed | ChangeCancelled | TicketUpdate
