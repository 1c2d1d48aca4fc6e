"""Build a change event for ``send``: from flags, or a JSON file / stdin with flags on top.

The result is the plain JSON object the producer means, checked against the contract with every
error and its JSON path, so a deploy pipeline learns exactly what to fix before anything reaches
Kafka. Nothing here talks to Kafka.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

from pydantic import ValidationError

from schemas.events import AnyChangeEvent, EventType
from worker.decode import check, contract_errors, parse_json, validate
from worker.errors import InvalidEvent

#: Short names accepted by ``--type`` besides the full ones.
TYPE_ALIASES: dict[str, str] = {
    "started": EventType.STARTED,
    "ended": EventType.ENDED,
    "succeeded": EventType.SUCCEEDED,
    "failed": EventType.FAILED,
    "cancelled": EventType.CANCELLED,
    "update": EventType.TICKET_UPDATE,
    **{t.value: t.value for t in EventType},
}
_WITH_RESULT = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED})
#: A document read by ``--file`` may hold more than one event's worth of text; still bounded.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EventFlags:
    """What ``send`` was told on the command line; ``None`` means "not given"."""

    type: str | None = None
    ticket_id: str | None = None
    sub_ticket_id: str | None = None
    event_id: str | None = None
    source: str | None = None
    occurred_at: str | None = None
    comment: str | None = None
    change_fail_type: str | None = None
    is_verified_in_change_time: bool | None = None
    verified_docs: str | None = None
    rollback_start_time: int | None = None
    rollback_end_time: int | None = None
    is_rollback_success: bool | None = None
    is_monitor_found: bool | None = None
    phase: str | None = None
    work_flow_status: str | None = None


_TOP = ("ticket_id", "sub_ticket_id", "event_id", "source", "occurred_at")
_RESULT = (
    "comment",
    "change_fail_type",
    "is_verified_in_change_time",
    "verified_docs",
    "rollback_start_time",
    "rollback_end_time",
    "is_rollback_success",
    "is_monitor_found",
)
_TICKET_INFO = ("phase", "work_flow_status")


def new_event_id(prefix: str = "cli") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC, to the millisecond, with a ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def read_document(path: str, stdin: BinaryIO) -> bytes:
    """The bytes of ``path`` (``-`` is stdin); ``InvalidEvent`` when it cannot be read."""
    try:
        if path == "-":
            return stdin.read(MAX_DOCUMENT_BYTES + 1)
        with open(path, "rb") as handle:
            return handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise InvalidEvent("unreadable", f"cannot read {path}: {exc.strerror}") from None


def build(base: dict[str, Any] | None, flags: EventFlags) -> dict[str, Any]:
    """``base`` (a file's object, or nothing) with every given flag applied on top."""
    event: dict[str, Any] = dict(base or {})
    if flags.type is not None:
        event["type"] = TYPE_ALIASES.get(flags.type, flags.type)
    for name in _TOP:
        value = getattr(flags, name)
        if value is not None:
            event[name] = value
    for section, names in (("result", _RESULT), ("ticket_info", _TICKET_INFO)):
        given = {name: getattr(flags, name) for name in names if getattr(flags, name) is not None}
        if given:
            current = event.get(section)
            event[section] = {**(current if isinstance(current, dict) else {}), **given}
    event.setdefault("event_id", new_event_id())
    if base is None:  # built from flags alone: fill what a person would not want to type
        event.setdefault("occurred_at", now_rfc3339())
        if event.get("type") in _WITH_RESULT:
            event.setdefault("result", {})
    return event


def _size_error(obj: dict[str, Any], max_event_bytes: int) -> str | None:
    size = len(encode(obj))
    return f"event is {size} bytes, the limit is {max_event_bytes}" if size > max_event_bytes else None


def event_errors(obj: Any, max_event_bytes: int) -> list[tuple[str, str]]:
    """``contract_errors``, and for a valid event whose message value would be too large, that."""
    errors = contract_errors(obj)
    if not errors:
        too_large = _size_error(obj, max_event_bytes)
        if too_large is not None:
            errors.append(("$", too_large))
    return errors


def is_valid_event(obj: Any, max_event_bytes: int) -> bool:
    """``not event_errors(obj, max_event_bytes)``, without describing any error."""
    return not isinstance(check(obj), list | ValidationError) and _size_error(obj, max_event_bytes) is None


def validated(obj: dict[str, Any], max_event_bytes: int) -> AnyChangeEvent:
    """The event, or ``InvalidEvent`` naming every error on one line."""
    event = validate(obj, shown=sys.maxsize)
    too_large = _size_error(obj, max_event_bytes)
    if too_large is not None:
        raise InvalidEvent("too_large", too_large)
    return event


def parse_document(raw: bytes) -> Any:
    """Strict JSON (no duplicate keys, NaN, lone surrogates, absurd nesting)."""
    return parse_json(raw, MAX_DOCUMENT_BYTES)


def encode(obj: dict[str, Any]) -> bytes:
    """The message value: compact UTF-8 JSON of exactly the fields the producer gave."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
