"""The committed JSON Schemas are the models' own, and they are usable JSON Schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas.events import CHANGE_EVENT_ADAPTER
from schemas.export import JSON_DIR, contract_schemas, render
from schemas.outcomes import OutcomeEvent, OutcomeStatus, SourceRef

SCHEMAS = contract_schemas()
EVENT_SCHEMA = "change-event.v1.schema.json"
OUTCOME_SCHEMA = "outcome-event.v1.schema.json"

VALID_EVENTS: list[dict[str, Any]] = [
    {"event_id": "e1", "ticket_id": "CM1", "sub_ticket_id": "S1", "type": "change.started"},
    {
        "schema_version": 1,
        "event_id": "argo-cd:e2",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.failed",
        "occurred_at": "2025-06-26T19:19:38Z",
        "source": "alertmanager",
        "result": {
            "comment": "Change failed.",
            "change_fail_type": "fr_dependent_service_issue",
            "rollback_start_time": 1_750_000_000_000,
            "rollback_end_time": 1_750_000_060_000,
            "is_rollback_success": True,
            "is_monitor_found": False,
        },
    },
    {
        "event_id": "e3",
        "ticket_id": "CM1",
        "type": "ticket.update",
        "ticket_info": {"phase": "phase_change_close"},
    },
]
INVALID_EVENTS: list[dict[str, Any]] = [
    # no timezone (Python's datetime.utcnow().isoformat()), and not a date at all: the worker
    # refuses both, and "format": "date-time" alone let them through a producer's check
    {
        "event_id": "e1",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.started",
        "occurred_at": "2025-06-26T19:19:38.123456",
    },
    {
        "event_id": "e1",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.started",
        "occurred_at": "yesterday",
    },
    {"event_id": "e1", "ticket_id": "CM1", "sub_ticket_id": "S1", "type": "change.exploded"},
    {"event_id": "e1", "ticket_id": "CM1", "type": "change.started"},
    {"event_id": "e1", "ticket_id": "../CM1", "sub_ticket_id": "S1", "type": "change.started"},
    {"event_id": "e1", "ticket_id": "CM1", "sub_ticket_id": "S1", "type": "change.started", "extra": 1},
    {
        "event_id": "e1",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.started",
        "schema_version": 2,
    },
    {"event_id": "e1", "ticket_id": "CM1", "sub_ticket_id": "S1", "type": "change.started", "result": {}},
    {
        "event_id": "e1",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.succeeded",
        "result": {"comment": 1},
    },
    {
        "event_id": "e1",
        "ticket_id": "CM1",
        "type": "ticket.update",
        "ticket_info": {"phase": "phase_change_x"},
    },
    # refused by the models; before, the schema (minProperties) took a null phase as a property
    {"event_id": "e1", "ticket_id": "CM1", "type": "ticket.update", "ticket_info": {"phase": None}},
    {"event_id": "e1", "ticket_id": "CM1", "type": "ticket.update", "ticket_info": {}},
    {
        "event_id": "e1",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.failed",
        "result": {"rollback_start_time": 1_750_000_000},  # seconds, not milliseconds
    },
    [],
    # times out of range: the pattern took them (only \d{2}), the worker does not
    *(
        {
            "event_id": "e1",
            "ticket_id": "CM1",
            "sub_ticket_id": "S1",
            "type": "change.started",
            "occurred_at": t,
        }
        for t in (
            "2025-13-26T00:00:00Z",
            "2025-01-01T24:00:00Z",
            "2025-01-01T00:60:00Z",
            "2025-01-01T23:59:60Z",
            "2025-01-01T00:00:00+25:00",
            "0000-01-01T00:00:00Z",
            "2025-00-10T00:00:00Z",
            "2025-01-32T00:00:00Z",
        )
    ),
]


def _outcome(**overrides: Any) -> dict[str, Any]:
    now = datetime(2025, 6, 26, 19, 19, 38, tzinfo=UTC)
    outcome = OutcomeEvent(
        event_id="e1",
        ticket_id="CM1",
        sub_ticket_id="S1",
        type="change.started",
        status=OutcomeStatus.APPLIED,
        attempts=1,
        http_status=200,
        error_code="GOM.00000000",
        request={
            "history_info": {"action": "change_start_change_success"},
            "sub_tickets": [{"ticket_id": "S1"}],
        },
        source=SourceRef(topic="coc.change-events", partition=3, offset=42),
        received_at=now,
        finished_at=now,
        duration_ms=12.5,
        worker="w-1",
    ).model_dump(mode="json")
    outcome.update(overrides)
    return outcome


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_matches_models(name: str) -> None:
    path = JSON_DIR / name
    assert path.exists(), f"{path} is missing: run `make schemas` and commit the result"
    assert path.read_text(encoding="utf-8") == render(SCHEMAS[name]), (
        f"{path} drifted from the models: run `make schemas` and commit the result"
    )


def test_no_stale_schema_files() -> None:
    committed = {path.name for path in JSON_DIR.glob("*.json")}
    assert committed == set(SCHEMAS), "schemas/json/ holds files the models do not make: run `make schemas`"


def test_render_is_stable_text() -> None:
    text = render(SCHEMAS[EVENT_SCHEMA])
    assert text.endswith("}\n")
    assert json.loads(text) == SCHEMAS[EVENT_SCHEMA]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_is_a_valid_json_schema(name: str) -> None:
    document = json.loads((JSON_DIR / name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(document)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["$id"].endswith(name)


@pytest.fixture(scope="module")
def event_validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads((JSON_DIR / EVENT_SCHEMA).read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def outcome_validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads((JSON_DIR / OUTCOME_SCHEMA).read_text(encoding="utf-8")))


@pytest.mark.parametrize("value", VALID_EVENTS)
def test_event_schema_accepts_valid_event(
    event_validator: Draft202012Validator, value: dict[str, Any]
) -> None:
    CHANGE_EVENT_ADAPTER.validate_python(value)  # the models agree it is valid
    assert list(event_validator.iter_errors(value)) == []


@pytest.mark.parametrize("value", INVALID_EVENTS)
def test_event_schema_rejects_invalid_event(event_validator: Draft202012Validator, value: Any) -> None:
    assert not event_validator.is_valid(value)
    with pytest.raises(ValidationError):  # and the models agree it is invalid
        CHANGE_EVENT_ADAPTER.validate_python(value)


def test_outcome_schema_accepts_valid_outcome(outcome_validator: Draft202012Validator) -> None:
    assert list(outcome_validator.iter_errors(_outcome())) == []
    invalid_input = _outcome(
        event_id=None, ticket_id=None, type=None, status="invalid", attempts=0, reason="bad_json"
    )
    assert list(outcome_validator.iter_errors(invalid_input)) == []


@pytest.mark.parametrize(
    "outcome",
    [
        _outcome(status="exploded"),
        _outcome(attempts=-1),
        _outcome(extra=1),
        _outcome(schema_version=2),
        _outcome(source={"topic": "t", "partition": -1, "offset": 0}),
        {k: v for k, v in _outcome().items() if k != "source"},
        {k: v for k, v in _outcome().items() if k != "status"},
    ],
)
def test_outcome_schema_rejects_invalid_outcome(
    outcome_validator: Draft202012Validator, outcome: dict[str, Any]
) -> None:
    assert not outcome_validator.is_valid(outcome)
