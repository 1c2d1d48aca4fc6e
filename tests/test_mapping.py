"""Every event type maps to exactly the request of the reference page's examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas.api import Phase, wire_bytes
from schemas.events import CHANGE_EVENT_ADAPTER, AnyChangeEvent
from worker.mapping import already_applied, request_path, request_wire, to_request_body
from worker.simulator.tickets import SubState, SubTicket, Ticket, apply_update

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "coc-update-ticket-api.txt"
FIXTURE = Path(__file__).parent / "data" / "reference_examples.json"

_EXAMPLE = re.compile(
    r"^\s*\u2022\s*(?P<title>.+?)\s*\n\s*\n\s*(?P<method>PUT) https://\{Endpoint\}(?P<path>\S+)\s*\n", re.M
)


def parse_reference(text: str) -> list[dict[str, Any]]:
    """The example requests of the reference page: title, method, path and JSON body of each."""
    decoder = json.JSONDecoder()
    examples = []
    for match in _EXAMPLE.finditer(text):
        start = text.index("{", match.end())
        body, _ = decoder.raw_decode(text, start)
        examples.append(
            {"title": match["title"], "method": match["method"], "path": match["path"], "body": body}
        )
    return examples


def _examples() -> dict[str, dict[str, Any]]:
    return {example["title"]: example for example in json.loads(FIXTURE.read_text(encoding="utf-8"))}


EXAMPLES = _examples()
TICKET = "CM202506261919380164485133"

#: Title of each reference example -> the event a producer sends for it.
EVENTS: dict[str, dict[str, Any]] = {
    "Change started.": {
        "type": "change.started",
        "sub_ticket_id": "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
    },
    "Change ended.": {
        "type": "change.ended",
        "sub_ticket_id": "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
    },
    "If the change is successful, fill in the change result.": {
        "type": "change.succeeded",
        "sub_ticket_id": "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
        "result": {"is_verified_in_change_time": True, "comment": "Change succeeded."},
    },
    "If the change fails, fill in the change result.": {
        "type": "change.failed",
        "sub_ticket_id": "80f198c6-14c0-4541-8e2d-1808bfcedf48",
        "result": {
            "comment": "Change failed.",
            "change_fail_type": "fr_dependent_service_issue",
            "is_rollback_success": True,
            "is_monitor_found": False,
        },
    },
    "Change canceled.": {
        "type": "change.cancelled",
        "sub_ticket_id": "b0a966fa-5be7-40e4-bad0-a0749d6fac9c",
        "result": {"comment": "Change cancelled."},
    },
}


def _event(**fields: Any) -> AnyChangeEvent:
    return CHANGE_EVENT_ADAPTER.validate_python({"event_id": "evt-1", "ticket_id": TICKET, **fields})


def test_fixture_matches_reference_page() -> None:
    if not REFERENCE.exists():
        pytest.skip(f"reference page not present at {REFERENCE} (outside the repo, e.g. in CI)")
    parsed = parse_reference(REFERENCE.read_text(encoding="utf-8"))
    assert len(parsed) == 5
    assert parsed == json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_every_example_has_an_event() -> None:
    assert set(EVENTS) == set(EXAMPLES)
    assert len(EXAMPLES) == 5


@pytest.mark.parametrize("title", list(EVENTS))
def test_event_maps_to_reference_example(title: str) -> None:
    example = EXAMPLES[title]
    event = _event(**EVENTS[title])

    assert request_wire(event) == example["body"]
    assert example["method"] == "PUT"
    assert request_path(event.ticket_id) == example["path"]


@pytest.mark.parametrize("title", list(EVENTS))
def test_wire_json_is_the_examples_json(title: str) -> None:
    """Text comparison too: dict equality alone would let ``0`` pass for ``false``."""
    body = request_wire(_event(**EVENTS[title]))
    expected = EXAMPLES[title]["body"]
    assert json.dumps(body, sort_keys=True, allow_nan=False) == json.dumps(expected, sort_keys=True)


#: Every optional field set, for each type: the cases where key order and nulls could differ.
FULL_EVENTS = [
    *EVENTS.values(),
    {
        "type": "change.failed",
        "sub_ticket_id": "S1",
        "result": {
            "comment": "rolled back",
            "is_verified_in_change_time": False,
            "verified_docs": "DOC-1",
            "change_fail_type": "rollback",
            "rollback_start_time": 1_750_000_000_000,
            "rollback_end_time": 1_750_000_060_000,
            "is_rollback_success": True,
            "is_monitor_found": True,
        },
    },
    {
        "type": "change.succeeded",
        "sub_ticket_id": "S1",
        "result": {"comment": "ok", "is_verified_in_change_time": True, "verified_docs": "DOC-2"},
    },
    {"type": "change.succeeded", "sub_ticket_id": "S1"},
    {"type": "change.cancelled", "sub_ticket_id": "S1", "result": {"comment": "not needed"}},
    {"type": "ticket.update", "ticket_info": {"phase": "phase_change_cancel", "work_flow_status": "x"}},
]


@pytest.mark.parametrize("fields", FULL_EVENTS)
def test_bytes_sent_are_the_request_models_bytes(fields: dict[str, Any]) -> None:
    """What the pipeline sends, built straight from the event, passes the request model and is
    byte for byte what the model would send: same keys, same nulls, same order."""
    wire = request_wire(_event(**fields))
    request = to_request_body(_event(**fields))
    assert request.to_wire() == wire
    sent = wire_bytes(wire)  # what the pipeline signs and sends
    assert sent == request.__pydantic_serializer__.to_json(request, exclude_unset=True)
    assert sent == json.dumps(wire, separators=(",", ":"), ensure_ascii=False).encode()


def test_failed_with_rollback_window_sends_the_times() -> None:
    event = _event(
        type="change.failed",
        sub_ticket_id="S1",
        result={"rollback_start_time": 1_750_000_000_000, "rollback_end_time": 1_750_000_060_000},
    )
    sub = request_wire(event)["sub_tickets"][0]
    assert sub["rollback_start_time"] == 1_750_000_000_000
    assert sub["rollback_end_time"] == 1_750_000_060_000
    assert "comment" not in sub
    assert "is_monitor_found" not in sub


def test_failed_without_result_keeps_the_examples_nulls() -> None:
    body = request_wire(_event(type="change.failed", sub_ticket_id="S1"))
    assert body == {
        "sub_tickets": [
            {
                "ticket_id": "S1",
                "sub_tickets": [],
                "change_result": "change_result_failed",
                "verified_docs": None,
                "rollback_start_time": None,
                "rollback_end_time": None,
            }
        ],
        "history_info": {"action": "change_set_change_result_success"},
    }


def test_succeeded_sends_verified_docs_when_set() -> None:
    event = _event(type="change.succeeded", sub_ticket_id="S1", result={"verified_docs": "DOC-1"})
    sub = request_wire(event)["sub_tickets"][0]
    assert sub["verified_docs"] == "DOC-1"
    assert "is_verified_in_change_time" not in sub


def test_cancelled_without_comment() -> None:
    body = request_wire(_event(type="change.cancelled", sub_ticket_id="S1"))
    assert body == {
        "history_info": {"action": "change_cancel_change_success"},
        "sub_tickets": [{"ticket_id": "S1", "sub_tickets": [], "change_result": "change_result_cancel"}],
    }


@pytest.mark.parametrize(
    ("ticket_info", "expected"),
    [
        ({"phase": "phase_change_close"}, {"phase": "phase_change_close"}),
        ({"work_flow_status": "closed"}, {"work_flow_status": "closed"}),
        (
            {"phase": "phase_change_cancel", "work_flow_status": "cancelled"},
            {"phase": "phase_change_cancel", "work_flow_status": "cancelled"},
        ),
    ],
)
def test_ticket_update_sends_ticket_info_only(ticket_info: dict[str, Any], expected: dict[str, Any]) -> None:
    body = request_wire(_event(type="ticket.update", ticket_info=ticket_info))
    assert body == {"ticket_info": expected}


@pytest.mark.parametrize("phase", list(Phase))
def test_ticket_update_every_phase(phase: Phase) -> None:
    body = request_wire(_event(type="ticket.update", ticket_info={"phase": phase.value}))
    assert body == {"ticket_info": {"phase": phase.value}}


@pytest.mark.parametrize("ticket_id", ["CM1", "a-b_C-9", "x" * 64])
def test_request_path(ticket_id: str) -> None:
    assert request_path(ticket_id) == f"/v1/change/tickets/{ticket_id}"


# --- already_applied: the ticket read confirms this event's change, not just a like one ----------
def _detail_after(*events: AnyChangeEvent) -> dict[str, Any]:
    """The ticket's detail (the simulator's ``GET``) after these events were applied to a
    sub-ticket where they may be (a result needs it ended, a cancellation still running)."""
    state = SubState.IMPLEMENTING if events[0].type.value == "change.cancelled" else SubState.ENDED
    ticket = Ticket(TICKET, sub_tickets={"s-1": SubTicket("s-1", TICKET, state)})
    for event in events:
        apply_update(ticket, to_request_body(event), now_ms=1)
    return {"error_code": "GOM.00000000", "data": ticket.snapshot()}


_DEPLOY_FAILED = {
    "type": "change.failed",
    "sub_ticket_id": "s-1",
    "result": {
        "comment": "deploy failed: disk full",
        "change_fail_type": "fr_dependent_service_issue",
        "is_rollback_success": False,
        "rollback_start_time": 1750000000000,
        "rollback_end_time": 1750000100000,
    },
}
_MONITOR_FAILED = {
    "type": "change.failed",
    "sub_ticket_id": "s-1",
    "result": {"comment": "alert: 5xx spike", "change_fail_type": "fr_monitoring", "is_monitor_found": True},
}


@pytest.mark.parametrize(
    "fields",
    [
        _DEPLOY_FAILED,
        _MONITOR_FAILED,
        {"type": "change.failed", "sub_ticket_id": "s-1"},
        {
            "type": "change.succeeded",
            "sub_ticket_id": "s-1",
            "result": {"comment": "ok", "verified_docs": "D-1"},
        },
        {"type": "change.succeeded", "sub_ticket_id": "s-1"},
        {"type": "change.cancelled", "sub_ticket_id": "s-1", "result": {"comment": "window closed"}},
    ],
    ids=["failed", "monitor-failed", "failed-bare", "succeeded", "succeeded-bare", "cancelled"],
)
def test_a_result_in_place_is_confirmed(fields: dict[str, Any]) -> None:
    event = _event(**fields)
    assert already_applied(event, _detail_after(event)) is True


@pytest.mark.parametrize(
    ("first", "mine"),
    [
        (_MONITOR_FAILED, _DEPLOY_FAILED),
        (_DEPLOY_FAILED, _MONITOR_FAILED),
        (
            {"type": "change.succeeded", "sub_ticket_id": "s-1", "result": {"comment": "by the pipeline"}},
            {"type": "change.succeeded", "sub_ticket_id": "s-1", "result": {"comment": "by the operator"}},
        ),
        (
            {"type": "change.succeeded", "sub_ticket_id": "s-1"},
            {"type": "change.succeeded", "sub_ticket_id": "s-1", "result": {"verified_docs": "D-1"}},
        ),
        (
            {"type": "change.cancelled", "sub_ticket_id": "s-1", "result": {"comment": "a"}},
            {"type": "change.cancelled", "sub_ticket_id": "s-1", "result": {"comment": "b"}},
        ),
    ],
    ids=["deploy-after-monitor", "monitor-after-deploy", "other-comment", "docs-missing", "cancel-comment"],
)
def test_a_like_result_of_another_event_is_not_this_ones(first: dict[str, Any], mine: dict[str, Any]) -> None:
    """Two producers report one sub-ticket's result; the state alone would confirm the second
    from the first, and its own result would be lost without a dead letter."""
    detail = _detail_after(_event(**first))
    assert already_applied(_event(**mine), detail) is False


def test_a_result_field_sent_null_may_be_absent_from_the_read() -> None:
    event = _event(type="change.failed", sub_ticket_id="s-1")  # sends the examples' nulls
    detail = _detail_after(event)
    sub = detail["data"]["sub_tickets"][0]
    for name in ("rollback_start_time", "rollback_end_time", "verified_docs"):
        sub.pop(name, None)
    assert already_applied(event, detail) is True
    sub["rollback_start_time"] = 1750000000000  # a value this event did not send
    assert already_applied(event, detail) is False
