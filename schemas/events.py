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
from pydantic.config import JsonDict

from schemas.api import Phase

SCHEMA_VERSION = 1

EVENT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
TICKET_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Ranges in the pattern too, so a time the parser would refuse gets the diagnosis below, not its
# "unexpected extra characters"; what passes is as before (the parser refused the rest).
_RFC3339 = re.compile(
    r"\A\d{4}-\d{2}-\d{2}[Tt ]([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9})?"
    r"([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)\Z",
    re.ASCII,
)
#: The same text, loosely: where it breaks the strict pattern above.
_RFC3339_PARTS = re.compile(
    r"\A\d{4}-\d{2}-\d{2}[Tt ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2}))?"
    r"(?:\.(?P<fraction>\d*))?(?P<offset>.*)\Z",
    re.ASCII | re.DOTALL,
)
_OFFSET = re.compile(r"\A(?:[Zz]|[+-](?P<hours>\d{2}):(?P<minutes>\d{2}))", re.ASCII)
_RFC3339_EXAMPLE = "e.g. 2025-06-26T19:19:38Z or 2025-06-27T03:19:38+08:00"
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
    if isinstance(value, str) and _RFC3339.match(value):
        return value
    raise ValueError(_rfc3339_problem(value))


def _rfc3339_problem(value: Any) -> str:
    """The rule a refused ``occurred_at`` breaks: "with a timezone" alone misled a producer whose
    offset was there without its colon."""
    parts = _RFC3339_PARTS.match(value) if isinstance(value, str) else None
    if parts is None:
        return f"must be an RFC 3339 date-time string with a timezone, {_RFC3339_EXAMPLE}"
    hour, minute, second, fraction, offset = parts.group("hour", "minute", "second", "fraction", "offset")
    if int(hour) > 23:
        return "hour must be 00-23"
    if int(minute) > 59:
        return "minute must be 00-59"
    if second is None:
        return f"needs seconds: the time is hh:mm:ss, {_RFC3339_EXAMPLE}"
    if second == "60":
        return "second 60 (a leap second) is refused by this worker: second must be 00-59"
    if int(second) > 59:
        return "second must be 00-59"
    if fraction is not None and not 1 <= len(fraction) <= 9:
        return "a fraction of a second takes 1 to 9 digits after the point"
    if not offset:
        return f"needs a timezone after the time: Z or ±hh:mm, {_RFC3339_EXAMPLE}"
    if re.fullmatch(r"[+-]\d{4}", offset, re.ASCII):
        return "the offset needs a colon: ±hh:mm (+08:00, not +0800), or Z"
    zone = _OFFSET.match(offset)
    if zone is None:
        return f"the timezone must be Z or an offset ±hh:mm, {_RFC3339_EXAMPLE}"
    if zone.group("hours") is not None and int(zone.group("hours")) > 23:
        return "the offset's hours must be 00-23"
    if zone.group("minutes") is not None and int(zone.group("minutes")) > 59:
        return "the offset's minutes must be 00-59"
    return "nothing may follow the timezone"


def _exact_int(value: Any) -> Any:
    """``Literal[1]`` alone would also take ``true`` and ``1.0``: only a JSON integer passes. Null is
    the key left out (see ``ENVELOPE_KEYS``), handled here where it costs nothing more."""
    if value is None:
        return SCHEMA_VERSION
    if type(value) is not int:
        raise ValueError("must be the integer 1")
    return value


def _refuse_null(message: str) -> BeforeValidator:
    """A key the type requires: its null is not the key left out, and says so."""

    def check(value: Any) -> Any:
        if value is None:
            raise ValueError(message)
        return value

    return BeforeValidator(check)


_NULL_WHERE_TAKEN = "null stands for a left-out key only where the type takes no such key"


EventId = Annotated[str, Field(pattern=EVENT_ID_PATTERN, description="Idempotency key, unique per event.")]
TicketId = Annotated[
    str, Field(pattern=TICKET_ID_PATTERN, description="Change ticket number (goes into the URL path).")
]
SubTicketId = Annotated[
    str,
    Field(pattern=TICKET_ID_PATTERN, description="Change sub-ticket id (one per change region)."),
    _refuse_null(f"every change.* type requires a sub-ticket id, not null ({_NULL_WHERE_TAKEN})"),
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
    # Not empty: "" met "phase and/or work_flow_status" and sent a PUT that changed nothing.
    work_flow_status: Annotated[ShortText, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> TicketInfo:
        if self.phase is None and self.work_flow_status is None:
            raise ValueError("ticket_info needs phase and/or work_flow_status")
        return self


#: Keys of some event types and not others. Producers that serialize every field of one envelope
#: class (Jackson's default, Go without omitempty) write null for those an event's type does not
#: take; ``extra="forbid"`` refused their change.started while their change.succeeded passed.
ENVELOPE_KEYS = ("sub_ticket_id", "result", "ticket_info")


def _nulls_left_out(first: str, second: str | None = None) -> Any:
    """The before-validator of a type that takes neither key: a JSON null under one is the key left
    out. Runs on every event: a lookup per key, and no copy unless there is a null to drop."""
    keys = (first,) if second is None else (first, second)
    last = keys[-1]

    def drop_nulls(data: Any) -> Any:
        # Unrolled rather than a loop over ``keys``: that cost a third more on every event.
        if isinstance(data, dict) and (
            (first in data and data[first] is None) or (last in data and data[last] is None)
        ):
            return {k: v for k, v in data.items() if v is not None or k not in keys}
        return data

    return model_validator(mode="before")(drop_nulls)


def _null_properties(schema: JsonDict, model: type[BaseModel]) -> None:
    """The exported schema takes those nulls too: ``additionalProperties: false`` alone refused
    them, so a producer's schema check and the worker would disagree."""
    properties = schema["properties"]
    if isinstance(properties, dict):
        for key in ENVELOPE_KEYS:
            if key not in model.model_fields:
                properties[key] = {
                    "type": "null",
                    "description": f"This type takes no {key}: null is taken as left out.",
                }


class _EventBase(_Strict):
    model_config = ConfigDict(json_schema_extra=_null_properties)

    schema_version: Annotated[
        Literal[1], BeforeValidator(_exact_int, json_schema_input_type=Literal[1] | None)
    ] = Field(default=1, description="Contract version; only 1 exists (null: left out, so 1).")
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

    _drop_nulls = _nulls_left_out("result", "ticket_info")


class ChangeEnded(_EventBase):
    type: Literal[EventType.ENDED]
    sub_ticket_id: SubTicketId

    _drop_nulls = _nulls_left_out("result", "ticket_info")


class ChangeSucceeded(_EventBase):
    type: Literal[EventType.SUCCEEDED]
    sub_ticket_id: SubTicketId
    result: Annotated[
        SucceededResult, BeforeValidator(_absent_if_null, json_schema_input_type=SucceededResult | None)
    ] = Field(default_factory=SucceededResult)

    _drop_nulls = _nulls_left_out("ticket_info")


class ChangeFailed(_EventBase):
    type: Literal[EventType.FAILED]
    sub_ticket_id: SubTicketId
    result: Annotated[
        FailedResult, BeforeValidator(_absent_if_null, json_schema_input_type=FailedResult | None)
    ] = Field(default_factory=FailedResult)

    _drop_nulls = _nulls_left_out("ticket_info")


class ChangeCancelled(_EventBase):
    type: Literal[EventType.CANCELLED]
    sub_ticket_id: SubTicketId
    result: Annotated[
        CancelledResult, BeforeValidator(_absent_if_null, json_schema_input_type=CancelledResult | None)
    ] = Field(default_factory=CancelledResult)

    _drop_nulls = _nulls_left_out("ticket_info")


class TicketUpdate(_EventBase):
    type: Literal[EventType.TICKET_UPDATE]
    ticket_info: Annotated[
        TicketInfo,
        _refuse_null(f"ticket.update requires a ticket_info object, not null ({_NULL_WHERE_TAKEN})"),
    ]

    _drop_nulls = _nulls_left_out("result", "sub_ticket_id")


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
