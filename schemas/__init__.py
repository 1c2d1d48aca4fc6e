"""The pydantic contract of coc-change-worker: inbound events, the API body/response, outcomes."""

from schemas.api import (
    SUCCESS_CODE,
    ChangeResult,
    HistoryAction,
    HistoryInfoBody,
    Phase,
    SubTicketBody,
    TicketInfoBody,
    UpdateTicketBody,
    UpdateTicketResponse,
)
from schemas.events import (
    CHANGE_EVENT_ADAPTER,
    AnyChangeEvent,
    ChangeCancelled,
    ChangeEnded,
    ChangeEvent,
    ChangeFailed,
    ChangeStarted,
    ChangeSucceeded,
    EventType,
    TicketUpdate,
)
from schemas.outcomes import DEAD_LETTER_STATUSES, OutcomeEvent, OutcomeStatus, SourceRef

__all__ = [
    "CHANGE_EVENT_ADAPTER",
    "DEAD_LETTER_STATUSES",
    "SUCCESS_CODE",
    "AnyChangeEvent",
    "ChangeCancelled",
    "ChangeEnded",
    "ChangeEvent",
    "ChangeFailed",
    "ChangeResult",
    "ChangeStarted",
    "ChangeSucceeded",
    "EventType",
    "HistoryAction",
    "HistoryInfoBody",
    "OutcomeEvent",
    "OutcomeStatus",
    "Phase",
    "SourceRef",
    "SubTicketBody",
    "TicketInfoBody",
    "TicketUpdate",
    "UpdateTicketBody",
    "UpdateTicketResponse",
]
