"""``send``: exit codes by outcome status, the one-line summary a CI log shows, ``--json``'s one
document, the trace it continues, the time limit of a send that waits, and the README's CI recipe."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.outcomes import OutcomeEvent, OutcomeStatus, SourceRef
from worker.cli import main
from worker.errors import BrokerUnavailable
from worker.settings import load_settings
from worker.tools import send
from worker.tools.events import validated
from worker.tools.kafka_io import Delivered, EventProducer, TopicReader
from worker.tools.send import EXIT_NOT_APPLIED, EXIT_OK, SendResult, describe_outcome, record_for
from worker.tracing import parse

DELIVERED = Delivered("in", 0, 1)


def outcome(status: OutcomeStatus, **changes: object) -> OutcomeEvent:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "event_id": "e1",
        "ticket_id": "CM1",
        "type": "change.ended",
        "status": status,
        "attempts": 1,
        "source": SourceRef(topic="in", partition=0, offset=1),
        "received_at": now,
        "finished_at": now,
        "duration_ms": 1.0,
        "worker": "w",
    }
    values.update(changes)
    return OutcomeEvent.model_validate(values)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (OutcomeStatus.APPLIED, EXIT_OK),
        (OutcomeStatus.DUPLICATE, EXIT_OK),
        (OutcomeStatus.REJECTED, EXIT_NOT_APPLIED),
        (OutcomeStatus.FAILED, EXIT_NOT_APPLIED),
        (OutcomeStatus.INVALID, EXIT_NOT_APPLIED),
    ],
)
def test_exit_code_follows_the_status(status: OutcomeStatus, code: int) -> None:
    assert SendResult("e1", DELIVERED, "t", outcome(status)).exit_code == code


def test_exit_code_without_waiting_and_on_timeout() -> None:
    assert SendResult("e1", DELIVERED, "t").exit_code == EXIT_OK
    assert SendResult("e1", DELIVERED, "t", timed_out=True).exit_code == EXIT_NOT_APPLIED


def test_summary_lines() -> None:
    assert (
        describe_outcome(outcome(OutcomeStatus.APPLIED, http_status=200))
        == "applied (HTTP 200, after 1 attempt)"
    )
    rejected = outcome(
        OutcomeStatus.REJECTED,
        reason="api_rejected",
        http_status=400,
        error_code="GOM.00001005",
        error_msg="sub-ticket s1 is pending;\n end needs implementing",
    )
    assert describe_outcome(rejected) == (
        "rejected (reason api_rejected, HTTP 400, GOM.00001005, after 1 attempt) "
        "- sub-ticket s1 is pending; end needs implementing"
    )
    assert describe_outcome(outcome(OutcomeStatus.DUPLICATE, attempts=0, reason="duplicate_event_id")) == (
        "duplicate (reason duplicate_event_id)"
    )


TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
SEND = ["send", "--type", "started", "--ticket", "T", "--sub-ticket", "s", "--event-id", "deploy-9"]


def test_a_callers_traceparent_is_the_parent_of_the_events_span() -> None:
    """``--traceparent`` names the caller's span: the event's header carries a child of it (the same
    trace, a span id of its own, the same flags), as the ingress makes it. Before, the caller's
    span id went on unchanged, and the worker's spans hung off the caller's own."""
    caller = parse(TRACEPARENT)
    assert caller is not None
    obj = {"event_id": "e1", "type": "change.started", "ticket_id": "T", "sub_ticket_id": "s"}
    record = record_for(validated(obj, 1 << 20), obj, caller)
    [(name, value)] = record.headers
    sent = parse(value)
    assert name == "traceparent"
    assert sent is not None
    assert (sent.trace_id, sent.flags) == (caller.trace_id, caller.flags)
    assert sent.span_id != caller.span_id


def _send_gives(monkeypatch: pytest.MonkeyPatch, result: SendResult | BaseException) -> None:
    """``send_event`` stands in: it returns ``result`` (or raises it) without a broker."""

    async def sent(*args: Any, **kwargs: Any) -> SendResult:
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(send, "send_event", sent)


def test_send_json_prints_one_document_holding_the_event_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --json, stdout is exactly one JSON document: the event id went on a line before it, so
    `| jq` failed, and a timeout printed only that line."""
    applied = outcome(OutcomeStatus.APPLIED, event_id="deploy-9", http_status=200)
    _send_gives(monkeypatch, SendResult("deploy-9", DELIVERED, "t", applied))
    assert main([*SEND, "--wait-outcome", "--json"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert OutcomeEvent.model_validate_json(out) == applied  # the whole of stdout: one document
    assert json.loads(out)["event_id"] == "deploy-9"
    # an outcome the worker could not read the event of still names the event id
    _send_gives(
        monkeypatch, SendResult("deploy-9", DELIVERED, "t", outcome(OutcomeStatus.INVALID, event_id=None))
    )
    assert main([*SEND, "--wait-outcome", "--json"]) == EXIT_NOT_APPLIED
    assert json.loads(capsys.readouterr().out)["event_id"] == "deploy-9"
    # no outcome in time: the event id, the status, where the event was written, and why
    _send_gives(monkeypatch, SendResult("deploy-9", DELIVERED, "t", timed_out=True))
    assert main([*SEND, "--wait-outcome", "--json", "--timeout-s", "5"]) == EXIT_NOT_APPLIED
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "event_id": "deploy-9",
        "status": "timeout",
        "stage": "outcome",
        "timeout_s": 5.0,
        "source": {"topic": "in", "partition": 0, "offset": 1},
        "detail": "no outcome for deploy-9 within 5s (is a worker running on coc.change-events, and not"
        " paused? its /readyz says)",
    }
    assert err == ""
    # a failure: the event id in the document all the same (a retry must reuse it), the error on stderr
    _send_gives(monkeypatch, BrokerUnavailable("cannot connect to the broker: KafkaConnectionError"))
    assert main([*SEND, "--wait-outcome", "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "event_id": "deploy-9",
        "status": "error",
        "detail": "cannot connect to the broker: KafkaConnectionError",
    }
    assert err == "coc-worker: cannot connect to the broker: KafkaConnectionError\n"


def test_send_without_json_prints_the_event_id_then_the_outcome_as_before(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    applied = outcome(OutcomeStatus.APPLIED, event_id="deploy-9", http_status=200)
    _send_gives(monkeypatch, SendResult("deploy-9", DELIVERED, "t", applied))
    assert main([*SEND, "--wait-outcome"]) == EXIT_OK
    assert capsys.readouterr() == ("deploy-9\napplied (HTTP 200, after 1 attempt)\n", "")
    _send_gives(monkeypatch, SendResult("deploy-9", DELIVERED, "t", timed_out=True))
    assert main([*SEND, "--wait-outcome", "--timeout-s", "5"]) == EXIT_NOT_APPLIED
    assert capsys.readouterr() == (
        "deploy-9\n",
        "coc-worker send: no outcome for deploy-9 within 5s (is a worker running on coc.change-events,"
        " and not paused? its /readyz says)\n",
    )


@pytest.fixture
async def silent_broker() -> AsyncIterator[str]:
    """An address that accepts connections and never answers (a broker hung, a proxy in front of
    none): each request waits for the client's own timeout."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):  # read and drop every request, until the client leaves
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


@pytest.mark.parametrize("as_json", [False, True])
async def test_the_time_limit_bounds_the_whole_send_connecting_too(
    silent_broker: str, as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timeout-s bounded only the wait for the outcome: connecting the reader and the producer
    (aiokafka's 40 s and 30 s request timeouts) came on top, so `--timeout-s 2` took over 40 s
    against a broker that does not answer."""
    argv = [*SEND, "--wait-outcome", "--timeout-s", "2", "--kafka-bootstrap-servers", silent_broker]
    began = time.monotonic()
    code = await asyncio.to_thread(main, [*argv, "--json"] if as_json else argv)
    took = time.monotonic() - began
    out, err = capsys.readouterr()
    assert code == EXIT_NOT_APPLIED
    assert took < 2 + 4, f"took {took:.1f}s"
    said = (
        f"the broker did not answer within 2s (COC_WORKER_KAFKA_BOOTSTRAP_SERVERS={silent_broker});"
        " deploy-9 was not sent"
    )
    if as_json:
        assert json.loads(out) == {
            "event_id": "deploy-9",
            "status": "timeout",
            "stage": "connect",
            "timeout_s": 2.0,
            "source": None,
            "detail": said,
        }
        assert err == ""
    else:
        assert out == "deploy-9\n"
        assert err == f"coc-worker send: {said}\n"


@pytest.mark.parametrize("close_s", [0.3, None], ids=["slow-close", "hung-close"])
async def test_an_outcome_received_is_reported_whatever_the_readers_close_takes(
    monkeypatch: pytest.MonkeyPatch, close_s: float | None
) -> None:
    """The results reader closed inside the send's time limit: the limit passing while it closed
    (its fetcher, its connections) reported an outcome received as "no outcome within" (stage
    "outcome", exit 1) and interrupted the close, which left the connections open. Now the close
    runs after, to its end, bounded (``_CLOSE_TIMEOUT_S``: a close that hangs is cut short)."""
    closed: list[bool] = []

    async def started(self: Any) -> None:
        self._client = object()

    async def slow_stop(self: TopicReader) -> None:
        if self._client is None:
            return
        if close_s is None:
            await asyncio.Event().wait()  # a close that never ends
        await asyncio.sleep(close_s)  # past the send's time limit
        self._client = None
        closed.append(True)

    async def stopped(self: EventProducer) -> None:
        self._client = None

    async def ends(self: TopicReader) -> dict[int, int]:
        return {0: 0}

    async def acked(self: EventProducer, topic: str, record: Any) -> Delivered:
        return Delivered(topic, 0, 1)

    received = outcome(OutcomeStatus.APPLIED)

    async def outcome_of(results: TopicReader, start: dict[int, int], delivered: Delivered) -> OutcomeEvent:
        await asyncio.sleep(0.1)
        return received

    monkeypatch.setattr(TopicReader, "start", started)
    monkeypatch.setattr(TopicReader, "stop", slow_stop)
    monkeypatch.setattr(TopicReader, "end_offsets", ends)
    monkeypatch.setattr(EventProducer, "start", started)
    monkeypatch.setattr(EventProducer, "stop", stopped)
    monkeypatch.setattr(EventProducer, "send", acked)
    monkeypatch.setattr(send, "_outcome_of", outcome_of)
    monkeypatch.setattr(send, "_CLOSE_TIMEOUT_S", 0.5, raising=False)
    obj = {"event_id": "e1", "type": "change.started", "ticket_id": "T", "sub_ticket_id": "s"}
    began = time.monotonic()
    result = await send.send_event(load_settings(), validated(obj, 1 << 20), obj, wait_outcome_s=0.2)
    took = time.monotonic() - began
    assert (result.timed_out, result.outcome) == (False, received)
    assert result.exit_code == EXIT_OK
    assert closed == ([True] if close_s is not None else [])
    assert took < 0.2 + 0.5 + 0.5, f"took {took:.1f}s"


def _readme_ci_workflow() -> dict[Any, Any]:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    found = re.search(r"```yaml\n(# \.github/workflows/deploy\.yml\n.*?)```", readme, re.DOTALL)
    assert found, "the README's GitHub Actions recipe"
    workflow = yaml.safe_load(found.group(1))
    assert isinstance(workflow, dict)
    return workflow


def test_the_readme_ci_recipe_reports_the_end_and_result_only_of_a_started_change() -> None:
    """The end and result steps ran with `!cancelled()` alone, also after "Change started" failed:
    the deploy was skipped, and the failed branch reported a failure for a deploy that never ran,
    which a re-run could not take back."""
    steps = {step.get("name"): step for step in _readme_ci_workflow()["jobs"]["deploy"]["steps"]}
    assert steps["Change started"]["id"] == "start"
    assert "if" not in steps["Deploy"]  # runs only after a successful start
    for name in ("Change ended", "Change result"):
        condition = steps[name]["if"].removeprefix("${{").removesuffix("}}").strip()
        assert condition == "!cancelled() && steps.start.outcome == 'success'", name
        assert "--wait-outcome" in steps[name]["run"]
