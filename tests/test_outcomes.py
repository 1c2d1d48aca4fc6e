"""``dump_outcome`` writes the same bytes as the ``OutcomeEvent`` model would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.outcomes import OutcomeEvent, dump_outcome

RECEIVED = datetime(2026, 11, 28, 22, 0, 1, 123456, tzinfo=UTC)


def fields(**changes: Any) -> dict[str, Any]:
    """An outcome as the pipeline builds it: every field, in the model's order."""
    values: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "argo-cd:e1",
        "ticket_id": "CM-1",
        "sub_ticket_id": "S-1",
        "type": "change.failed",
        "status": "applied",
        "reason": None,
        "attempts": 1,
        "http_status": 200,
        "error_code": None,
        "error_msg": None,
        "request": {"sub_tickets": [{"ticket_id": "S-1", "sub_tickets": [], "verified_docs": None}]},
        "source": {"topic": "coc.change-events", "partition": 3, "offset": 42},
        "received_at": RECEIVED,
        "finished_at": RECEIVED + timedelta(milliseconds=12, microseconds=7),
        "duration_ms": 12.007,
        "worker": "w-1",
        "redelivered": False,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
    }
    values.update(changes)
    return values


@pytest.mark.parametrize(
    "outcome",
    [
        fields(),
        fields(redelivered=True, reason="reconciled", attempts=3),
        # an unreadable message: no identity, no request, no trace
        fields(
            event_id=None,
            ticket_id=None,
            sub_ticket_id=None,
            type=None,
            status="invalid",
            reason="bad_json",
            attempts=0,
            http_status=None,
            error_msg='Expecting value: line 1 column 1 (char 0) "\u00e9\u4e2d" \\ \n',
            request=None,
            trace_id=None,
        ),
        fields(
            status="rejected",
            reason="api_rejected",
            http_status=400,
            error_code="COC.00040001",
            error_msg="ticket is closed",
            duration_ms=0.0,
        ),
        fields(status="failed", reason="retries_exhausted", attempts=5, http_status=503, duration_ms=30001.5),
    ],
)
def test_dump_outcome_is_the_models_json(outcome: dict[str, Any]) -> None:
    model = OutcomeEvent.model_validate(outcome)  # the values are a valid outcome
    assert dump_outcome(outcome) == model.model_dump_json().encode()
    assert OutcomeEvent.model_validate_json(dump_outcome(outcome)) == model


def test_the_fields_are_the_models_in_its_order() -> None:
    assert list(fields()) == list(OutcomeEvent.model_fields)
