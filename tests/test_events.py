"""The inbound event contract (schema version 1): every field rule accepts good values, rejects bad."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas.api import Phase
from schemas.events import (
    CHANGE_EVENT_ADAPTER,
    ENVELOPE_KEYS,
    AnyChangeEvent,
    ChangeCancelled,
    ChangeEnded,
    ChangeFailed,
    ChangeStarted,
    ChangeSucceeded,
    EventType,
    TicketUpdate,
)
from schemas.export import JSON_DIR
from worker.decode import contract_errors
from worker.mapping import request_path, request_wire, to_request_body

CHANGE_TYPES = [t for t in EventType if t is not EventType.TICKET_UPDATE]
RESULT_TYPES = [EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED]
MODELS: dict[EventType, type[AnyChangeEvent]] = {
    EventType.STARTED: ChangeStarted,
    EventType.ENDED: ChangeEnded,
    EventType.SUCCEEDED: ChangeSucceeded,
    EventType.FAILED: ChangeFailed,
    EventType.CANCELLED: ChangeCancelled,
    EventType.TICKET_UPDATE: TicketUpdate,
}
#: The keys of other types' events each type does not take: their null is the key left out.
NOT_TAKEN = {
    EventType.STARTED: ("result", "ticket_info"),
    EventType.ENDED: ("result", "ticket_info"),
    EventType.SUCCEEDED: ("ticket_info",),
    EventType.FAILED: ("ticket_info",),
    EventType.CANCELLED: ("ticket_info",),
    EventType.TICKET_UPDATE: ("result", "sub_ticket_id"),
}
TICKET_ID_CHARS = string.ascii_letters + string.digits + "_-"
EVENT_ID_CHARS = string.ascii_letters + string.digits + "._:-"


def event(kind: EventType | str = EventType.STARTED, **fields: Any) -> dict[str, Any]:
    """A minimal valid event of ``kind``; ``fields`` override or add keys."""
    base: dict[str, Any] = {"event_id": "evt-1", "ticket_id": "CM202506261919380164485133", "type": str(kind)}
    if kind == EventType.TICKET_UPDATE:
        base["ticket_info"] = {"phase": "phase_change_close"}
    else:
        base["sub_ticket_id"] = "e72f9b49-2294-4c58-bc57-4a0c6903c5e1"
    base.update(fields)
    return base


def accepts(value: dict[str, Any]) -> Any:
    return CHANGE_EVENT_ADAPTER.validate_python(value)


def rejects(value: dict[str, Any], field: str | None = None) -> None:
    """Validation fails, and (when ``field`` is given) an error points at that field."""
    with pytest.raises(ValidationError) as info:
        CHANGE_EVENT_ADAPTER.validate_python(value)
    if field is not None:
        locs = [err["loc"] for err in info.value.errors()]
        assert any(field in loc for loc in locs), locs


def without(value: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != key}


# --- type ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EventType))
def test_each_type_selects_its_model(kind: EventType) -> None:
    parsed = accepts(event(kind))
    assert type(parsed) is MODELS[kind]
    assert parsed.type == kind


@pytest.mark.parametrize(
    "kind",
    ["change.start", "CHANGE.STARTED", "change.started ", "change", "", 1, None, True, ["change.started"]],
)
def test_unknown_type_rejected(kind: Any) -> None:
    rejects(event(type=kind))


def test_missing_type_rejected() -> None:
    rejects(without(event(), "type"))


# --- schema_version ------------------------------------------------------------------------------


def test_schema_version_defaults_to_1() -> None:
    assert accepts(event()).schema_version == 1
    assert accepts(event(schema_version=1)).schema_version == 1


@pytest.mark.parametrize("kind", list(EventType))
def test_a_null_schema_version_is_one_left_out(kind: EventType) -> None:
    """Null from a producer that writes every field of its envelope class: version 1, the default."""
    parsed = accepts(event(kind, schema_version=None))
    assert parsed.schema_version == 1
    assert request_wire(parsed) == request_wire(accepts(event(kind)))


@pytest.mark.parametrize("version", [True, 1.0, "1", 2, 0, -1, [1]])
def test_schema_version_only_integer_1(version: Any) -> None:
    rejects(event(schema_version=version), "schema_version")


# --- event_id ------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_id", ["a", "e" * 128, "argo-cd:app.1", "A.b_c-9:Z", "..", ":"])
def test_event_id_accepts(event_id: str) -> None:
    assert accepts(event(event_id=event_id)).event_id == event_id


@pytest.mark.parametrize(
    "event_id", ["", "e" * 129, "a b", "a/b", "a\n", "a\x00", "é", "a\u200b", "id#1", 7, None]
)
def test_event_id_rejects(event_id: Any) -> None:
    rejects(event(event_id=event_id), "event_id")


def test_event_id_required() -> None:
    rejects(without(event(), "event_id"), "event_id")


# --- ticket_id / sub_ticket_id -------------------------------------------------------------------

GOOD_IDS = ["a", "CM202506261919380164485133", "e72f9b49-2294-4c58-bc57-4a0c6903c5e1", "A_b-9", "-", "x" * 64]
BAD_IDS = [
    "",
    "x" * 65,
    "../",
    "..",
    "a.b",
    "%2e%2e",
    "a/b",
    "/",
    "a?b=1",
    "a#b",
    "a\r\nb",
    "a\n",
    "a\x00",
    " a",
    "a ",
    "a\tb",
    "\uff43\uff4d\uff11",  # fullwidth "cm1"
    "CM1\u0430",  # Cyrillic small a
    "\u0410BC",  # Cyrillic capital A
    "a\u200bb",  # zero-width space
    "1\u0660",  # Arabic-Indic digit zero
    "é",
    "a\\b",
    "a;b",
    "a%00",
]
BAD_ID_TYPES = [7, 1.5, True, None, ["a"], {"a": 1}, b"abc"]


@pytest.mark.parametrize("field", ["ticket_id", "sub_ticket_id"])
@pytest.mark.parametrize("value", GOOD_IDS)
def test_ids_accept(field: str, value: str) -> None:
    assert getattr(accepts(event(**{field: value})), field) == value


@pytest.mark.parametrize("field", ["ticket_id", "sub_ticket_id"])
@pytest.mark.parametrize("value", BAD_IDS + BAD_ID_TYPES)
def test_ids_reject(field: str, value: Any) -> None:
    rejects(event(**{field: value}), field)


def test_ticket_id_required() -> None:
    rejects(without(event(), "ticket_id"), "ticket_id")
    rejects(without(event(EventType.TICKET_UPDATE), "ticket_id"), "ticket_id")


@pytest.mark.parametrize("kind", CHANGE_TYPES)
def test_sub_ticket_id_required_for_change_types(kind: EventType) -> None:
    rejects(without(event(kind), "sub_ticket_id"), "sub_ticket_id")


def test_ticket_update_takes_no_sub_ticket_id() -> None:
    rejects(event(EventType.TICKET_UPDATE, sub_ticket_id="S1"), "sub_ticket_id")


# --- occurred_at ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-26T19:19:38Z", datetime(2025, 6, 26, 19, 19, 38, tzinfo=UTC)),
        ("2025-06-26t19:19:38z", datetime(2025, 6, 26, 19, 19, 38, tzinfo=UTC)),
        ("2025-06-26T19:19:38.5+00:00", datetime(2025, 6, 26, 19, 19, 38, 500_000, tzinfo=UTC)),
        ("2025-06-26T19:19:38.123456789Z", datetime(2025, 6, 26, 19, 19, 38, 123_456, tzinfo=UTC)),
        ("2025-06-27T03:19:38+08:00", datetime(2025, 6, 26, 19, 19, 38, tzinfo=UTC)),
        ("2025-06-26 14:19:38-05:00", datetime(2025, 6, 26, 19, 19, 38, tzinfo=UTC)),
    ],
)
def test_occurred_at_accepts_rfc3339(text: str, expected: datetime) -> None:
    parsed = accepts(event(occurred_at=text)).occurred_at
    assert parsed == expected
    assert parsed.utcoffset() is not None


def test_occurred_at_keeps_offset() -> None:
    parsed = accepts(event(occurred_at="2025-06-27T03:19:38+08:00")).occurred_at
    assert parsed.utcoffset() == timedelta(hours=8)


@pytest.mark.parametrize(
    "value",
    [
        "2025-06-26T19:19:38",  # naive
        "2025-06-26T19:19:38.123",  # naive with fraction
        "2025-06-26",  # date only
        "19:19:38Z",  # time only
        "2025-06-26T19:19Z",  # no seconds
        "2025-06-26T19:19:38+0800",  # offset without colon
        "2025-06-26T19:19:38 Z",
        "2025-06-26T19:19:38Z\n",
        " 2025-06-26T19:19:38Z",
        "2025-13-01T00:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-06-26T19:19:38+24:00",
        "Thu, 26 Jun 2025 19:19:38 GMT",
        "\uff12\uff10\uff12\uff15-06-26T19:19:38Z",  # fullwidth digits
        "1750965578",
        "",
        1750965578,
        1750965578.0,
        1750965578000,
        True,
        ["2025-06-26T19:19:38Z"],
    ],
)
def test_occurred_at_rejects(value: Any) -> None:
    rejects(event(occurred_at=value), "occurred_at")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("2025-06-26T19:19:38+0800", "the offset needs a colon: ±hh:mm (+08:00, not +0800), or Z"),
        ("2025-06-26T19:19:38-0500", "the offset needs a colon: ±hh:mm (+08:00, not +0800), or Z"),
        ("2025-06-26T19:19Z", "needs seconds: the time is hh:mm:ss, e.g. 2025-06-26T19:19:38Z or"),
        ("2025-06-26T19:19+08:00", "needs seconds: the time is hh:mm:ss"),
        ("2025-06-26T19:19:38.1234567890Z", "a fraction of a second takes 1 to 9 digits after the point"),
        ("2025-06-26T19:19:38.Z", "a fraction of a second takes 1 to 9 digits after the point"),
        ("2025-01-01T24:00:00Z", "hour must be 00-23"),
        ("2025-01-01T00:60:00Z", "minute must be 00-59"),
        ("2025-12-31T23:59:60Z", "second 60 (a leap second) is refused by this worker: second must be 00-59"),
        ("2025-01-01T00:00:61Z", "second must be 00-59"),
        ("2025-06-26T19:19:38", "needs a timezone after the time: Z or ±hh:mm"),
        ("2025-06-26T19:19:38.123", "needs a timezone after the time: Z or ±hh:mm"),
        ("2025-06-26T19:19:38+08", "the timezone must be Z or an offset ±hh:mm"),
        ("2025-06-26T19:19:38 Z", "the timezone must be Z or an offset ±hh:mm"),
        ("2025-06-26T19:19:38+24:00", "the offset's hours must be 00-23"),
        ("2025-06-26T19:19:38+08:60", "the offset's minutes must be 00-59"),
        ("2025-06-26T19:19:38Z\n", "nothing may follow the timezone"),
        ("2025-06-26", "must be an RFC 3339 date-time string with a timezone"),
        ("yesterday", "must be an RFC 3339 date-time string with a timezone"),
        (1750965578, "must be an RFC 3339 date-time string with a timezone"),
        # checked by the date-time parser after the pattern: its words, which already name the rule
        ("2025-13-01T00:00:00Z", "month value is outside expected range of 1-12"),
    ],
)
def test_occurred_at_refusal_names_the_rule(text: Any, said: str) -> None:
    """ "with a timezone" for an offset without its colon, "unexpected extra characters" for hour 24
    or a leap second: the producer was told the wrong rule, or none."""
    [(path, message)] = contract_errors(event(occurred_at=text))
    assert path == "$.occurred_at"
    assert said in message, message


def test_occurred_at_ranges_accept_what_they_did() -> None:
    """The pattern now checks the ranges the parser refused after it: each two-digit field passes
    exactly in its range, as before."""

    def taken(text: str) -> bool:
        return not contract_errors(event(occurred_at=text))

    for n in range(100):
        assert taken(f"2025-01-01T{n:02d}:00:00Z") is (n <= 23)
        assert taken(f"2025-01-01T00:{n:02d}:00Z") is (n <= 59)
        assert taken(f"2025-01-01T00:00:{n:02d}Z") is (n <= 59)
        assert taken(f"2025-01-01T00:00:00+{n:02d}:00") is (n <= 23)
        assert taken(f"2025-01-01T00:00:00-00:{n:02d}") is (n <= 59)


def test_occurred_at_optional() -> None:
    assert accepts(event()).occurred_at is None
    assert accepts(event(occurred_at=None)).occurred_at is None


# --- source --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["argo-cd", "alertmanager", "", "s" * 128, None])
def test_source_accepts(source: str | None) -> None:
    assert accepts(event(source=source)).source == source


@pytest.mark.parametrize("source", ["s" * 129, 1, True, ["argo-cd"]])
def test_source_rejects(source: Any) -> None:
    rejects(event(source=source), "source")


# --- result --------------------------------------------------------------------------------------

SUCCEEDED_RESULT = {"comment": "ok", "is_verified_in_change_time": True, "verified_docs": "DOC-1"}
FAILED_RESULT = {
    **SUCCEEDED_RESULT,
    "change_fail_type": "fr_dependent_service_issue",
    "rollback_start_time": 1_750_000_000_000,
    "rollback_end_time": 1_750_000_060_000,
    "is_rollback_success": False,
    "is_monitor_found": True,
}
ALLOWED_RESULT = {
    EventType.SUCCEEDED: SUCCEEDED_RESULT,
    EventType.FAILED: FAILED_RESULT,
    EventType.CANCELLED: {"comment": "cancelled"},
}


@pytest.mark.parametrize("kind", RESULT_TYPES)
def test_result_accepts_all_allowed_keys(kind: EventType) -> None:
    result = ALLOWED_RESULT[kind]
    parsed = accepts(event(kind, result=result))
    assert parsed.result.model_dump(exclude_unset=True) == result


@pytest.mark.parametrize("kind", RESULT_TYPES)
def test_result_optional_and_may_be_empty(kind: EventType) -> None:
    assert accepts(event(kind)).result.model_dump(exclude_none=True) == {}
    assert accepts(event(kind, result={})).result.model_dump(exclude_none=True) == {}


@pytest.mark.parametrize("kind", RESULT_TYPES)
def test_a_null_result_is_one_left_out(kind: EventType) -> None:
    """Producers that write every field of one envelope class (Jackson's default, Go without
    omitempty) send null for an unset result: it maps exactly as an absent one."""
    parsed = accepts(event(kind, result=None))
    assert parsed.result == accepts(event(kind)).result
    assert request_wire(parsed) == request_wire(accepts(event(kind)))


@pytest.mark.parametrize(
    ("kind", "key"),
    [(EventType.SUCCEEDED, key) for key in set(FAILED_RESULT) - set(SUCCEEDED_RESULT)]
    + [(EventType.CANCELLED, key) for key in set(FAILED_RESULT) - {"comment"}]
    + [(kind, "unknown") for kind in RESULT_TYPES]
    + [(kind, "change_result") for kind in RESULT_TYPES],
)
def test_result_rejects_keys_of_other_types(kind: EventType, key: str) -> None:
    rejects(event(kind, result={key: FAILED_RESULT.get(key, "x")}), key)


@pytest.mark.parametrize("kind", [EventType.STARTED, EventType.ENDED, EventType.TICKET_UPDATE])
@pytest.mark.parametrize("result", [{}, {"comment": "x"}])
def test_result_only_on_result_types(kind: EventType, result: dict[str, Any]) -> None:
    rejects(event(kind, result=result), "result")


@pytest.mark.parametrize("kind", RESULT_TYPES)
@pytest.mark.parametrize("result", ["ok", [], 1])
def test_result_must_be_an_object(kind: EventType, result: Any) -> None:
    rejects(event(kind, result=result), "result")


@pytest.mark.parametrize("kind", RESULT_TYPES)
def test_comment_length(kind: EventType) -> None:
    assert accepts(event(kind, result={"comment": "c" * 2000})).result.comment == "c" * 2000
    assert accepts(event(kind, result={"comment": "é" * 2000})).result.comment == "é" * 2000
    rejects(event(kind, result={"comment": "c" * 2001}), "comment")


@pytest.mark.parametrize("kind", RESULT_TYPES)
@pytest.mark.parametrize("comment", [1, True, ["x"], {"x": 1}])
def test_comment_must_be_text(kind: EventType, comment: Any) -> None:
    rejects(event(kind, result={"comment": comment}), "comment")


@pytest.mark.parametrize(
    "window",
    [
        {"rollback_start_time": 946_684_800_000, "rollback_end_time": 946_684_800_000},  # 2000-01-01
        {"rollback_start_time": 1_750_000_000_000, "rollback_end_time": 1_750_000_000_000},
        {"rollback_start_time": 1_750_000_000_000, "rollback_end_time": 1_750_000_000_001},
        {"rollback_start_time": 1_750_000_000_000},
        {"rollback_end_time": 1_750_000_000_000},
        {"rollback_start_time": None, "rollback_end_time": None},
    ],
)
def test_rollback_window_accepts(window: dict[str, Any]) -> None:
    accepts(event(EventType.FAILED, result=window))


@pytest.mark.parametrize("field", ["rollback_start_time", "rollback_end_time"])
@pytest.mark.parametrize("value", [0, 1_750_000_000, 946_684_799_999])  # seconds, or before 2000
def test_rollback_times_are_epoch_milliseconds(field: str, value: int) -> None:
    """A time in epoch seconds was taken as milliseconds and sent: a date in January 1970."""
    rejects(event(EventType.FAILED, result={field: value}), field)


@pytest.mark.parametrize(
    "window",
    [
        {"rollback_start_time": 1_750_000_000_001, "rollback_end_time": 1_750_000_000_000},
        {"rollback_start_time": 1_750_000_000_000, "rollback_end_time": 1_749_999_999_999},
    ],
)
def test_rollback_end_before_start_rejected(window: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="rollback_end_time must be >= rollback_start_time"):
        accepts(event(EventType.FAILED, result=window))


@pytest.mark.parametrize("field", ["rollback_start_time", "rollback_end_time"])
@pytest.mark.parametrize("value", [-1, 10**19, 1.0, 1.5, "1750000000000", True, False, float("nan")])
def test_rollback_times_are_epoch_ms_integers(field: str, value: Any) -> None:
    rejects(event(EventType.FAILED, result={field: value}), field)


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (EventType.SUCCEEDED, "is_verified_in_change_time"),
        (EventType.FAILED, "is_verified_in_change_time"),
        (EventType.FAILED, "is_rollback_success"),
        (EventType.FAILED, "is_monitor_found"),
    ],
)
@pytest.mark.parametrize("value", ["true", "false", 1, 0, "yes", 1.0, [True]])
def test_bool_fields_are_strict(kind: EventType, field: str, value: Any) -> None:
    rejects(event(kind, result={field: value}), field)


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (EventType.SUCCEEDED, "verified_docs"),
        (EventType.FAILED, "verified_docs"),
        (EventType.FAILED, "change_fail_type"),
    ],
)
@pytest.mark.parametrize("value", [1, True, ["x"], {"x": "y"}])
def test_text_fields_are_strict(kind: EventType, field: str, value: Any) -> None:
    rejects(event(kind, result={field: value}), field)


# --- ticket_info ---------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", list(Phase))
def test_ticket_info_accepts_each_phase(phase: Phase) -> None:
    parsed = accepts(event(EventType.TICKET_UPDATE, ticket_info={"phase": phase.value}))
    assert parsed.ticket_info.phase is phase


def test_seven_phases() -> None:
    assert {p.value for p in Phase} == {
        "phase_change_end",
        "phase_change_cancel",
        "phase_change_draft",
        "phase_change_implemente",
        "phase_change_apply",
        "phase_change_approve",
        "phase_change_close",
    }


@pytest.mark.parametrize(
    "info",
    [
        {"work_flow_status": "closed"},
        {"phase": "phase_change_end", "work_flow_status": "done"},
        {"phase": "phase_change_end", "work_flow_status": None},
    ],
)
def test_ticket_info_accepts(info: dict[str, Any]) -> None:
    parsed = accepts(event(EventType.TICKET_UPDATE, ticket_info=info))
    assert parsed.ticket_info.work_flow_status == info.get("work_flow_status")


@pytest.mark.parametrize(
    "info",
    [
        {},
        {"phase": None},
        {"phase": None, "work_flow_status": None},
        {"phase": "phase_change_implement"},
        {"phase": "PHASE_CHANGE_END"},
        {"phase": "phase_change_end "},
        {"phase": ""},
        {"phase": 1},
        {"phase": ["phase_change_end"]},
        {"work_flow_status": 3},
        {"work_flow_status": True},
        # "" met "phase and/or work_flow_status" and sent a PUT that changed nothing
        {"work_flow_status": ""},
        {"phase": "phase_change_end", "work_flow_status": ""},
        {"phase": "phase_change_end", "unknown": 1},
        {"action": "change_start_change_success"},
    ],
)
def test_ticket_info_rejects(info: dict[str, Any]) -> None:
    rejects(event(EventType.TICKET_UPDATE, ticket_info=info), "ticket_info")


@pytest.mark.parametrize("info", [None, "phase_change_end", [], 1])
def test_ticket_info_must_be_an_object(info: Any) -> None:
    rejects(event(EventType.TICKET_UPDATE, ticket_info=info), "ticket_info")


def test_ticket_info_required_on_ticket_update() -> None:
    rejects(without(event(EventType.TICKET_UPDATE), "ticket_info"), "ticket_info")


@pytest.mark.parametrize("kind", CHANGE_TYPES)
def test_ticket_info_only_on_ticket_update(kind: EventType) -> None:
    rejects(event(kind, ticket_info={"phase": "phase_change_end"}), "ticket_info")


# --- null for a key of another type's event ------------------------------------------------------


def test_not_taken_is_each_types_missing_envelope_keys() -> None:
    """The table the tests below use is the rule itself: a key of some types and not this one."""
    for kind, model in MODELS.items():
        assert set(NOT_TAKEN[kind]) == set(ENVELOPE_KEYS) - set(model.model_fields), kind


@pytest.fixture(scope="module")
def event_schema() -> Draft202012Validator:
    return Draft202012Validator(json.loads((JSON_DIR / "change-event.v1.schema.json").read_text("utf-8")))


@pytest.mark.parametrize(("kind", "key"), [(kind, key) for kind, keys in NOT_TAKEN.items() for key in keys])
def test_null_for_a_key_the_type_does_not_take_is_one_left_out(
    kind: EventType, key: str, event_schema: Draft202012Validator
) -> None:
    """Jackson's default and Go without omitempty write null for every unset field of an envelope
    class: the same producer's change.succeeded passed and its change.started was invalid."""
    raw = event(kind, **{key: None})
    parsed = accepts(raw)
    assert parsed == accepts(event(kind))
    assert request_wire(parsed) == request_wire(accepts(event(kind)))
    assert raw[key] is None  # the producer's dict is not changed
    assert event_schema.is_valid(raw)


@pytest.mark.parametrize("kind", list(EventType))
def test_a_whole_envelope_with_nulls_maps_as_the_event_without_them(
    kind: EventType, event_schema: Draft202012Validator
) -> None:
    """Every key of the envelope class written, null where unset (result too on its own types)."""
    envelope = {"schema_version": None, "occurred_at": None, "source": None}
    envelope |= {key: None for key in NOT_TAKEN[kind]}
    if kind in RESULT_TYPES:
        envelope["result"] = None
    raw = event(kind, **envelope)
    assert request_wire(accepts(raw)) == request_wire(accepts(event(kind)))
    assert event_schema.is_valid(raw)


@pytest.mark.parametrize(
    ("kind", "key"),
    [(kind, "sub_ticket_id") for kind in CHANGE_TYPES] + [(EventType.TICKET_UPDATE, "ticket_info")],
)
def test_null_for_a_key_the_type_requires_is_refused(
    kind: EventType, key: str, event_schema: Draft202012Validator
) -> None:
    raw = event(kind, **{key: None})
    rejects(raw, key)
    [(path, message)] = contract_errors(raw)
    assert path == f"$.{key}"
    assert "not null" in message
    assert not event_schema.is_valid(raw)


@pytest.mark.parametrize(("kind", "key"), [(kind, key) for kind, keys in NOT_TAKEN.items() for key in keys])
@pytest.mark.parametrize("value", [{}, {"phase": "phase_change_end"}, "S1", "", 0, False, []])
def test_a_value_for_a_key_the_type_does_not_take_is_still_refused(
    kind: EventType, key: str, value: Any, event_schema: Draft202012Validator
) -> None:
    """Only null stands for the key left out: ``"result": {}`` on change.started stays invalid."""
    raw = event(kind, **{key: value})
    rejects(raw, key)
    assert not event_schema.is_valid(raw)


def test_the_schema_refuses_an_empty_work_flow_status(event_schema: Draft202012Validator) -> None:
    raw = event(EventType.TICKET_UPDATE, ticket_info={"work_flow_status": ""})
    rejects(raw, "work_flow_status")
    assert not event_schema.is_valid(raw)
    assert event_schema.is_valid(event(EventType.TICKET_UPDATE, ticket_info={"work_flow_status": "x"}))


# --- unknown fields and strict types -------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EventType))
@pytest.mark.parametrize("key", ["extra", "Ticket_id", "ticketId", "history_info", "sub_tickets", ""])
def test_unknown_top_level_fields_rejected(kind: EventType, key: str) -> None:
    rejects(event(kind, **{key: "x"}), key)


@pytest.mark.parametrize("field", ["event_id", "ticket_id", "sub_ticket_id", "source"])
def test_text_fields_refuse_numbers(field: str) -> None:
    rejects(event(**{field: 12345}), field)


def test_not_an_object_rejected() -> None:
    for value in [[], "event", 1, None]:
        with pytest.raises(ValidationError):
            CHANGE_EVENT_ADAPTER.validate_python(value)


def test_events_are_immutable() -> None:
    parsed = accepts(event())
    with pytest.raises(ValidationError):
        parsed.ticket_id = "other"


# --- properties ----------------------------------------------------------------------------------

ticket_ids = st.text(alphabet=TICKET_ID_CHARS, min_size=1, max_size=64)
event_ids = st.text(alphabet=EVENT_ID_CHARS, min_size=1, max_size=128)


def _with_outsider(allowed: str, max_size: int) -> st.SearchStrategy[str]:
    """Strings of at most ``max_size`` characters with at least one character outside ``allowed``."""
    outsider = st.characters(codec="utf-8").filter(lambda ch: ch not in allowed)
    inside = st.text(alphabet=allowed, max_size=(max_size - 1) // 2)
    return st.tuples(inside, outsider, inside).map("".join)


@settings(max_examples=200)
@given(value=ticket_ids, field=st.sampled_from(["ticket_id", "sub_ticket_id"]))
def test_generated_valid_ticket_ids_pass(value: str, field: str) -> None:
    assert getattr(accepts(event(**{field: value})), field) == value


@settings(max_examples=300)
@given(value=_with_outsider(TICKET_ID_CHARS, 64), field=st.sampled_from(["ticket_id", "sub_ticket_id"]))
def test_generated_ids_with_a_foreign_character_fail(value: str, field: str) -> None:
    rejects(event(**{field: value}), field)


@settings(max_examples=200)
@given(value=event_ids)
def test_generated_valid_event_ids_pass(value: str) -> None:
    assert accepts(event(event_id=value)).event_id == value


@settings(max_examples=300)
@given(value=_with_outsider(EVENT_ID_CHARS, 128))
def test_generated_event_ids_with_a_foreign_character_fail(value: str) -> None:
    rejects(event(event_id=value), "event_id")


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


epoch_ms = st.integers(min_value=946_684_800_000, max_value=253_402_300_799_999)
comments = st.text(max_size=2000).filter(lambda s: not any("\ud800" <= c <= "\udfff" for c in s))
short_text = st.text(max_size=256)


@st.composite
def failed_results(draw: st.DrawFn) -> dict[str, Any]:
    result = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "comment": comments,
                "is_verified_in_change_time": st.booleans(),
                "verified_docs": short_text,
                "change_fail_type": short_text,
                "is_rollback_success": st.booleans(),
                "is_monitor_found": st.booleans(),
            },
        )
    )
    times = draw(st.lists(epoch_ms, max_size=2))
    for name, value in zip(("rollback_start_time", "rollback_end_time"), sorted(times), strict=False):
        result[name] = value
    return result


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(list(EventType)))
    fields: dict[str, Any] = {
        "event_id": draw(event_ids),
        "ticket_id": draw(ticket_ids),
        "type": kind.value,
    }
    optional = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "schema_version": st.just(1),
                "source": _optional(st.text(max_size=128)),
                "occurred_at": st.builds(
                    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))),
                    st.datetimes(),
                    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
                ).map(datetime.isoformat),
            },
        )
    )
    fields.update(optional)
    fields.update(draw(st.fixed_dictionaries({}, optional={key: st.none() for key in NOT_TAKEN[kind]})))
    if kind is EventType.TICKET_UPDATE:
        info = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "phase": st.sampled_from([p.value for p in Phase]),
                    "work_flow_status": st.text(min_size=1, max_size=256),
                },
            ).filter(bool)
        )
        fields["ticket_info"] = info
        return fields
    fields["sub_ticket_id"] = draw(ticket_ids)
    if kind is EventType.SUCCEEDED:
        fields["result"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "comment": comments,
                    "is_verified_in_change_time": st.booleans(),
                    "verified_docs": short_text,
                },
            )
        )
    elif kind is EventType.FAILED:
        fields["result"] = draw(failed_results())
    elif kind is EventType.CANCELLED:
        fields["result"] = draw(st.fixed_dictionaries({}, optional={"comment": comments}))
    return fields


@settings(max_examples=300)
@given(raw=valid_events())
def test_random_valid_events_map_to_their_sub_ticket(raw: dict[str, Any]) -> None:
    parsed = accepts(raw)
    body = to_request_body(parsed).to_wire()
    assert request_path(parsed.ticket_id) == f"/v1/change/tickets/{raw['ticket_id']}"
    if parsed.type is EventType.TICKET_UPDATE:
        assert body == {"ticket_info": {k: v for k, v in raw["ticket_info"].items() if v is not None}}
        return
    assert [sub["ticket_id"] for sub in body["sub_tickets"]] == [raw["sub_ticket_id"]]
    assert "ticket_info" not in body
    sent = body["sub_tickets"][0]
    for key, value in (raw.get("result") or {}).items():
        assert sent[key] == value
