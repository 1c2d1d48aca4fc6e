"""Each event type end to end: Kafka in, the exact reference body at the simulator, one outcome out."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SettingsFactory, running_worker
from helpers import event, read_json, read_records, send

from schemas.outcomes import OutcomeEvent
from worker.sandbox import TansuBroker
from worker.simulator import SimulatorServer

EXAMPLES = {
    e["title"]: e
    for e in json.loads((Path(__file__).parents[1] / "data" / "reference_examples.json").read_text())
}
TICKET = "CM202506261919380164485133"
OK, FAIL, CANCEL = (
    "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
    "80f198c6-14c0-4541-8e2d-1808bfcedf48",
    "b0a966fa-5be7-40e4-bad0-a0749d6fac9c",
)


async def test_every_event_type_reaches_the_api_with_the_reference_body(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    started = event("change.started", TICKET, OK)
    ended = event("change.ended", TICKET, OK)
    succeeded = event(
        "change.succeeded",
        TICKET,
        OK,
        result={"is_verified_in_change_time": True, "comment": "Change succeeded."},
    )
    failed = event(
        "change.failed",
        TICKET,
        FAIL,
        result={
            "comment": "Change failed.",
            "change_fail_type": "fr_dependent_service_issue",
            "is_rollback_success": True,
            "is_monitor_found": False,
        },
    )
    cancelled = event("change.cancelled", TICKET, CANCEL, result={"comment": "Change cancelled."})
    closed = event("ticket.update", TICKET, None, ticket_info={"phase": "phase_change_close"})
    events = [
        started,
        ended,
        succeeded,
        event("change.started", TICKET, FAIL),
        event("change.ended", TICKET, FAIL),
        failed,
        cancelled,
        closed,
    ]
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with running_worker(make_settings()):
        await send(broker.bootstrap, topics["input"], events, headers=[("traceparent", traceparent.encode())])
        outcomes = await read_json(broker.bootstrap, topics["results"], len(events))
        outcome_records = await read_records(broker.bootstrap, topics["results"], len(events))

    for o in outcomes:  # the worker builds outcomes without validation: prove they match the contract
        OutcomeEvent.model_validate(o)
        assert list(o) == list(OutcomeEvent.model_fields)  # every field, in the model's order
    assert [o["status"] for o in outcomes] == ["applied"] * len(events)
    assert [o["event_id"] for o in outcomes] == [e["event_id"] for e in events]
    assert all(o["attempts"] == 1 and o["http_status"] == 200 for o in outcomes)
    sent = {entry["event_id"]: entry for entry in simulator.state.applied_log}
    assert set(sent) == {e["event_id"] for e in events}
    path = EXAMPLES["Change started."]["path"]
    assert path.endswith(TICKET)
    for ev, title in [
        (started, "Change started."),
        (ended, "Change ended."),
        (succeeded, "If the change is successful, fill in the change result."),
        (failed, "If the change fails, fill in the change result."),
        (cancelled, "Change canceled."),
    ]:
        assert sent[ev["event_id"]]["body"] == EXAMPLES[title]["body"], title
    assert sent[closed["event_id"]]["body"] == {"ticket_info": {"phase": "phase_change_close"}}
    # the outcome carries the request body that was sent
    by_id = {o["event_id"]: o for o in outcomes}
    assert (
        by_id[failed["event_id"]]["request"]
        == EXAMPLES["If the change fails, fill in the change result."]["body"]
    )
    # the producer's trace is carried to the API call and the outcome, each with a new span id
    trace_id = traceparent.split("-")[1]
    assert all(entry["traceparent"].split("-")[1] == trace_id for entry in sent.values())
    assert all(entry["traceparent"] != traceparent for entry in sent.values())
    assert all(o["trace_id"] == trace_id for o in outcomes)
    assert all(r.header("traceparent").decode().split("-")[1] == trace_id for r in outcome_records)
    assert all(r.key == TICKET.encode() for r in outcome_records)
    sub_states = {s.ticket_id: str(s.state) for s in simulator.state.tickets[TICKET].sub_tickets.values()}
    assert sub_states == {OK: "succeeded", FAIL: "failed", CANCEL: "cancelled"}
