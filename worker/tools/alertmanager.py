"""Prometheus Alertmanager webhook notifications (payload version 4) as ``change.failed`` events.

Alertmanager POSTs a group of alerts (``{"version": "4", "status", "alerts": [{"status", "labels",
"annotations", "startsAt", "endsAt", "fingerprint", ...}], ...}``). Each *firing* alert that
names a change through ``ticket_id`` and ``sub_ticket_id`` (labels, else annotations) becomes a
``change.failed`` event with ``result.is_monitor_found = true``. Its ``event_id`` is derived from
the alert's fingerprint and start time (and the change, when an annotation names it), so the same
alert notified again (``repeat_interval``, a retried POST, several Alertmanager replicas) is the
same event and the worker applies it once.
Resolved alerts and alerts without the labels are skipped and reported, never an error: a 4xx
would only make Alertmanager retry a notification that can never succeed. A firing alert that names
a change but would make an invalid event is skipped as ``invalid``: the ingress logs a warning for
it (``Skipped.warns``, ``Skipped.log_fields``), since Alertmanager takes the 202 as delivered.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import EventType
from worker.tools.events import event_errors, rfc3339

SUPPORTED_VERSION = "4"
SOURCE = "alertmanager"
TICKET_LABEL = "ticket_id"
SUB_TICKET_LABEL = "sub_ticket_id"
FAIL_TYPE_LABEL = "change_fail_type"
_COMMENT_MAX = 2000
_FINGERPRINT = re.compile(r"[0-9a-f]{1,64}\Z")
SkipReason = Literal["resolved", "not_firing", "no_ticket_labels", "invalid"]
#: Every reason an alert is skipped for (a metric's label values: the set is fixed).
SKIP_REASONS: tuple[SkipReason, ...] = ("resolved", "not_firing", "no_ticket_labels", "invalid")


class Alert(BaseModel):
    """One alert of the notification; unknown fields (newer Alertmanagers, Grafana) are ignored."""

    model_config = ConfigDict(extra="ignore")

    status: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str | None = None  # Alertmanager spells its fields in camelCase
    endsAt: str | None = None
    generatorURL: str | None = None
    fingerprint: str | None = None


class Notification(BaseModel):
    """The webhook body (``webhook_config`` in Alertmanager's configuration reference)."""

    model_config = ConfigDict(extra="ignore")

    version: str
    groupKey: str | None = None
    truncatedAlerts: int = 0
    status: str | None = None
    receiver: str | None = None
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str | None = None
    alerts: list[Alert]


@dataclass(frozen=True, slots=True)
class Skipped:
    index: int
    reason: SkipReason
    alertname: str | None = None
    fingerprint: str | None = None
    errors: list[dict[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"index": self.index, "reason": self.reason}
        if self.alertname:
            found["alertname"] = self.alertname[:128]
        if self.fingerprint:
            found["fingerprint"] = self.fingerprint[:64]
        if self.errors:
            found["errors"] = self.errors
        return found

    @property
    def warns(self) -> bool:
        """A firing alert that named a change and was still not produced: a failure lost unless
        someone is told (only ``invalid`` alerts are both firing and naming a ticket)."""
        return self.reason == "invalid"

    def log_fields(self) -> dict[str, Any]:
        """For a log line: no label or annotation value, only the index, the reason, the error
        paths and the fingerprint when it is Alertmanager's (hex; anything else is input text)."""
        fields: dict[str, Any] = {"index": self.index, "reason": self.reason}
        if self.fingerprint and _FINGERPRINT.match(self.fingerprint):
            fields["fingerprint"] = self.fingerprint
        if self.errors:
            fields["error_paths"] = [error["path"] for error in self.errors]
        return fields


def _lookup(alert: Alert, name: str) -> str | None:
    value = alert.labels.get(name) or alert.annotations.get(name)
    return value.strip() if value else None


def _fingerprint(alert: Alert) -> str:
    """Alertmanager's own fingerprint (a hash of the labels) when it looks like one, else ours."""
    if alert.fingerprint and _FINGERPRINT.match(alert.fingerprint):
        return alert.fingerprint
    labels = json.dumps(sorted(alert.labels.items()), ensure_ascii=True)
    return hashlib.sha256(labels.encode()).hexdigest()[:16]


def _started(alert: Alert) -> datetime | None:
    if not alert.startsAt:
        return None
    try:
        started = datetime.fromisoformat(alert.startsAt.replace("z", "Z"))
        # In UTC, once: an offset at either end of the calendar ("0001-01-01T00:00:00+01:00")
        # is no instant a datetime can hold, and raised out of the whole notification.
        return started.astimezone(UTC) if started.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def _change_of(alert: Alert) -> str:
    """``.<hash of ticket_id and sub_ticket_id>`` when either comes from an annotation, else "".

    The fingerprint hashes the labels only: a rule reinstalled with a new ``ticket_id`` annotation
    while its alert keeps firing keeps ``startsAt`` too, and the new change's failure got the old
    one's id (``event_id_reused``, the report lost). Label-only alerts keep the ids they had."""
    if alert.labels.get(TICKET_LABEL) and alert.labels.get(SUB_TICKET_LABEL):
        return ""
    change = json.dumps([_lookup(alert, TICKET_LABEL), _lookup(alert, SUB_TICKET_LABEL)])
    return "." + hashlib.sha256(change.encode()).hexdigest()[:16]


def event_id(alert: Alert) -> str:
    """Stable per alert instance: the same fingerprint, change and start time give the same id."""
    started = _started(alert)
    if started is not None:
        stamp = str(int(started.timestamp() * 1000))
    else:
        stamp = hashlib.sha256((alert.startsAt or "").encode()).hexdigest()[:12]
    return f"am-{_fingerprint(alert)}{_change_of(alert)}-{stamp}"


def _comment(alert: Alert) -> str:
    texts: list[str] = []
    for name in ("summary", "description"):
        text = " ".join((alert.annotations.get(name) or "").split())
        if text and text not in texts:
            texts.append(text)
    body = " - ".join(texts) or "alert firing"
    alertname = alert.labels.get("alertname")
    comment = f"[{alertname}] {body}" if alertname else body
    return comment[:_COMMENT_MAX]


def alert_event(alert: Alert, ticket_id: str, sub_ticket_id: str) -> dict[str, Any]:
    result: dict[str, Any] = {"comment": _comment(alert), "is_monitor_found": True}
    fail_type = _lookup(alert, FAIL_TYPE_LABEL)
    if fail_type:
        result["change_fail_type"] = fail_type
    event: dict[str, Any] = {
        "event_id": event_id(alert),
        "type": EventType.FAILED.value,
        "ticket_id": ticket_id,
        "sub_ticket_id": sub_ticket_id,
        "source": SOURCE,
        "result": result,
    }
    started = _started(alert)
    if started is not None:
        event["occurred_at"] = rfc3339(started)
    return event


def to_events(notification: Notification, max_event_bytes: int) -> tuple[list[dict[str, Any]], list[Skipped]]:
    """The events to produce, and the alerts skipped with the reason (an event the worker would
    refuse, over the contract or over ``max_event_bytes``, is skipped as ``invalid``)."""
    events: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    for index, alert in enumerate(notification.alerts):
        name, fingerprint = alert.labels.get("alertname"), alert.fingerprint
        if alert.status != "firing":
            skipped.append(
                Skipped(index, "resolved" if alert.status == "resolved" else "not_firing", name, fingerprint)
            )
            continue
        ticket_id, sub_ticket_id = _lookup(alert, TICKET_LABEL), _lookup(alert, SUB_TICKET_LABEL)
        if not ticket_id or not sub_ticket_id:
            skipped.append(Skipped(index, "no_ticket_labels", name, fingerprint))
            continue
        event = alert_event(alert, ticket_id, sub_ticket_id)
        errors = event_errors(event, max_event_bytes)
        if errors:
            details = [{"path": path, "message": msg} for path, msg in errors]
            skipped.append(Skipped(index, "invalid", name, fingerprint, details))
            continue
        events.append(event)
    return events, skipped
