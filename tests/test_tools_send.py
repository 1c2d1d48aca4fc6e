"""``send``: exit codes by outcome status, and the one-line summary a CI log shows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.outcomes import OutcomeEvent, OutcomeStatus, SourceRef
from worker.tools.kafka_io import Delivered
from worker.tools.send import EXIT_NOT_APPLIED, EXIT_OK, SendResult, describe_outcome

DELIVERED = Delivered("in", 0, 1)


def outcome(status: OutcomeStatus, **changes: object) -> OutcomeEvent:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "event_id": "e1",
        "ticket_id": "CM1",
        "type": "change.ended",
        "status": status,
        "attempts": 1,
        "source": SourceRef(topic="in", partition=0, offset=1),
        "received_at": now,
        "finished_at": now,
        "duration_ms": 1.0,
        "worker": "w",
    }
    values.update(changes)
    return OutcomeEvent.model_validate(values)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (OutcomeStatus.APPLIED, EXIT_OK),
        (OutcomeStatus.DUPLICATE, EXIT_OK),
        (OutcomeStatus.REJECTED, EXIT_NOT_APPLIED),
        (OutcomeStatus.FAILED, EXIT_NOT_APPLIED),
        (OutcomeStatus.INVALID, EXIT_NOT_APPLIED),
    ],
)
def test_exit_code_follows_the_status(status: OutcomeStatus, code: int) -> None:
    assert SendResult("e1", DELIVERED, "t", outcome(status)).exit_code == code


def test_exit_code_without_waiting_and_on_timeout() -> None:
    assert SendResult("e1", DELIVERED, "t").exit_code == EXIT_OK
    assert SendResult("e1", DELIVERED, "t", timed_out=True).exit_code == EXIT_NOT_APPLIED


def test_summary_lines() -> None:
    assert (
        describe_outcome(outcome(OutcomeStatus.APPLIED, http_status=200))
        == "applied (HTTP 200, after 1 attempt)"
    )
    rejected = outcome(
        OutcomeStatus.REJECTED,
        reason="api_rejected",
        http_status=400,
        error_code="GOM.00001005",
        error_msg="sub-ticket s1 is pending;\n end needs implementing",
    )
    assert describe_outcome(rejected) == (
        "rejected (reason api_rejected, HTTP 400, GOM.00001005, after 1 attempt) "
        "- sub-ticket s1 is pending; end needs implementing"
    )
    assert describe_outcome(outcome(OutcomeStatus.DUPLICATE, attempts=0, reason="duplicate_event_id")) == (
        "duplicate (reason duplicate_event_id)"
    )
