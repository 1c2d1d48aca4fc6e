"""Building events for ``send``: flags, a file with flags on top, every contract error with its path."""

from __future__ import annotations

import io
from dataclasses import fields

import pytest

from schemas.events import ChangeFailed, TicketUpdate
from worker.decode import contract_errors
from worker.errors import InvalidEvent
from worker.tools import events
from worker.tools.events import EventFlags, build, validated


def test_every_flag_has_a_place_in_the_event() -> None:
    placed = {"type", *events._TOP, *events._RESULT, *events._TICKET_INFO}
    assert {f.name for f in fields(EventFlags)} == placed


def test_flags_alone_make_a_complete_event() -> None:
    event = build(
        None,
        EventFlags(
            type="failed",
            ticket_id="CM1",
            sub_ticket_id="s1",
            comment="boom",
            change_fail_type="fr_x",
            is_monitor_found=True,
            rollback_start_time=1_750_000_000_000,
            rollback_end_time=1_750_000_060_000,
        ),
    )
    assert event["type"] == "change.failed"
    assert event["event_id"].startswith("cli-")
    assert event["occurred_at"].endswith("Z")
    assert event["result"] == {
        "comment": "boom",
        "change_fail_type": "fr_x",
        "rollback_start_time": 1_750_000_000_000,
        "rollback_end_time": 1_750_000_060_000,
        "is_monitor_found": True,
    }
    assert isinstance(validated(event, 1 << 20), ChangeFailed)
    started = build(None, EventFlags(type="started", ticket_id="CM1", sub_ticket_id="s1"))
    assert "result" not in started  # change.started takes no result
    update = build(None, EventFlags(type="update", ticket_id="CM1", phase="phase_change_close"))
    assert isinstance(validated(update, 1 << 20), TicketUpdate)


def test_flags_override_a_file_and_merge_into_its_result() -> None:
    base = {
        "event_id": "e-1",
        "type": "change.succeeded",
        "ticket_id": "CM0",
        "result": {"comment": "old", "verified_docs": "doc-1"},
    }
    event = build(base, EventFlags(ticket_id="CM1", sub_ticket_id="s1", comment="new"))
    assert event == {
        "event_id": "e-1",
        "type": "change.succeeded",
        "ticket_id": "CM1",
        "sub_ticket_id": "s1",
        "result": {"comment": "new", "verified_docs": "doc-1"},
    }
    assert base["ticket_id"] == "CM0"  # the file's object is not changed
    assert "occurred_at" not in event  # a file says what it says
    assert build({"type": "change.started"}, EventFlags())["event_id"].startswith("cli-")


def test_contract_errors_name_every_path() -> None:
    errors = dict(contract_errors({"type": "change.ended", "ticket_id": "../x", "result": {"comment": 1}}))
    assert set(errors) == {"$.event_id", "$.ticket_id", "$.sub_ticket_id", "$.result"}
    assert errors["$.sub_ticket_id"] == "Field required"
    assert contract_errors([1]) == [("$", "expected a JSON object, got an array")]
    assert (
        contract_errors({"event_id": "e", "type": "change.started", "ticket_id": "T", "sub_ticket_id": "s"})
        == []
    )


def test_validated_puts_every_error_on_one_line_and_checks_the_size() -> None:
    with pytest.raises(InvalidEvent) as invalid:
        validated({"type": "change.started"}, 1 << 20)
    assert invalid.value.reason == "schema"
    assert "\n" not in invalid.value.detail
    assert invalid.value.detail.count("Field required") == 3
    big = {
        "event_id": "e",
        "type": "change.cancelled",
        "ticket_id": "T",
        "sub_ticket_id": "s",
        "result": {"comment": "x" * 1500},
    }
    with pytest.raises(InvalidEvent) as too_large:
        validated(big, 1024)
    assert too_large.value.reason == "too_large"


def test_documents_are_read_strictly() -> None:
    assert events.parse_document(events.read_document("-", io.BytesIO(b'{"a": [1]}'))) == {"a": [1]}
    with pytest.raises(InvalidEvent) as duplicate:
        events.parse_document(b'{"a": 1, "a": 2}')
    assert duplicate.value.reason == "bad_json"
    with pytest.raises(InvalidEvent) as missing:
        events.read_document("/nonexistent/event.json", io.BytesIO())
    assert missing.value.reason == "unreadable"


def test_encoding_keeps_exactly_the_given_fields() -> None:
    assert events.encode({"ticket_id": "T", "comment": "é"}) == '{"ticket_id":"T","comment":"é"}'.encode()
