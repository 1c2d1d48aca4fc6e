"""``outcomes tail``: the filter and the table's rows."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.outcomes import OutcomeEvent, OutcomeStatus, SourceRef
from worker.tools.tail import OutcomeFilter, header, row


def outcome(**changes: object) -> OutcomeEvent:
    values: dict[str, object] = {
        "event_id": "ev-1",
        "ticket_id": "CM1",
        "sub_ticket_id": "s1",
        "type": "change.ended",
        "status": OutcomeStatus.APPLIED,
        "attempts": 1,
        "http_status": 200,
        "source": SourceRef(topic="in", partition=0, offset=5),
        "received_at": datetime(2025, 11, 28, 3, 0, 0, tzinfo=UTC),
        "finished_at": datetime(2025, 11, 28, 3, 0, 1, 250000, tzinfo=UTC),
        "duration_ms": 1.0,
        "worker": "w",
    }
    values.update(changes)
    return OutcomeEvent.model_validate(values)


def test_filter_by_ticket_and_status() -> None:
    assert OutcomeFilter().matches(outcome())
    only = OutcomeFilter(frozenset({"CM1"}), frozenset({OutcomeStatus.REJECTED, OutcomeStatus.FAILED}))
    assert not only.matches(outcome())
    assert only.matches(outcome(status="rejected"))
    assert not only.matches(outcome(status="rejected", ticket_id="CM2"))


def test_rows_line_up_under_the_header() -> None:
    head = header()
    line = row(outcome())
    assert line.startswith("03:00:01.250 applied   CM1 ")
    assert line.index("change.ended") == head.index("TYPE")
    assert line.endswith("HTTP 200")


def test_a_row_is_one_line_whatever_the_message_holds() -> None:
    line = row(
        outcome(
            status="rejected",
            reason="api_rejected",
            http_status=400,
            error_code="GOM.00001005",
            error_msg="sub-ticket s1\nis pending",
            event_id="e" * 40,
            redelivered=True,
        )
    )
    assert "\n" not in line
    # whole: ids that differ only at the end ("...-eu-west-101-start", "...-succeeded") looked the same
    assert " " + "e" * 40 + " " in line
    assert line.endswith("api_rejected HTTP 400 GOM.00001005 sub-ticket s1 is pending (redelivered)")
    invalid = row(
        outcome(
            status="invalid",
            ticket_id=None,
            sub_ticket_id=None,
            type=None,
            event_id=None,
            http_status=None,
            attempts=0,
            reason="bad_json",
        )
    )
    assert invalid.split()[1:6] == ["invalid", "-", "-", "-", "-"]


def test_coc_ticket_and_sub_ticket_ids_are_shown_whole_and_line_up() -> None:
    """The columns were 18 and 16 wide: a COC ticket id (CM and 24 digits) and a sub-ticket id (a
    UUID, as in the API reference) came out cut, and could not be copied into ``dlq replay``."""
    ticket, sub_ticket = "CM202506261919380164485133", "e72f9b49-2294-4c58-bc57-4a0c6903c5e1"
    line = row(outcome(ticket_id=ticket, sub_ticket_id=sub_ticket))
    head = header()
    assert f" {ticket} " in line
    assert f" {sub_ticket} " in line
    assert line.index(sub_ticket) == head.index("SUB-TICKET")
    assert line.index("change.ended") == head.index("TYPE")
