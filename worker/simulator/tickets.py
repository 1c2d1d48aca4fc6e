"""The change-ticket state machine of the simulator: pure data and rules, no I/O, no aiohttp.

Each change sub-ticket (one per change region) walks::

    pending --start--> implementing --end--> ended --set result--> succeeded | failed
       |                    |  |                                               ^
       |                    |  +------------- failed result -------------------+
       +------cancel--------+--> cancelled

``history_info.action`` names the step (Table 5 of the reference page); ``change_result`` must
agree with it.

Assumptions beyond the reference page (it gives the fields, their types and the five examples, not
the rules the service enforces):

* the order above, taken from the examples' order (start, end, then "fill in the change result"),
  so a success result before the end is refused. A failed result (the fourth example's
  ``change_set_change_result_success`` with ``change_result_failed``, or Table 5's
  ``change_result_failed``) is taken from ``implementing`` too: a monitoring system
  (``is_monitor_found``) reports a failure while the deploy system is still rolling out. The
  sub-ticket is then ``failed``, and the deploy system's own end or result after it is refused;
* optional fields made mandatory: a body must change something (``{}``, a bare ``history_info``,
  or a ``ticket_info`` without ``phase`` and ``work_flow_status``, with no ``sub_tickets``, is
  refused); ``sub_tickets`` need ``history_info.action``; each sub-ticket needs its ``ticket_id``
  (Table 4 marks it optional, but without it nothing says which region changes);
  ``change_set_change_result_success`` needs a ``change_result``;
* ``change_result`` takes the three values of the examples (Table 4: "Value range: N/A"); unknown
  keys are refused;
* the ticket's ``phase`` is not checked for sub-ticket steps (a sub-ticket of a
  ``phase_change_draft`` ticket starts all the same), except that once it is
  ``phase_change_close`` or ``phase_change_cancel`` the ticket accepts nothing more; otherwise its
  ``phase`` may move to any phase. A body with ``ticket_info`` and no ``sub_tickets`` is accepted
  whatever its action (even ``change_start_change_success``) and only sets the phase or status.
  The ticket itself only carries ``phase`` and ``work_flow_status``;
* a body touching several sub-tickets is all-or-nothing: the whole plan is checked before
  anything is written;
* the detail (``GET``) of a sub-ticket carries its ``state`` and ``change_result``, which the
  SDK's detail model does not have: against the real API the worker's check of a lost answer
  (``mapping.already_applied``) finds no state and confirms nothing, so such an event ends
  ``rejected`` instead of ``reconciled``.

The simulator's own error codes, not the real API's: the reference page gives only the range
``GOM.00000000~GOM.00009999999`` and points to its Error Codes page, no code per cause, so a
consumer of the real API must not rely on these (the worker itself only tells success,
``GOM.00000000`` or no code, from any other code, which it passes on as it came)::

    code           HTTP  meaning
    GOM.00001001   400   body is not JSON, not an object, or breaks Table 2 (unknown keys, types)
    GOM.00001002   400   ticket_type in the path is not ``change``
    GOM.00001003   400   no such ticket (400 as every refusal here; the reference's table shows
                         200 and 400 and refers to its Status Codes page for more)
    GOM.00001004   400   no such sub-ticket on this ticket
    GOM.00001005   400   the sub-ticket's state does not allow this action
    GOM.00001006   400   the ticket is closed or cancelled: no more updates
    GOM.00001007   400   action missing or contradicted by change_result, or nothing to update
    GOM.00009500   500   injected fault (also GOM.00009502/9503/9504 for 502/503/504)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from schemas.api import ChangeResult, HistoryAction, Phase, UpdateTicketBody

PROVIDER_CODE = "049"

BAD_BODY = "GOM.00001001"
UNSUPPORTED_TICKET_TYPE = "GOM.00001002"
TICKET_NOT_FOUND = "GOM.00001003"
SUB_TICKET_NOT_FOUND = "GOM.00001004"
ILLEGAL_TRANSITION = "GOM.00001005"
TICKET_CLOSED = "GOM.00001006"
BAD_ACTION = "GOM.00001007"

#: Error codes of the injected 5xx faults, by HTTP status.
FAULT_CODES: dict[int, str] = {
    500: "GOM.00009500",
    502: "GOM.00009502",
    503: "GOM.00009503",
    504: "GOM.00009504",
}

SUPPORTED_TICKET_TYPE = "change"
CLOSED_PHASES = frozenset({Phase.CLOSE, Phase.CANCEL})


class SubState(StrEnum):
    """Where a sub-ticket is in its life; compares equal to its plain string."""

    PENDING = "pending"
    IMPLEMENTING = "implementing"
    ENDED = "ended"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Refused(Exception):
    """The API refuses the request; carries what the HTTP error body needs."""

    def __init__(self, code: str, message: str, *, http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True)
class _Step:
    """Where an action (with one ``change_result``) may start from, and where it leaves the sub-ticket."""

    sources: frozenset[SubState]
    target: SubState


_FAILED = _Step(frozenset({SubState.IMPLEMENTING, SubState.ENDED}), SubState.FAILED)
_CANCELLED = _Step(frozenset({SubState.PENDING, SubState.IMPLEMENTING}), SubState.CANCELLED)

#: action -> change_result sent with it -> step; a change_result absent here is refused. A failed
#: result is taken while the change is still implementing (a monitoring system's alert during the
#: rollout), a successful one only once it has ended.
_RULES: dict[HistoryAction, dict[ChangeResult | None, _Step]] = {
    HistoryAction.START: {None: _Step(frozenset({SubState.PENDING}), SubState.IMPLEMENTING)},
    HistoryAction.END: {None: _Step(frozenset({SubState.IMPLEMENTING}), SubState.ENDED)},
    HistoryAction.SET_RESULT: {
        ChangeResult.SUCCESS: _Step(frozenset({SubState.ENDED}), SubState.SUCCEEDED),
        ChangeResult.FAILED: _FAILED,
    },
    HistoryAction.RESULT_FAILED: {None: _FAILED, ChangeResult.FAILED: _FAILED},
    HistoryAction.CANCEL: {None: _CANCELLED, ChangeResult.CANCEL: _CANCELLED},
}

_ORDER = list(SubState)


def transition(
    sub_ticket_id: str, state: SubState, action: HistoryAction, change_result: ChangeResult | None
) -> SubState:
    """The state after ``action``, or ``Refused`` saying what the action needed."""
    steps = _RULES[action]
    step = steps.get(change_result)
    if step is None:
        allowed = " or ".join("no change_result" if r is None else str(r) for r in steps)
        raise Refused(BAD_ACTION, f"{action} takes {allowed}, not {change_result}")
    if state not in step.sources:
        needs = " or ".join(s for s in _ORDER if s in step.sources)
        # the result named only where it decides the states the action may start from
        what = action if len({s.sources for s in steps.values()}) == 1 else f"{action} with {change_result}"
        raise Refused(ILLEGAL_TRANSITION, f"sub-ticket {sub_ticket_id} is {state}; {what} needs {needs}")
    return step.target


@dataclass(slots=True)
class SubTicket:
    ticket_id: str
    main_ticket_id: str
    state: SubState = SubState.PENDING
    change_result: str | None = None
    #: Result fields last sent for this sub-ticket (comment, change_fail_type, rollback times, ...).
    fields: dict[str, Any] = field(default_factory=dict)
    create_time: int = 0
    update_time: int = 0

    def snapshot(self, *, sdk_only: bool = False) -> dict[str, Any]:
        """Shaped like the SDK's ``CocTicketDetailInfoResponseDataSubTickets``, plus (unless
        ``sdk_only``) the state, the result and the result fields last sent."""
        known = {
            "id": self.ticket_id,
            "ticket_id": self.ticket_id,
            "real_ticket_id": self.ticket_id,
            "main_ticket_id": self.main_ticket_id,
            "parent_ticket_id": self.main_ticket_id,
            "ticket_path": f"{self.main_ticket_id}/{self.ticket_id}",
            "is_deleted": False,
            "create_time": self.create_time,
            "update_time": self.update_time,
        }
        if sdk_only:
            return known
        return {**self.fields, **known, "state": str(self.state), "change_result": self.change_result}


@dataclass(slots=True)
class Ticket:
    ticket_id: str
    phase: Phase = Phase.IMPLEMENTE
    work_flow_status: str | None = None
    sub_tickets: dict[str, SubTicket] = field(default_factory=dict)
    create_time: int = 0
    update_time: int = 0

    def snapshot(self, *, sdk_only: bool = False) -> dict[str, Any]:
        """Shaped like the SDK's ``CocTicketDetailInfoResponseData`` (extra keys are ignored by it)."""
        return {
            "id": self.ticket_id,
            "ticket_id": self.ticket_id,
            "real_ticket_id": self.ticket_id,
            "ticket_type": SUPPORTED_TICKET_TYPE,
            "phase": str(self.phase),
            "work_flow_status": self.work_flow_status,
            "is_start_process_async": True,
            "is_update_null": False,
            "is_return_full_info": False,
            "is_start_process": True,
            "is_deleted": False,
            "create_time": self.create_time,
            "update_time": self.update_time,
            "sub_tickets": [sub.snapshot(sdk_only=sdk_only) for sub in self.sub_tickets.values()],
            "enum_data_list": [],
        }


@dataclass(frozen=True, slots=True)
class Change:
    """One state change made by a request: a sub-ticket step, or the ticket's phase/status."""

    sub_ticket_id: str | None
    action: str | None
    change_result: str | None


def apply_update(
    ticket: Ticket, body: UpdateTicketBody, *, now_ms: int, create_missing: bool = False
) -> list[Change]:
    """Check the whole body against ``ticket``, then apply it; nothing is written if any part fails.

    ``create_missing`` treats unknown sub-tickets as ``pending`` (the benchmark's ``auto_create``);
    they are only added when the whole body is accepted.
    """
    action = body.history_info.action if body.history_info is not None else None
    action_name = None if action is None else str(action)
    subs = body.sub_tickets or []
    info = body.ticket_info
    if ticket.phase in CLOSED_PHASES:
        raise Refused(
            TICKET_CLOSED, f"ticket {ticket.ticket_id} is {ticket.phase}; it accepts no more updates"
        )
    sets_info = info is not None and (info.phase is not None or info.work_flow_status is not None)
    if not subs and not sets_info:
        raise Refused(
            BAD_ACTION, "the body changes nothing: give sub_tickets or a ticket_info phase/work_flow_status"
        )

    planned: dict[str, SubState] = {}
    for index, sub in enumerate(subs):
        if sub.ticket_id is None:
            raise Refused(BAD_BODY, f"sub_tickets[{index}].ticket_id is required")
        if action is None:
            raise Refused(BAD_ACTION, "history_info.action is required to change a sub-ticket")
        current = planned.get(sub.ticket_id)
        if current is None:
            existing = ticket.sub_tickets.get(sub.ticket_id)
            if existing is not None:
                current = existing.state
            elif create_missing:
                current = SubState.PENDING
            else:
                raise Refused(
                    SUB_TICKET_NOT_FOUND, f"sub-ticket {sub.ticket_id} not found on ticket {ticket.ticket_id}"
                )
        planned[sub.ticket_id] = transition(sub.ticket_id, current, action, sub.change_result)

    changes: list[Change] = []
    for sub in subs:
        assert sub.ticket_id is not None  # checked above
        target = ticket.sub_tickets.get(sub.ticket_id)
        if target is None:
            target = SubTicket(sub.ticket_id, ticket.ticket_id, create_time=now_ms)
            ticket.sub_tickets[sub.ticket_id] = target
        target.state = planned[sub.ticket_id]
        if sub.change_result is not None:
            target.change_result = str(sub.change_result)
        target.fields.update(
            sub.model_dump(mode="json", exclude_unset=True, exclude={"ticket_id", "sub_tickets"})
        )
        target.update_time = now_ms
        changes.append(
            Change(sub.ticket_id, action_name, None if sub.change_result is None else str(sub.change_result))
        )
    if sets_info:
        assert info is not None
        if info.phase is not None:
            ticket.phase = info.phase
        if info.work_flow_status is not None:
            ticket.work_flow_status = info.work_flow_status
        changes.append(Change(None, action_name, None))
    ticket.update_time = now_ms
    return changes


class _SeedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedSubTicket(_SeedModel):
    ticket_id: str
    state: SubState = SubState.PENDING
    change_result: ChangeResult | None = None


class SeedTicket(_SeedModel):
    ticket_id: str
    phase: Phase = Phase.IMPLEMENTE
    work_flow_status: str | None = None
    sub_tickets: list[str | SeedSubTicket] = []


class Seed(_SeedModel):
    """``{"tickets": [{"ticket_id": "CM1", "phase": "...", "sub_tickets": ["s-1", {"ticket_id": "s-2", "state": "ended"}]}]}``."""

    tickets: list[SeedTicket] = []


def load_seed_file(path: Path) -> dict[str, Any]:
    """Read a seed file; validation happens when it is applied."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a seed file holds a JSON object")
    return data


class TicketBook:
    """Every ticket the simulator knows, by id.

    With ``auto_create`` every ticket id is taken: an unknown one reads as a fresh ticket (phase
    ``phase_change_implemente``, no sub-tickets), which is stored only once a write to it is
    accepted; a read or a refused write leaves the book as it was.
    """

    def __init__(self, *, auto_create: bool = False) -> None:
        self.auto_create = auto_create
        self.tickets: dict[str, Ticket] = {}

    def seed(self, data: Mapping[str, Any], *, now_ms: int) -> int:
        """Add (or replace, by id) the tickets of a seed document; returns how many."""
        seed = Seed.model_validate(data)
        for entry in seed.tickets:
            ticket = Ticket(
                entry.ticket_id, entry.phase, entry.work_flow_status, create_time=now_ms, update_time=now_ms
            )
            for item in entry.sub_tickets:
                spec = SeedSubTicket(ticket_id=item) if isinstance(item, str) else item
                ticket.sub_tickets[spec.ticket_id] = SubTicket(
                    spec.ticket_id,
                    entry.ticket_id,
                    spec.state,
                    None if spec.change_result is None else str(spec.change_result),
                    create_time=now_ms,
                    update_time=now_ms,
                )
            self.tickets[entry.ticket_id] = ticket
        return len(seed.tickets)

    def get(self, ticket_id: str, *, now_ms: int) -> Ticket:
        """The ticket, else ``Refused`` (400); with ``auto_create`` an unknown one is a fresh
        ``Ticket`` that is not stored (``apply`` stores it once a write to it is accepted)."""
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            if not self.auto_create:
                raise Refused(TICKET_NOT_FOUND, f"ticket {ticket_id} not found")
            ticket = Ticket(ticket_id, create_time=now_ms, update_time=now_ms)
        return ticket

    def apply(self, ticket_id: str, body: UpdateTicketBody, *, now_ms: int) -> list[Change]:
        """Apply ``body`` to the ticket (see ``apply_update``): nothing is written, a ticket that
        ``auto_create`` would make included, unless the whole body is accepted."""
        ticket = self.get(ticket_id, now_ms=now_ms)
        changes = apply_update(ticket, body, now_ms=now_ms, create_missing=self.auto_create)
        self.tickets.setdefault(ticket_id, ticket)
        return changes
