"""The outcome event: exactly one per consumed message, on the results topic.

Downstream consumers read these to learn what happened to every change event. An outcome is
identified by its ``source`` (topic, partition, offset): after a crash the same input may be
re-read and its outcome published again (at-least-once delivery), and a write whose
acknowledgement was lost is sent again; such a copy carries the same ``status`` and
``redelivered=true``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

OUTCOME_SCHEMA_VERSION: Literal[1] = 1
#: What stands in for a secret wherever the worker writes: in an outcome, a field (an id, the
#: request's text) that held one; in the logs, the secret itself.
REDACTED = "**redacted**"


class OutcomeStatus(StrEnum):
    APPLIED = "applied"
    """The API accepted the change."""
    REJECTED = "rejected"
    """The API refused the change (an answer that is not retried: 4xx other than 401/403/408/429,
    3xx, 501, 505...; or a 2xx with a non-success error_code; or a 403 again once the
    credentials were verified: not permitted for this change); also dead-lettered."""
    FAILED = "failed"
    """Transient errors outlived the retry budget; also dead-lettered."""
    INVALID = "invalid"
    """The message broke the contract and was never sent to the API; also dead-lettered."""
    DUPLICATE = "duplicate"
    """Another message with this event_id and the same change was already applied; no API call
    was made."""


#: Statuses whose input message is also written to the dead-letter topic.
DEAD_LETTER_STATUSES = frozenset({OutcomeStatus.REJECTED, OutcomeStatus.FAILED, OutcomeStatus.INVALID})


class SourceRef(BaseModel):
    """Where the input message was read from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class OutcomeEvent(BaseModel):
    """What happened to one consumed message."""

    # Every field is in every outcome the worker writes (null when it does not apply): the schema
    # says so, and types generated from it do not make them optional.
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    schema_version: Literal[1] = OUTCOME_SCHEMA_VERSION
    event_id: str | None = Field(description="The input's event_id; null when it could not be read.")
    ticket_id: str | None
    sub_ticket_id: str | None = None
    type: str | None = Field(description="The input's event type; null when it could not be read.")
    status: OutcomeStatus
    reason: str | None = Field(
        default=None,
        description="Machine-readable cause: reconciled (applied); api_rejected, "
        "api_rejected_maybe_applied (rejected); retries_exhausted, retries_exhausted_maybe_applied, "
        "internal_error (failed); *_maybe_applied: an attempt's answer was lost and the ticket did not "
        "confirm the change either way, so it may be in place; empty, too_large, not_utf8, bad_json, schema, "
        "unreadable, event_id_reused (invalid); duplicate_event_id (duplicate).",
    )
    attempts: int = Field(
        ge=0,
        description="Changes sent to the API for this message (0 when none); reads of the ticket "
        "after a lost answer are not counted.",
    )
    http_status: int | None = None
    error_code: str | None = None
    error_msg: str | None = None
    request: dict[str, Any] | None = Field(
        default=None,
        description="The API request body the event maps to, as sent; with attempts 0 (a change "
        "found in place: reconciled) nothing was sent.",
    )
    source: SourceRef
    received_at: datetime
    finished_at: datetime
    duration_ms: float = Field(ge=0)
    worker: str = Field(description="Id of the worker process that produced this outcome.")
    redelivered: bool = Field(
        default=False,
        description="True when this may repeat an outcome already published: the same message read "
        "again after a crash or a rebalance, or an outcome write retried after the broker's answer was lost.",
    )
    trace_id: str | None = Field(default=None, description="W3C trace id carried from the input.")


def utc_text(moment: datetime) -> str:
    """A time as outcomes carry it (``...T03:00:00.160000Z``): headers and tool output that show
    one too read the same, whichever a consumer parses."""
    return to_json(moment).decode()[1:-1]


def dump_outcome(fields: dict[str, Any]) -> bytes:
    """``OutcomeEvent(**fields).model_dump_json()``, byte for byte, without building the model.

    The worker writes one outcome per message, and building the model only to dump it again cost
    more than twice this (``model_construct`` alone walks every field with its defaults). So
    ``fields`` must already be a valid outcome: every field of ``OutcomeEvent``, in its order,
    ``source`` as a dict. ``tests/test_outcomes.py`` checks the bytes against the model's own;
    the integration tests check the worker's outcomes against the model.
    """
    return to_json(fields)
