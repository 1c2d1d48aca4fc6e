"""Map a validated change event to the exact API request body of the reference page's examples.

Each event type produces the body of one example (started, ended, succeeded, failed, cancelled),
key for key, including the explicit ``null`` and empty-list values those examples send. Keys the
reference does not show are sent only when the producer set them.
"""

from __future__ import annotations

from typing import Any

from schemas.api import (
    ChangeResult,
    HistoryAction,
    HistoryInfoBody,
    SubTicketBody,
    TicketInfoBody,
    UpdateTicketBody,
)
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


def _set(result: Any, always: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, Any]:
    """Fields in ``always`` are sent even when null (as the examples do); ``optional`` only when set."""
    fields = {name: getattr(result, name) for name in always}
    fields.update({name: getattr(result, name) for name in optional if getattr(result, name) is not None})
    return fields


def to_request_body(event: AnyChangeEvent) -> UpdateTicketBody:
    """The request body for ``PUT /v1/change/tickets/{event.ticket_id}``."""
    match event:
        case ChangeStarted():
            return UpdateTicketBody(
                history_info=HistoryInfoBody(action=HistoryAction.START),
                sub_tickets=[SubTicketBody(ticket_id=event.sub_ticket_id)],
            )
        case ChangeEnded():
            return UpdateTicketBody(
                history_info=HistoryInfoBody(action=HistoryAction.END),
                sub_tickets=[SubTicketBody(ticket_id=event.sub_ticket_id)],
            )
        case ChangeSucceeded():
            fields = _set(event.result, ("verified_docs",), ("is_verified_in_change_time", "comment"))
            return UpdateTicketBody(
                sub_tickets=[
                    SubTicketBody(
                        ticket_id=event.sub_ticket_id,
                        sub_tickets=[],
                        change_result=ChangeResult.SUCCESS,
                        **fields,
                    )
                ],
                history_info=HistoryInfoBody(action=HistoryAction.SET_RESULT),
            )
        case ChangeFailed():
            fields = _set(
                event.result,
                ("verified_docs", "rollback_start_time", "rollback_end_time"),
                (
                    "is_verified_in_change_time",
                    "comment",
                    "change_fail_type",
                    "is_rollback_success",
                    "is_monitor_found",
                ),
            )
            return UpdateTicketBody(
                sub_tickets=[
                    SubTicketBody(
                        ticket_id=event.sub_ticket_id,
                        sub_tickets=[],
                        change_result=ChangeResult.FAILED,
                        **fields,
                    )
                ],
                history_info=HistoryInfoBody(action=HistoryAction.SET_RESULT),
            )
        case ChangeCancelled():
            fields = _set(event.result, (), ("comment",))
            return UpdateTicketBody(
                history_info=HistoryInfoBody(action=HistoryAction.CANCEL),
                sub_tickets=[
                    SubTicketBody(
                        ticket_id=event.sub_ticket_id,
                        sub_tickets=[],
                        change_result=ChangeResult.CANCEL,
                        **fields,
                    )
                ],
            )
        case TicketUpdate():
            info = event.ticket_info
            return UpdateTicketBody(
                ticket_info=TicketInfoBody(
                    **{
                        k: v
                        for k, v in (("phase", info.phase), ("work_flow_status", info.work_flow_status))
                        if v is not None
                    }
                )
            )
    raise TypeError(f"no mapping for {type(event).__name__}")  # pragma: no cover - the union is closed


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
    applied. Reads ``data.phase``/``data.work_flow_status`` and ``data.sub_tickets[].state``;
    when the answer lacks those fields nothing is confirmed and the event stays rejected.
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
            return bool(sub.get("state") == target)
    return False


def request_path(ticket_id: str) -> str:
    """The URL path; ``ticket_id`` is already restricted to ``[A-Za-z0-9_-]`` by the contract."""
    return f"/v1/{TICKET_TYPE}/tickets/{ticket_id}"
