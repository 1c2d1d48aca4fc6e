"""Map a validated change event to the exact API request body of the reference page's examples.

Each event type produces the body of one example (started, ended, succeeded, failed, cancelled),
key for key, including the explicit ``null`` and empty-list values those examples send. Keys the
reference does not show are sent only when the producer set them.
"""

from __future__ import annotations

from typing import Any

from schemas.api import ChangeResult, HistoryAction, UpdateTicketBody
from schemas.events import (
    AnyChangeEvent,
    ChangeCancelled,
    ChangeEnded,
    ChangeFailed,
    ChangeStarted,
    ChangeSucceeded,
    TicketUpdate,
)

TICKET_TYPE = "change"
_START, _END = HistoryAction.START.value, HistoryAction.END.value
#: The result fields each example may carry, in ``SubTicketBody``'s field order.
_SUCCEEDED_FIELDS = ("is_verified_in_change_time", "verified_docs", "comment")
_FAILED_FIELDS = (
    "is_verified_in_change_time",
    "verified_docs",
    "comment",
    "change_fail_type",
    "rollback_start_time",
    "rollback_end_time",
    "is_rollback_success",
    "is_monitor_found",
)


def _set(result: Any, names: tuple[str, ...], always: tuple[str, ...] = ()) -> dict[str, Any]:
    """The result's fields among ``names``: those in ``always`` even when null (as the examples
    send them), the others only when set. ``names`` go in the request model's field order, so
    that the bytes are the ones the model would give."""
    fields = {}
    for name in names:
        value = getattr(result, name)
        if value is not None or name in always:
            fields[name] = value
    return fields


def _with_result(
    sub_ticket_id: str, result: ChangeResult, fields: dict[str, Any], action: HistoryAction
) -> dict[str, Any]:
    """The body of the succeeded, failed and cancelled examples: the sub-ticket's result, the action."""
    sub = {"ticket_id": sub_ticket_id, "sub_tickets": [], "change_result": result.value, **fields}
    return {"sub_tickets": [sub], "history_info": {"action": action.value}}


def request_wire(event: AnyChangeEvent) -> dict[str, Any]:
    """The JSON object sent as the body of ``PUT /v1/change/tickets/{event.ticket_id}``.

    Built straight from the validated event's fields: building the nested request models and
    dumping them again cost ~8 us per event on the hot path. ``to_request_body`` holds this
    object to the request models (``schemas.api``), the tests to the reference examples.
    """
    match event:
        case ChangeStarted():
            return {"sub_tickets": [{"ticket_id": event.sub_ticket_id}], "history_info": {"action": _START}}
        case ChangeEnded():
            return {"sub_tickets": [{"ticket_id": event.sub_ticket_id}], "history_info": {"action": _END}}
        case ChangeSucceeded():
            fields = _set(event.result, _SUCCEEDED_FIELDS, always=("verified_docs",))
            return _with_result(event.sub_ticket_id, ChangeResult.SUCCESS, fields, HistoryAction.SET_RESULT)
        case ChangeFailed():
            fields = _set(
                event.result,
                _FAILED_FIELDS,
                always=("verified_docs", "rollback_start_time", "rollback_end_time"),
            )
            return _with_result(event.sub_ticket_id, ChangeResult.FAILED, fields, HistoryAction.SET_RESULT)
        case ChangeCancelled():
            fields = _set(event.result, ("comment",))
            return _with_result(event.sub_ticket_id, ChangeResult.CANCEL, fields, HistoryAction.CANCEL)
        case TicketUpdate():
            info = event.ticket_info
            ticket_info: dict[str, Any] = {}
            if info.phase is not None:
                ticket_info["phase"] = info.phase.value
            if info.work_flow_status is not None:
                ticket_info["work_flow_status"] = info.work_flow_status
            return {"ticket_info": ticket_info}
    raise TypeError(f"no mapping for {type(event).__name__}")  # pragma: no cover - the union is closed


def to_request_body(event: AnyChangeEvent) -> UpdateTicketBody:
    """``request_wire(event)`` as the typed request model: validated against the API's contract,
    with exactly the keys the wire object has (``to_wire()`` gives it back)."""
    return UpdateTicketBody.model_validate(request_wire(event))


#: The state a sub-ticket is in once each change event has been applied.
_TARGET_SUB_STATE = {
    ChangeStarted: "implementing",
    ChangeEnded: "ended",
    ChangeSucceeded: "succeeded",
    ChangeFailed: "failed",
    ChangeCancelled: "cancelled",
}


def already_applied(event: AnyChangeEvent, ticket: dict[str, Any]) -> bool:
    """Whether the ticket detail (``GET`` of the ticket) shows this event's change in place.

    Used only after an ambiguous attempt (the connection dropped after sending) was followed by a
    refusal: if the ticket is exactly where the event would have put it, the first attempt was
    applied. Reads ``data.phase``/``data.work_flow_status``, and ``data.sub_tickets[].state`` with,
    for a result, the result fields the event sends; when the answer lacks those fields nothing is
    confirmed and the event stays rejected.
    """
    data = ticket.get("data")
    if not isinstance(data, dict):
        return False
    if isinstance(event, TicketUpdate):
        info = event.ticket_info
        return (info.phase is None or data.get("phase") == info.phase.value) and (
            info.work_flow_status is None or data.get("work_flow_status") == info.work_flow_status
        )
    target = _TARGET_SUB_STATE[type(event)]
    for sub in data.get("sub_tickets") or []:
        if isinstance(sub, dict) and sub.get("ticket_id") == event.sub_ticket_id:
            return sub.get("state") == target and _result_in_place(event, sub)
    return False


def _result_in_place(event: AnyChangeEvent, sub: dict[str, Any]) -> bool:
    """Whether the sub-ticket read shows this event's result fields, not only its state.

    The state alone cannot tell two results apart: a monitoring system's ``change.failed`` and
    the deploy system's for the same sub-ticket both leave it ``failed``, and confirming the
    second from the first's state would report it applied while its comment, fail type and
    rollback window were never sent. A field sent as null (or an empty list) may be absent from
    the read; any other value must be there, equal.
    """
    if isinstance(event, ChangeStarted | ChangeEnded):
        return True  # they carry nothing but the step
    (sent,) = request_wire(event)["sub_tickets"]
    for name, value in sent.items():
        if name in ("ticket_id", "sub_tickets"):
            continue
        if value is None or value == []:
            if sub.get(name) not in (None, []):
                return False
        elif sub.get(name) != value:
            return False
    return True


def event_target(event: AnyChangeEvent) -> str:
    """What the event changes, e.g. ``change.started CM1/s-1``: two messages with one event_id and
    the same target are one event sent twice; with different targets, the id was reused."""
    sub_ticket_id = event.sub_ticket_id if not isinstance(event, TicketUpdate) else ""
    return f"{event.type.value} {event.ticket_id}/{sub_ticket_id}"


def request_path(ticket_id: str) -> str:
    """The URL path; ``ticket_id`` is already restricted to ``[A-Za-z0-9_-]`` by the contract."""
    return f"/v1/{TICKET_TYPE}/tickets/{ticket_id}"
