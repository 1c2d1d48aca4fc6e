"""The COC change-ticket API: request body and response of ``PUT /v1/change/tickets/{ticket_id}``.

Field names are the reference page's (Tables 2-8), and so are the enumerations of ``phase``
(Table 3) and ``action`` (Table 5). ``change_result`` has none there (Table 4: "Value range: N/A"):
its three values are the ones the request examples send. The request models are dumped
with ``exclude_unset=True``: the mapping sets exactly the keys the reference examples show,
including the explicit ``null`` values some of them carry (``verified_docs``, rollback times).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import to_json

#: ``error_code`` of a successful call (Table 6, default value).
SUCCESS_CODE = "GOM.00000000"

#: The reference's ``Long``: a signed 64-bit integer.
Long = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class Phase(StrEnum):
    """``ticket_info.phase`` (Table 3)."""

    END = "phase_change_end"
    CANCEL = "phase_change_cancel"
    DRAFT = "phase_change_draft"
    IMPLEMENTE = "phase_change_implemente"  # sic: the API's own spelling
    APPLY = "phase_change_apply"
    APPROVE = "phase_change_approve"
    CLOSE = "phase_change_close"


class HistoryAction(StrEnum):
    """``history_info.action`` (Table 5)."""

    START = "change_start_change_success"
    END = "change_end_change_success"
    SET_RESULT = "change_set_change_result_success"
    RESULT_FAILED = "change_result_failed"
    CANCEL = "change_cancel_change_success"


class ChangeResult(StrEnum):
    """``sub_tickets[].change_result``: the values the reference's request examples send, not an
    enumeration of the reference's (Table 4 gives its value range as N/A)."""

    SUCCESS = "change_result_success"
    FAILED = "change_result_failed"
    CANCEL = "change_result_cancel"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TicketInfoBody(_Body):
    """Table 3: sent only for operations on the change ticket itself."""

    phase: Phase | None = None
    work_flow_status: str | None = None


class SubTicketBody(_Body):
    """Table 4: one change sub-ticket (one per change region)."""

    ticket_id: str | None = None
    sub_tickets: list[dict[str, Any]] | None = None
    change_result: ChangeResult | None = None
    is_verified_in_change_time: bool | None = None
    verified_docs: str | None = None
    comment: str | None = None
    change_fail_type: str | None = None
    rollback_start_time: Long | None = None
    rollback_end_time: Long | None = None
    is_rollback_success: bool | None = None
    is_monitor_found: bool | None = None


class HistoryInfoBody(_Body):
    """Table 5: the action recorded in the ticket's history."""

    action: HistoryAction | None = None


class UpdateTicketBody(_Body):
    """Table 2: the request body."""

    ticket_info: TicketInfoBody | None = None
    sub_tickets: list[SubTicketBody] | None = None
    history_info: HistoryInfoBody | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object sent on the wire: exactly the keys that were set."""
        return self.model_dump(mode="json", exclude_unset=True)


def wire_bytes(wire: dict[str, Any]) -> bytes:
    """A ``to_wire()`` dict as compact UTF-8 JSON, the exact bytes signed and sent. It takes the
    dict, not the model: the worker keeps the dict for the outcome event anyway, and serializing
    the model a second time costs ~2 us per event."""
    return to_json(wire)


class UpdateTicketResponse(BaseModel):
    """Tables 6-8. Parsed leniently: the server, not us, owns this shape.

    ``provider_code`` is a string in the table but an integer in the example response; both pass.
    """

    model_config = ConfigDict(extra="allow")

    provider_code: Any = None
    error_code: str | None = None
    #: Text for people; a number or an object here is shown as its JSON, not a reason to call the
    #: answer unreadable (that would make a success ambiguous, or hide a refusal's reason).
    error_msg: str | None = None
    #: Only ``error_code`` decides; what ``data`` holds is not the worker's to check.
    data: Any = None

    @field_validator("error_msg", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, str) else to_json(value).decode()

    @property
    def succeeded(self) -> bool:
        """Table 6 gives ``error_code`` the default value ``GOM.00000000``: an answer without it
        says success as much as one with it (a 2xx without it was reported ``rejected``)."""
        return self.error_code is None or self.error_code == SUCCESS_CODE

    def names_ticket(self, ticket_id: str) -> bool:
        """Whether ``data`` names the ticket, as the example response (``data.ticket_info``) or
        Table 7 (``data.ticket_id``) does: what confirms an answer that carries no ``error_code``."""
        data = self.data if isinstance(self.data, dict) else {}
        info = data.get("ticket_info")
        return data.get("ticket_id") == ticket_id or (
            isinstance(info, dict) and info.get("ticket_id") == ticket_id
        )
