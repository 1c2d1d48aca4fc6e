"""Alertmanager webhook notifications (version 4) as change.failed events with stable event ids."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import pytest

from schemas.events import CHANGE_EVENT_ADAPTER, EVENT_ID_PATTERN, ChangeFailed
from worker.tools.alertmanager import Notification, event_id, to_events

MAX = 1 << 20  # COC_WORKER_MAX_EVENT_BYTES

#: The body Alertmanager POSTs to a webhook_config receiver (its documented format, version 4).
DOCUMENTED: dict[str, Any] = {
    "receiver": "coc",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "ProbeFailure",
                "instance": "https://server.example.org",
                "severity": "critical",
                "ticket_id": "CM202511280003",
                "sub_ticket_id": "eu-west-101",
            },
            "annotations": {
                "description": "Instance https://server.example.org has been down for over 5m.",
                "summary": "BlackBox Probe Failure: https://server.example.org",
            },
            "startsAt": "2023-02-06T13:08:45.828Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example.org:9090/graph?g0.expr=probe_success+%3D%3D+0",
            "fingerprint": "1a30ba71cca2921f",
        }
    ],
    "groupLabels": {"alertname": "ProbeFailure"},
    "commonLabels": {"alertname": "ProbeFailure", "severity": "critical"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager.example.org:9093",
    "version": "4",
    "groupKey": '{}/{severity="critical"}:{alertname="ProbeFailure"}',
    "truncatedAlerts": 0,
}


def notification(**alert_changes: Any) -> Notification:
    body = copy.deepcopy(DOCUMENTED)
    body["alerts"][0].update(alert_changes)
    return Notification.model_validate(body)


def test_a_firing_alert_becomes_a_monitor_found_failure() -> None:
    [event], skipped = to_events(notification(), MAX)
    assert skipped == []
    assert event == {
        "event_id": "am-1a30ba71cca2921f-1675688925828",
        "type": "change.failed",
        "ticket_id": "CM202511280003",
        "sub_ticket_id": "eu-west-101",
        "source": "alertmanager",
        "occurred_at": "2023-02-06T13:08:45.828Z",
        "result": {
            "comment": "[ProbeFailure] BlackBox Probe Failure: https://server.example.org - "
            "Instance https://server.example.org has been down for over 5m.",
            "is_monitor_found": True,
        },
    }
    parsed = CHANGE_EVENT_ADAPTER.validate_python(event)
    assert isinstance(parsed, ChangeFailed)
    assert parsed.result.is_monitor_found is True


def test_the_event_id_is_stable_per_alert_instance() -> None:
    first = notification().alerts[0]
    again = notification(endsAt="2023-02-06T14:00:00Z", annotations={"summary": "changed text"}).alerts[0]
    assert event_id(first) == event_id(again)  # the same alert notified again
    later = notification(startsAt="2023-02-07T13:08:45.828Z").alerts[0]
    assert event_id(later) != event_id(first)  # it fired again later: a new failure
    nanos = notification(startsAt="2023-02-06T14:08:45.828123456+01:00").alerts[0]
    assert event_id(nanos) == event_id(first)  # same instant, other zone, nanosecond digits
    unprinted = notification(fingerprint=None).alerts[0]
    assert event_id(unprinted) == event_id(notification(fingerprint="not hex!").alerts[0])
    assert CHANGE_EVENT_ADAPTER.validate_python(to_events(notification(fingerprint="x" * 500), MAX)[0][0])


def test_a_change_named_by_annotations_is_part_of_the_event_id() -> None:
    """The fingerprint hashes the labels only. A deploy system reinstalled a rule with a new
    ``ticket_id`` annotation while its alert kept firing (Prometheus keeps ``startsAt``): the new
    change's failure got the old one's event_id, and the worker marked it ``event_id_reused``."""
    labels = {"alertname": "HighErrorRate", "severity": "critical"}
    ids = {
        event_id(
            notification(labels=labels, annotations={"ticket_id": ticket, "sub_ticket_id": sub}).alerts[0]
        )
        for ticket, sub in (("CM1", "s1"), ("CM2", "s1"), ("CM1", "s2"))
    }
    assert len(ids) == 3
    again = notification(
        labels=labels, annotations={"ticket_id": "CM1", "sub_ticket_id": "s1", "summary": "x"}
    )
    assert event_id(again.alerts[0]) in ids  # the same alert notified again: the same event
    half = notification(labels={**labels, "ticket_id": "CM1"}, annotations={"sub_ticket_id": "s1"})
    other_half = notification(labels={**labels, "ticket_id": "CM1"}, annotations={"sub_ticket_id": "s2"})
    assert event_id(half.alerts[0]) != event_id(other_half.alerts[0])
    [event], _ = to_events(
        notification(labels=labels, annotations={"ticket_id": "CM1", "sub_ticket_id": "s1"}), MAX
    )
    assert event["event_id"].startswith("am-1a30ba71cca2921f.")
    assert event["event_id"].endswith("-1675688925828")
    # The longest there is (a 64-digit fingerprint, a start time 16 characters long) fits the contract.
    widest = notification(
        labels=labels,
        annotations={"ticket_id": "C" * 64, "sub_ticket_id": "s" * 64},
        fingerprint="f" * 64,
        startsAt="0001-01-01T00:00:00Z",
    )
    [event], _ = to_events(widest, MAX)
    assert re.fullmatch(EVENT_ID_PATTERN, event["event_id"]) is not None
    assert CHANGE_EVENT_ADAPTER.validate_python(event)


def test_the_event_id_of_a_label_only_alert_is_as_it_always_was() -> None:
    """Deployed rules that name their change with labels keep their ids (an id that changed would
    apply an alert already applied once more): ``am-<fingerprint>-<startsAt in epoch ms>``."""
    assert event_id(notification().alerts[0]) == "am-1a30ba71cca2921f-1675688925828"
    labelled = notification(annotations={"ticket_id": "CM9", "sub_ticket_id": "s9"})  # labels win
    assert event_id(labelled.alerts[0]) == "am-1a30ba71cca2921f-1675688925828"
    unprinted = notification(fingerprint=None).alerts[0]
    labels = json.dumps(sorted(unprinted.labels.items()), ensure_ascii=True)
    ours = hashlib.sha256(labels.encode()).hexdigest()[:16]
    assert event_id(unprinted) == f"am-{ours}-1675688925828"


def test_labels_may_be_annotations_and_the_fail_type_is_carried() -> None:
    moved = notification(
        labels={"alertname": "HighErrorRate", "change_fail_type": "fr_dependent_service_issue"},
        annotations={"ticket_id": "CM1", "sub_ticket_id": "s1"},
    )
    [event], _ = to_events(moved, MAX)
    assert (event["ticket_id"], event["sub_ticket_id"]) == ("CM1", "s1")
    assert event["result"]["change_fail_type"] == "fr_dependent_service_issue"
    assert event["result"]["comment"] == "[HighErrorRate] alert firing"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"status": "resolved"}, "resolved"),
        ({"labels": {"alertname": "DiskFull"}}, "no_ticket_labels"),
        ({"labels": {"ticket_id": "CM1"}}, "no_ticket_labels"),
        ({"labels": {"ticket_id": "../CM1", "sub_ticket_id": "s1"}}, "invalid"),
    ],
)
def test_other_alerts_are_skipped_with_a_reason(changes: dict[str, Any], reason: str) -> None:
    events, [skipped] = to_events(notification(**changes), MAX)
    assert events == []
    assert skipped.reason == reason
    assert skipped.as_json()["fingerprint"] == "1a30ba71cca2921f"
    if reason == "invalid":
        assert skipped.errors == [
            {"path": "$.ticket_id", "message": "String should match pattern '^[A-Za-z0-9_-]{1,64}$'"}
        ]


def test_a_long_description_is_cut_to_the_comment_limit() -> None:
    [event], _ = to_events(notification(annotations={"description": "x" * 5000}), MAX)
    assert len(event["result"]["comment"]) == 2000


def test_an_event_over_the_workers_size_limit_is_skipped_not_produced() -> None:
    """Before, it was produced (202) and the worker then refused it as too large."""
    events, [skipped] = to_events(notification(annotations={"description": "é" * 2000}), 1024)
    assert events == []
    assert skipped.reason == "invalid"
    assert "the limit is 1024" in skipped.errors[0]["message"]


@pytest.mark.parametrize("starts_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_start_time_no_instant_can_hold_spoils_only_its_own_alert(starts_at: str) -> None:
    """Such an offset raised ``OverflowError`` out of the whole notification (a 500 for every
    alert in it, resent by Alertmanager for as long as the alert fires)."""
    body = copy.deepcopy(DOCUMENTED)
    body["alerts"].append({**body["alerts"][0], "startsAt": starts_at, "fingerprint": "2b40cb82ddb3a032"})
    events, skipped = to_events(Notification.model_validate(body), MAX)
    assert skipped == []
    assert len(events) == 2
    assert events[0]["event_id"] == "am-1a30ba71cca2921f-1675688925828"
    assert "occurred_at" not in events[1]  # produced without a start time, as one with none
    assert CHANGE_EVENT_ADAPTER.validate_python(events[1])
    assert event_id(Notification.model_validate(body).alerts[1]) == events[1]["event_id"]


def test_only_a_firing_alert_that_named_a_change_warns_and_its_log_fields_carry_no_value() -> None:
    """What the ingress logs of a skipped alert (before, nothing: the 202 told Alertmanager it was
    delivered and the monitor-found failure was lost without a trace)."""
    _, [invalid] = to_events(notification(labels={"ticket_id": "CM 1/x", "sub_ticket_id": "s1"}), MAX)
    assert invalid.warns
    assert invalid.log_fields() == {
        "index": 0,
        "reason": "invalid",
        "fingerprint": "1a30ba71cca2921f",
        "error_paths": ["$.ticket_id"],
    }
    assert "CM 1/x" not in repr(invalid.log_fields())
    _, [odd] = to_events(
        notification(labels={"ticket_id": "CM 1/x", "sub_ticket_id": "s1"}, fingerprint="a secret?"), MAX
    )
    assert "fingerprint" not in odd.log_fields()  # not Alertmanager's hex: input text, not logged
    for changes in ({"status": "resolved"}, {"status": "pending"}, {"labels": {"alertname": "DiskFull"}}):
        _, [quiet] = to_events(notification(**changes), MAX)
        assert not quiet.warns
