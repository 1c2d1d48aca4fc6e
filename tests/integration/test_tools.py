"""The tools against the real broker, and (where the worker matters) a running worker + the simulator:
``send`` -> outcome, ``outcomes tail``, ``dlq list|replay``, Alertmanager notifications through the
worker's mounted ingress."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from conftest import SettingsFactory, running_worker
from helpers import event, read_json, read_records, send
from waiting import until

from schemas.outcomes import OutcomeEvent, OutcomeStatus, SourceRef
from worker.cli import main
from worker.consumer import Message
from worker.errors import BrokerUnavailable
from worker.publisher import DeadLetter, dead_letter_headers
from worker.sandbox import TansuBroker, create_topics, free_port, produce
from worker.settings import load_settings
from worker.simulator import SimulatorServer
from worker.tools import kafka_io
from worker.tools.kafka_io import TopicReader


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


Cli = Callable[..., Awaitable[Run]]
TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


@pytest.fixture
def cli(broker: TansuBroker, topics: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Cli:
    """``coc-worker ARGS`` in this process (in a thread: it runs its own event loop), for this test's topics."""
    kafka = [
        "--kafka-bootstrap-servers",
        broker.bootstrap,
        "--input-topic",
        topics["input"],
        "--results-topic",
        topics["results"],
        "--dlq-topic",
        topics["dlq"],
    ]

    async def run(*args: str) -> Run:
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*args, *kafka])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


async def topic_size(broker: TansuBroker, topic: str) -> int:
    """How many records ``topic`` holds now (its partitions start at offset 0)."""
    async with TopicReader(load_settings(kafka_bootstrap_servers=broker.bootstrap), topic) as reader:
        return sum((await reader.end_offsets()).values())


def send_waiting(kind: str, ticket: str, *flags: str, timeout_s: str = "30") -> list[str]:
    """``send`` of a ``kind`` event for sub-ticket s1 of ``ticket`` that waits for its outcome."""
    return [
        "send",
        "--type",
        kind,
        "--ticket",
        ticket,
        "--sub-ticket",
        "s1",
        *flags,
        "--wait-outcome",
        "--timeout-s",
        timeout_s,
    ]


# --- send -----------------------------------------------------------------------------------------------
async def test_send_waits_for_the_outcome_and_exits_by_its_status(
    broker: TansuBroker,
    topics: dict[str, str],
    simulator: SimulatorServer,
    make_settings: SettingsFactory,
    cli: Cli,
) -> None:
    async with running_worker(make_settings()):
        started = await cli(*send_waiting("started", "CM-SEND", "--source", "ci"))
        assert started.code == 0, started.err
        event_id, summary = started.lines
        assert summary.startswith("applied (HTTP 200")
        # the sub-ticket is implementing now: starting it again is refused by the API
        again = await cli(*send_waiting("change.started", "CM-SEND", "--json"))
        assert again.code == 1
        refused = OutcomeEvent.model_validate_json(again.out)  # stdout is that one document
        assert refused.event_id is not None
        assert refused.event_id.startswith("cli-")
        assert refused.status is OutcomeStatus.REJECTED
        assert (refused.http_status, refused.error_code) == (400, "GOM.00001005")
        # the same event id again (a retried CI step): a duplicate, which is success
        retried = await cli(*send_waiting("started", "CM-SEND", "--event-id", event_id))
        assert retried.code == 0
        assert retried.lines == [event_id, "duplicate (reason duplicate_event_id)"]
    assert len(simulator.state.applied_for(event_id)) == 1
    sent = await read_records(broker.bootstrap, topics["input"], 3)
    assert {r.key for r in sent} == {b"CM-SEND"}
    assert all(r.header("traceparent") for r in sent)
    first = json.loads(
        next(r.value for r in sent if json.loads(r.value or b"")["event_id"] == event_id) or b""
    )
    assert first["source"] == "ci"
    assert first["type"] == "change.started"
    assert "occurred_at" in first


async def test_send_as_a_process_from_stdin_with_env_settings(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    """The CI use: settings from COC_WORKER_* variables, the event from a file on stdin, flags on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COC_WORKER_")}
    env.update(
        {
            "COC_WORKER_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "COC_WORKER_INPUT_TOPIC": topics["input"],
            "COC_WORKER_RESULTS_TOPIC": topics["results"],
        }
    )
    template = {
        "event_id": "deploy-42-start",
        "type": "change.started",
        "ticket_id": "CM-PROC",
        "source": "gha",
    }
    async with running_worker(make_settings()):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "send",
            "--file",
            "-",
            "--sub-ticket",
            "eu-1",
            "--wait-outcome",
            "--timeout-s",
            "30",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(template).encode()), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines()[0] == "deploy-42-start"
    assert out.decode().splitlines()[1].startswith("applied")
    [applied] = simulator.state.applied_for("deploy-42-start")
    assert applied["sub_ticket_id"] == "eu-1"


async def test_send_refuses_bad_input_and_reports_a_missing_outcome(
    broker: TansuBroker, topics: dict[str, str], cli: Cli, tmp_path: Path
) -> None:
    bad = await cli("send", "--type", "ended", "--ticket", "../etc")
    assert bad.code == 2
    assert "$.ticket_id" in bad.err
    assert "$.sub_ticket_id: Field required" in bad.err
    assert len(bad.err.strip().splitlines()) == 1  # one line, every error on it
    array = tmp_path / "array.json"
    array.write_text("[]")
    assert (await cli("send", "--file", str(array))).code == 2
    with pytest.raises(SystemExit) as usage:
        await cli("send", "--type", "exploded")
    assert usage.value.code == 2
    assert await topic_size(broker, topics["input"]) == 0  # nothing was produced
    # no worker runs: the event is produced, its outcome never comes
    waited = await cli(*send_waiting("started", "CM-T", timeout_s="0.5"))
    assert waited.code == 1
    assert waited.lines[0].startswith("cli-")
    assert "no outcome" in waited.err
    [record] = await read_records(broker.bootstrap, topics["input"], 1)
    assert record.key == b"CM-T"
    assert json.loads(record.value or b"")["event_id"] == waited.lines[0]
    # with --json: one document, the event id in it, and where the event was written
    as_json = await cli(*send_waiting("started", "CM-T", "--json", "--event-id", "deploy-8", timeout_s="0.5"))
    assert as_json.code == 1
    timed_out = json.loads(as_json.out)
    assert (timed_out["event_id"], timed_out["status"], timed_out["stage"]) == (
        "deploy-8",
        "timeout",
        "outcome",
    )
    assert timed_out["source"]["topic"] == topics["input"]
    assert timed_out["detail"].startswith("no outcome for deploy-8 within 0.5s")


async def test_send_reports_an_unreachable_broker(capsys: pytest.CaptureFixture[str]) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    argv = [
        "send",
        "--type",
        "started",
        "--ticket",
        "T",
        "--sub-ticket",
        "s",
        "--kafka-bootstrap-servers",
        nobody,
    ]
    code = await asyncio.to_thread(main, [*argv, "--event-id", "deploy-7"])
    out, err = capsys.readouterr()
    assert code == 1
    # the client's own words name the servers it tried (the class name alone read like a topic or
    # permission problem)
    assert err.startswith(
        "coc-worker: cannot connect to the broker: KafkaConnectionError: Unable to bootstrap"
    )
    host, _, port = nobody.rpartition(":")
    assert f"'{host}', {port}" in err
    assert out == "deploy-7\n"  # printed before the attempt: a retry must reuse it
    assert await asyncio.to_thread(main, argv) == 1
    assert capsys.readouterr().out.startswith("cli-")  # a generated id too (before: none on a failure)
    waiting = [*argv, "--event-id", "deploy-7", "--wait-outcome", "--json"]
    assert await asyncio.to_thread(main, waiting) == 1
    out, err = capsys.readouterr()
    failed = json.loads(out)  # one document, the id in it
    assert (failed["event_id"], failed["status"]) == ("deploy-7", "error")
    assert failed["detail"] in err


def test_send_refuses_wait_flags_without_wait_outcome_and_bad_timeouts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, --timeout-s 0, -5 or nan produced the event and then gave up at once, and --json or
    --timeout-s without --wait-outcome were silently ignored."""
    argv = ["send", "--type", "started", "--ticket", "T", "--sub-ticket", "s", "--wait-outcome"]
    for timeout in ("0", "-5", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as usage:
            main([*argv, "--timeout-s", timeout])
        assert usage.value.code == 2
        assert "--timeout-s" in capsys.readouterr().err
    for flags in (["--json"], ["--timeout-s", "5"]):
        assert main([*argv[:-1], *flags]) == 2
        assert "go with --wait-outcome" in capsys.readouterr().err


# --- outcomes tail --------------------------------------------------------------------------------------
def _outcome(ticket: str, status: OutcomeStatus, offset: int, **fields: object) -> bytes:
    now = datetime.now(UTC)
    outcome = OutcomeEvent(
        event_id=f"ev-{ticket}-{offset}",
        ticket_id=ticket,
        sub_ticket_id="s1",
        type="change.started",
        status=status,
        attempts=1,
        source=SourceRef(topic="in", partition=0, offset=offset),
        received_at=now,
        finished_at=now,
        duration_ms=1.0,
        worker="w",
        **fields,  # type: ignore[arg-type]
    )
    return outcome.model_dump_json().encode()


async def test_outcomes_tail_filters_and_follows(
    broker: TansuBroker, topics: dict[str, str], cli: Cli
) -> None:
    rejected = _outcome(
        "CM-A",
        OutcomeStatus.REJECTED,
        2,
        http_status=400,
        error_code="GOM.00001005",
        error_msg="sub-ticket s1 is pending",
        reason="api_rejected",
    )
    await produce(
        broker.bootstrap,
        topics["results"],
        [
            (b"CM-A", _outcome("CM-A", OutcomeStatus.APPLIED, 1), None),
            (b"CM-A", rejected, None),
            (b"CM-B", _outcome("CM-B", OutcomeStatus.APPLIED, 3), None),
            (None, b"not an outcome", None),
        ],
    )
    everything = await cli("outcomes", "tail", "--from-beginning", "--no-follow")
    assert everything.code == 0
    assert everything.lines[0].split()[:3] == ["FINISHED", "STATUS", "TICKET"]
    assert len(everything.lines) == 4
    assert "not an outcome event" in everything.err
    only = await cli(
        "outcomes", "tail", "--from-beginning", "--no-follow", "--ticket", "CM-A", "--status", "rejected"
    )
    [row] = only.lines[1:]
    assert row.split()[1:3] == ["rejected", "CM-A"]
    assert "api_rejected HTTP 400 GOM.00001005 sub-ticket s1 is pending" in row
    as_json = await cli(
        "outcomes", "tail", "--from-beginning", "--no-follow", "--json", "--status", "applied"
    )
    assert sorted(OutcomeEvent.model_validate_json(line).ticket_id or "" for line in as_json.lines) == [
        "CM-A",
        "CM-B",
    ]
    # following: the tail waits for an outcome of CM-C that does not exist yet
    follower = asyncio.create_task(
        cli("outcomes", "tail", "--from-beginning", "--ticket", "CM-C", "--max-count", "1")
    )
    await produce(
        broker.bootstrap, topics["results"], [(b"CM-C", _outcome("CM-C", OutcomeStatus.FAILED, 4), None)]
    )
    followed = await asyncio.wait_for(follower, 30)
    assert followed.code == 0
    assert [line.split()[1:3] for line in followed.lines[1:]] == [["failed", "CM-C"]]


# --- dlq list / replay ------------------------------------------------------------------------------------
async def test_dlq_list_shows_reasons_and_selects(
    broker: TansuBroker, topics: dict[str, str], cli: Cli
) -> None:
    def letter(status: str, reason: str, event_id: str | None, value: bytes) -> tuple[bytes, bytes, list]:
        dead = DeadLetter(
            b"CM-L",
            value,
            [("origin", b"x")],
            status,
            reason,
            f"{reason} detail",
            topics["input"],
            0,
            7,
            event_id,
        )
        return (
            b"CM-L",
            value,
            dead_letter_headers(dead, "w-1", "00-" + "a" * 32 + "-" + "b" * 16 + "-01", datetime.now(UTC)),
        )

    await produce(
        broker.bootstrap,
        topics["dlq"],
        [
            letter(
                "rejected",
                "api_rejected",
                "e1",
                json.dumps(event("change.ended", "CM-L", event_id="e1")).encode(),
            ),
            letter("invalid", "bad_json", None, b"{not json"),
            letter(
                "failed",
                "retries_exhausted",
                "e3",
                json.dumps(event("change.started", "CM-L", event_id="e3")).encode(),
            ),
        ],
    )
    listing = await cli("dlq", "list")
    assert listing.code == 0
    assert len(listing.lines) == 4
    assert "3 dead-letter records" in listing.err
    assert "api_rejected" in listing.lines[1]
    assert "CM-L" in listing.lines[1]
    assert "e1" in listing.lines[1]
    invalid = await cli("dlq", "list", "--status", "invalid", "--json")
    [record] = [json.loads(line) for line in invalid.lines]
    assert (record["reason"], record["event_id"], record["ticket_id"]) == ("bad_json", None, "CM-L")
    assert record["source"] == f"{topics['input']}/0/7"
    partition = record["dlq"]["partition"]
    ranged = await cli(
        "dlq", "list", "--json", "--partition", str(partition), "--from-offset", "1", "--to-offset", "1"
    )
    assert [json.loads(line)["dlq"]["offset"] for line in ranged.lines] == [1]
    no_selection = await cli("dlq", "replay")
    assert no_selection.code == 2
    assert "--all" in no_selection.err


def dead_letters(
    topics: dict[str, str], count: int, big_at: int | None = None
) -> list[tuple[bytes, bytes, list]]:
    """``count`` rejected events of ticket CM-R as dead letters; the one at ``big_at`` is 1.5 MiB
    (dead-lettered by a worker with a larger COC_WORKER_MAX_EVENT_BYTES than the tools' limit)."""
    records = []
    for i in range(count):
        value = json.dumps(event("change.ended", "CM-R", event_id=f"r{i}")).encode()
        if i == big_at:
            value += b" " * (1536 * 1024)
        dead = DeadLetter(b"CM-R", value, [], "rejected", "api_rejected", "d", topics["input"], 0, i, f"r{i}")
        records.append((b"CM-R", value, dead_letter_headers(dead, "w-1", TRACEPARENT, datetime.now(UTC))))
    return records


async def test_a_replay_that_fails_part_way_reports_exactly_what_was_written(
    broker: TansuBroker, topics: dict[str, str], cli: Cli
) -> None:
    """Each record is reported replayed only once the broker acknowledged it. Before, every selected
    record was printed as replayed ahead of its send, and a failure left no account at all."""
    await produce(broker.bootstrap, topics["dlq"], dead_letters(topics, 21, big_at=10))
    run = await cli("dlq", "replay", "--ticket", "CM-R")
    assert run.code == 1
    replayed = [line for line in run.lines if line.startswith("replay ")]
    skipped = [line for line in run.lines if line.startswith("NOT replayed ")]
    assert len(replayed) == await topic_size(broker, topics["input"]) == 10
    assert len(skipped) == 11
    assert "10 record(s) replayed before the failure" in run.err
    assert "MessageSizeTooLargeError" in run.err


def _letter(
    topics: dict[str, str],
    event_id: str,
    at: int,
    *,
    source_topic: str | None = None,
    cut_to: int | None = None,
    value: bytes | None = None,
) -> tuple[bytes, bytes, list]:
    """A rejected event of ticket CM-R dead-lettered from ``source_topic`` (the input) offset ``at``;
    ``cut_to``: as the dead-letter writer stores a value too large for the DLQ."""
    value = value or json.dumps(event("change.ended", "CM-R", event_id=event_id)).encode()
    dead = DeadLetter(
        b"CM-R", value, [], "rejected", "api_rejected", "d", source_topic or topics["input"], 0, at, event_id
    )
    headers = dead_letter_headers(dead, "w-1", TRACEPARENT, datetime.now(UTC))
    if cut_to is not None:
        headers.append(("coc-dlq-value-truncated-from", str(len(value)).encode()))
        value = value[:cut_to]
    return b"CM-R", value, headers


async def test_a_replay_sends_one_copy_of_an_event_and_nothing_that_is_not_the_event(
    broker: TansuBroker, topics: dict[str, str], cli: Cli
) -> None:
    """The DLQ holds event r0 twice (rejected, replayed, rejected again), r1 cut by the dead-letter
    writer, r2 dead-lettered from another input topic, and r3 twice in two versions: invalid, then
    corrected by its producer under the same event_id. Before: both copies of r0 were sent, so
    the copies doubled on every replay; r1's cut bytes were sent as if they were the event (the
    worker then called it invalid); r2 went to this worker's input topic; r3's correction was
    skipped as a copy of the invalid version, on every run."""
    other = topics["input"] + "-other"
    await produce(
        broker.bootstrap,
        topics["dlq"],
        [
            _letter(topics, "r0", 0),
            _letter(topics, "r0", 5),
            _letter(topics, "r1", 1, cut_to=40),
            _letter(topics, "r2", 0, source_topic=other),
            _letter(topics, "r3", 2, value=b'{"event_id": "r3", "type": "change.ended"}'),
            _letter(topics, "r3", 3),
        ],
    )
    run = await cli("dlq", "replay", "--all")
    assert run.code == 1
    verbs = [(line.split()[0], line.split(" event=")[1].split(":")[0]) for line in run.lines]
    assert verbs == [
        ("replay", "r0"),
        ("skip", "r0"),
        ("NOT", "r1"),
        ("NOT", "r2"),
        ("replay", "r3"),
        ("replay", "r3"),
    ]
    first_at = run.lines[0].split()[1]  # the DLQ's partition/offset of r0's first record
    assert run.lines[1].endswith(f"a copy of {first_at}, sent by this run")
    assert "cut its value to 40 of" in run.lines[2]
    assert f"the whole message is at {topics['input']}/0/1" in run.lines[2]
    assert f"replay it with --to-topic {other}" in run.lines[3]
    assert "replayed 3 of 6 record(s)" in run.err
    assert "1 later copy of an event skipped; 2 NOT replayable" in run.err
    sent = await read_records(broker.bootstrap, topics["input"], 3)
    assert [json.loads(r.value or b"")["event_id"] for r in sent] == ["r0", "r3", "r3"]
    assert "sub_ticket_id" in json.loads(sent[2].value or b"")  # the corrected version
    assert await topic_size(broker, topics["input"]) == 3
    dry = await cli("dlq", "replay", "--all", "--dry-run")
    assert [line.split()[0] for line in dry.lines] == ["would", "would", "NOT", "NOT", "would", "would"]
    assert dry.lines[1].startswith("would skip")
    assert "dry run: 3 of 6 record(s) would be replayed" in dry.err
    named = await cli("dlq", "replay", "--all", "--to-topic", other)  # as the hint says
    assert named.code == 1, named.err
    assert [line.split()[0] for line in named.lines].count("replay") == 1  # r2 alone, not the others
    [stranger] = await read_records(broker.bootstrap, other, 1)
    assert json.loads(stranger.value or b"")["event_id"] == "r2"
    assert await topic_size(broker, other) == 1


async def test_replay_targets_and_partitions_are_checked(
    broker: TansuBroker, topics: dict[str, str], cli: Cli
) -> None:
    await produce(broker.bootstrap, topics["dlq"], dead_letters(topics, 2))
    for target in (topics["dlq"], topics["results"], "bad topic!"):
        run = await cli("dlq", "replay", "--all", "--to-topic", target)
        assert run.code == 2
        assert "--to-topic" in run.err
    backwards = await cli("dlq", "list", "--partition", "0", "--from-offset", "9", "--to-offset", "3")
    assert backwards.code == 2
    assert "--from-offset 9 is after --to-offset 3" in backwards.err
    missing = await cli("dlq", "replay", "--partition", "99")
    assert missing.code == 2
    assert "has partitions 0-" in missing.err
    for bad in (("--partition", "-1"), ("--from-offset", "-3"), ("--to-offset", "x")):
        with pytest.raises(SystemExit) as usage:
            await cli("dlq", "list", *bad)
        assert usage.value.code == 2
    assert await topic_size(broker, topics["input"]) == 0


async def test_limits_below_one_are_refused(broker: TansuBroker, topics: dict[str, str], cli: Cli) -> None:
    await produce(broker.bootstrap, topics["dlq"], dead_letters(topics, 3))
    for args in (("dlq", "replay", "--all", "--limit", "0"), ("dlq", "list", "--limit", "-1")):
        with pytest.raises(SystemExit) as exited:
            await cli(*args)
        assert exited.value.code == 2
    assert await topic_size(broker, topics["input"]) == 0


async def test_a_listing_piped_into_head_ends_quietly(broker: TansuBroker, topics: dict[str, str]) -> None:
    await produce(broker.bootstrap, topics["dlq"], dead_letters(topics, 50))
    env = {
        **os.environ,
        "COC_WORKER_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "COC_WORKER_DLQ_TOPIC": topics["dlq"],
    }
    proc = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m worker dlq list | head -1; echo exit=${{PIPESTATUS[0]}}",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        executable="/bin/bash",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert "Traceback" not in err.decode()
    assert out.decode().splitlines()[-1] in ("exit=141", "exit=0")  # 0: it finished before head left


async def test_a_kafka_ca_file_that_cannot_be_loaded_is_a_configuration_error(
    cli: Cli, tmp_path: Path
) -> None:
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("not a certificate")
    for cafile in ("/nonexistent/ca.pem", str(not_a_cert)):
        run = await cli("dlq", "list", "--kafka-security-protocol", "SSL", "--kafka-ssl-cafile", cafile)
        assert run.code == 2
        assert "COC_WORKER_KAFKA_SSL_CAFILE" in run.err


async def test_dlq_replay_after_the_ticket_was_fixed_ends_applied(
    broker: TansuBroker,
    topics: dict[str, str],
    simulator: SimulatorServer,
    make_settings: SettingsFactory,
    cli: Cli,
) -> None:
    """An end reported before the start is rejected; once started, the replayed end is applied."""
    async with running_worker(make_settings()):
        early = await cli(*send_waiting("ended", "CM-DLQ"))
        assert early.code == 1
        assert early.lines[1].startswith("rejected")
        ended_id = early.lines[0]
        [dead] = await read_records(broker.bootstrap, topics["dlq"], 1)
        listing = await cli("dlq", "list", "--ticket", "CM-DLQ")
        assert "rejected" in listing.lines[1]
        assert "api_rejected" in listing.lines[1]
        assert ended_id in listing.lines[1]
        dry = await cli("dlq", "replay", "--ticket", "CM-DLQ", "--dry-run")
        assert dry.code == 0
        assert dry.lines[0].startswith("would replay")
        assert "dry run: 1 of 1 record(s)" in dry.err
        assert await topic_size(broker, topics["input"]) == 1
        fixed = await cli(*send_waiting("started", "CM-DLQ"))
        assert fixed.code == 0
        replayed = await cli("dlq", "replay", "--reason", "api_rejected", "--ticket", "CM-DLQ")
        assert replayed.code == 0
        assert "replayed 1 of 1 record(s)" in replayed.err
        outcomes = await read_json(broker.bootstrap, topics["results"], 3)
    assert [(o["event_id"], o["status"]) for o in outcomes] == [
        (ended_id, "rejected"),
        (fixed.lines[0], "applied"),
        (ended_id, "applied"),
    ]
    assert len(simulator.state.applied_for(ended_id)) == 1
    inputs = await read_records(broker.bootstrap, topics["input"], 3)
    again = inputs[-1]
    assert (again.key, again.value) == (dead.key, dead.value)  # same key, same bytes, same event_id
    names = [k for k, _ in again.headers]
    assert not [n for n in names if n.startswith("coc-dlq-")]
    assert again.header("coc-replayed-from-topic") == topics["dlq"].encode()
    assert again.header("coc-replayed-from-offset") == str(dead.offset).encode()
    assert again.header("traceparent") == dead.header("traceparent")


# --- Alertmanager through the worker's own HTTP server -----------------------------------------------------
def alertmanager_notification(ticket: str, sub: str) -> dict[str, object]:
    """Shaped like Alertmanager's documented webhook body (version 4)."""
    firing = {
        "status": "firing",
        "labels": {
            "alertname": "HighErrorRate",
            "severity": "critical",
            "ticket_id": ticket,
            "sub_ticket_id": sub,
            "change_fail_type": "fr_dependent_service_issue",
        },
        "annotations": {
            "summary": "5xx ratio above 5%",
            "description": "checkout returns errors since the rollout",
        },
        "startsAt": "2025-11-28T03:00:26.739266876+01:00",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example.org:9090/graph?g0.expr=errors",
        "fingerprint": "1a30ba71cca2921f",
    }
    resolved = {
        **firing,
        "status": "resolved",
        "fingerprint": "2b41cb82ddb3a320",
        "endsAt": "2025-11-28T03:10:00Z",
    }
    unlabelled = {**firing, "labels": {"alertname": "DiskFull"}, "fingerprint": "3c52dc93eec4b431"}
    return {
        "version": "4",
        "groupKey": '{}:{alertname="HighErrorRate"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "coc",
        "groupLabels": {"alertname": "HighErrorRate"},
        "commonLabels": {"alertname": "HighErrorRate"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example.org:9093",
        "alerts": [firing, resolved, unlabelled],
    }


async def test_alertmanager_notification_sent_twice_is_applied_once(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    settings = make_settings(ingest_enabled=True, ingest_tokens="am-token-0123")
    async with running_worker(settings) as worker:
        await send(
            broker.bootstrap,
            topics["input"],
            [event("change.started", "CM-AM", "eu-1"), event("change.ended", "CM-AM", "eu-1")],
        )
        await read_json(broker.bootstrap, topics["results"], 2)
        url = f"http://127.0.0.1:{worker.http_port}/v1/alertmanager"
        body = alertmanager_notification("CM-AM", "eu-1")
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer am-token-0123"}) as http:
            answers = []
            for _ in range(2):  # Alertmanager notifies again (repeat_interval, retry, HA pair)
                async with http.post(url, json=body) as response:
                    assert response.status == 202
                    answers.append(await response.json())
            async with http.post(url, json=body, headers={"Authorization": "Bearer wrong"}) as response:
                assert response.status == 401
        outcomes = await read_json(broker.bootstrap, topics["results"], 4)
    assert answers[0] == answers[1]
    [event_id] = answers[0]["event_ids"]
    assert event_id == "am-1a30ba71cca2921f-1764295226739"
    assert [(s["index"], s["reason"]) for s in answers[0]["skipped"]] == [
        (1, "resolved"),
        (2, "no_ticket_labels"),
    ]
    assert [o["status"] for o in outcomes] == ["applied", "applied", "applied", "duplicate"]
    assert {o["event_id"] for o in outcomes[2:]} == {event_id}
    sub = simulator.state.book.tickets["CM-AM"].sub_tickets["eu-1"]
    assert sub.state == "failed"
    assert sub.fields["is_monitor_found"] is True
    assert sub.fields["change_fail_type"] == "fr_dependent_service_issue"
    assert (
        sub.fields["comment"]
        == "[HighErrorRate] 5xx ratio above 5% - checkout returns errors since the rollout"
    )


@pytest.mark.parametrize("command", [["outcomes", "tail", "--no-follow"], ["dlq", "list"]])
async def test_a_table_tool_prints_no_header_when_the_broker_cannot_be_reached(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The header went to stdout before the connection failed: a pipeline got a header line, as if
    the topic were empty."""
    nobody = f"127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(main, [*command, "--kafka-bootstrap-servers", nobody]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "Unable to bootstrap" in err


# --- a broker lost while a tool reads ------------------------------------------------------------------------
async def main_within(argv: list[str], timeout_s: float) -> int:
    """``main(argv)`` in a thread of its own, awaited with a deadline. A daemon thread: a tool that
    hangs (as they did on a lost broker) fails the test at the deadline instead of holding the run."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def run() -> None:
        try:
            code = main(argv)
        except BaseException as exc:  # SystemExit too: handed to the test
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, code)

    threading.Thread(target=run, daemon=True).start()
    return await asyncio.wait_for(done, timeout_s)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A Tansu broker of this test alone: it is lost (killed) while a tool reads."""
    broker = TansuBroker(log_path=tmp_path / "tansu.log").start()
    try:
        yield broker
    finally:
        broker.stop()


OWN_TOPICS = {"input": "in-lost", "results": "out-lost", "dlq": "dlq-lost"}


def lose(broker: TansuBroker) -> None:
    """The broker gone at once, as in a crash (SIGKILL: stopped with SIGTERM, Tansu waits 5 s for
    its clients to leave); a no-op once it is."""
    if broker.pid is not None:
        os.kill(broker.pid, signal.SIGKILL)
        broker.stop()  # reaps it


def own_flags(broker: TansuBroker) -> list[str]:
    return [
        "--kafka-bootstrap-servers",
        broker.bootstrap,
        "--input-topic",
        OWN_TOPICS["input"],
        "--results-topic",
        OWN_TOPICS["results"],
        "--dlq-topic",
        OWN_TOPICS["dlq"],
    ]


def stopping_at_the_first_record(
    monkeypatch: pytest.MonkeyPatch, broker: TansuBroker, name: str
) -> list[int]:
    """Stop ``broker`` as ``TopicReader.<name>`` hands out its first record (the broker gone
    mid-read, the rest of the topic not fetched yet); returns the offsets handed out."""
    original = getattr(TopicReader, name)
    handed: list[int] = []

    async def wrapped(self: TopicReader, *args: dict[int, int]) -> AsyncGenerator[Message, None]:
        async for message in original(self, *args):
            lose(broker)  # in the tool's own loop, before the record is handed on
            handed.append(message.offset)
            yield message

    monkeypatch.setattr(TopicReader, name, wrapped)
    return handed


def padded_outcome(ticket: str, offset: int) -> bytes:
    """An outcome of ~200 KiB: 80 of them are more than a reader fetches ahead."""
    return _outcome(ticket, OutcomeStatus.FAILED, offset, error_msg="x" * (200 * 1024))


def padded_dead_letter(i: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    value = json.dumps(event("change.ended", "CM-LOST", event_id=f"lost-{i}", comment="x" * (200 * 1024)))
    dead = DeadLetter(
        b"CM-LOST",
        value.encode(),
        [],
        "rejected",
        "api_rejected",
        "d",
        OWN_TOPICS["input"],
        0,
        i,
        f"lost-{i}",
    )
    return b"CM-LOST", value.encode(), dead_letter_headers(dead, "w-1", TRACEPARENT, datetime.now(UTC))


@pytest.mark.parametrize(
    ("command", "reads"),
    [
        (["dlq", "list"], "read_range"),
        (["dlq", "replay", "--all"], "read_range"),
        (["dlq", "replay", "--all", "--dry-run"], "read_range"),
        (["outcomes", "tail", "--from-beginning", "--no-follow"], "read_range"),
        (["outcomes", "tail", "--from-beginning"], "follow"),
    ],
)
async def test_a_tool_that_loses_the_broker_mid_read_fails_naming_it(
    command: list[str],
    reads: str,
    own_broker: TansuBroker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """aiokafka's fetches only come back empty while the broker is gone: the tools waited forever,
    without a word. Now nothing read for STALL_S makes them ask the broker, and no answer ends
    them with exit 1 and the servers named."""
    monkeypatch.setattr(kafka_io, "STALL_S", 0.5)
    await create_topics(own_broker.bootstrap, list(OWN_TOPICS.values()), partitions=1)
    count = 80
    if command[0] == "dlq":
        topic = OWN_TOPICS["dlq"]
        await produce(own_broker.bootstrap, topic, [padded_dead_letter(i) for i in range(count)])
    else:
        topic = OWN_TOPICS["results"]
        await produce(
            own_broker.bootstrap,
            topic,
            [(b"CM-LOST", padded_outcome("CM-LOST", i), None) for i in range(count)],
        )
    handed = stopping_at_the_first_record(monkeypatch, own_broker, reads)
    code = await main_within([*command, *own_flags(own_broker)], 60)
    err = capsys.readouterr().err
    assert code == 1, err
    assert 0 < len(handed) < count  # stopped mid-read
    assert (
        f"coc-worker: lost the broker while reading {topic!r}: nothing came for 0.5 s, and"
        f" COC_WORKER_KAFKA_BOOTSTRAP_SERVERS={own_broker.bootstrap} does not answer"
    ) in err
    assert "Traceback" not in err
    if command[:2] == ["dlq", "replay"] and "--dry-run" not in command:
        assert f"dlq replay: reading the DLQ failed; 0 record(s) replayed to {OWN_TOPICS['input']!r}" in err


def count_answered_pings(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A list that grows by one for each broker check a reader makes that the broker answers."""
    answered: list[bool] = []
    ping = TopicReader.ping

    async def counted(self: TopicReader) -> None:
        await ping(self)
        answered.append(True)

    monkeypatch.setattr(TopicReader, "ping", counted)
    return answered


async def test_outcomes_tail_follows_an_idle_topic_while_the_broker_answers_then_fails_without_it(
    own_broker: TansuBroker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An idle results topic is normal: the tail asks the broker every STALL_S and goes on while it
    answers; once it does not, the tail ends (exit 1, the servers named) instead of waiting forever."""
    monkeypatch.setattr(kafka_io, "STALL_S", 0.2)
    await create_topics(own_broker.bootstrap, list(OWN_TOPICS.values()), partitions=1)
    answered = count_answered_pings(monkeypatch)
    following = asyncio.ensure_future(main_within(["outcomes", "tail", *own_flags(own_broker)], 60))
    await until(lambda: len(answered) >= 3 or following.done(), 20, 0.02, what="three answers while idle")
    assert not following.done()
    await produce(
        own_broker.bootstrap,
        OWN_TOPICS["results"],
        [(b"CM-IDLE", _outcome("CM-IDLE", OutcomeStatus.APPLIED, 1), None)],
    )
    seen = len(answered)
    await until(
        lambda: len(answered) > seen or following.done(), 20, 0.02, what="an answer after the outcome"
    )
    assert not following.done()
    lose(own_broker)
    assert await asyncio.wait_for(following, 30) == 1
    out, err = capsys.readouterr()
    assert [line.split()[1:3] for line in out.splitlines()[1:]] == [["applied", "CM-IDLE"]]
    assert f"lost the broker while reading {OWN_TOPICS['results']!r}" in err
    assert f"COC_WORKER_KAFKA_BOOTSTRAP_SERVERS={own_broker.bootstrap}" in err


async def test_send_waiting_for_an_outcome_ends_when_the_broker_is_lost(
    own_broker: TansuBroker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It waited out its whole --timeout-s for an outcome that could not come, then blamed the
    worker ("is a worker running?")."""
    monkeypatch.setattr(kafka_io, "STALL_S", 0.2)
    await create_topics(own_broker.bootstrap, list(OWN_TOPICS.values()), partitions=1)
    answered = count_answered_pings(monkeypatch)
    argv = [
        *send_waiting("started", "CM-GONE", "--event-id", "deploy-lost", timeout_s="120"),
        *own_flags(own_broker),
    ]
    waiting = asyncio.ensure_future(main_within(argv, 60))
    await until(lambda: bool(answered) or waiting.done(), 20, 0.02, what="the wait for the outcome")
    began = time.monotonic()
    lose(own_broker)
    assert await asyncio.wait_for(waiting, 30) == 1
    assert time.monotonic() - began < 10
    out, err = capsys.readouterr()
    assert out == "deploy-lost\n"
    assert f"lost the broker while reading {OWN_TOPICS['results']!r}" in err
    assert "no outcome" not in err


async def test_a_slow_broker_that_answers_is_not_taken_for_a_lost_one(
    broker: TansuBroker, topics: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ping after STALL_S was bounded by 3 s, but aiokafka sends it on the fetcher's connection,
    behind a fetch in flight (up to max_partition_fetch_bytes per partition: ~10 s for a large DLQ
    over a slow VPN): a tool failed with "lost the broker" on a broker only slow. The ping is now
    bounded by the reader's request timeout, as aiokafka's own requests are."""
    monkeypatch.setattr(kafka_io, "STALL_S", 0.2)
    settings = load_settings(kafka_bootstrap_servers=broker.bootstrap)
    answered: list[float] = []
    async with TopicReader(settings, topics["results"], request_timeout_s=5.0) as reader:
        consumer = reader._require()
        metadata = consumer.topics

        async def slow_metadata() -> set[str]:
            began = time.monotonic()
            await asyncio.sleep(3.5)  # over the old 3 s bound, under the request timeout
            found = await metadata()
            answered.append(time.monotonic() - began)
            return found

        monkeypatch.setattr(consumer, "topics", slow_metadata)
        start = await reader.end_offsets()
        try:
            async with asyncio.timeout(4.5):  # a slow answer, then the next ping under way
                async for message in reader.follow(start):
                    pytest.fail(f"nothing was produced, read {message}")
        except TimeoutError:
            pass
    assert len(answered) == 1, answered
    assert answered[0] > 3.0, answered


async def test_a_silent_broker_is_still_reported_within_the_request_timeout(
    broker: TansuBroker, topics: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that does not answer the ping at all fails the read once the reader's request
    timeout passed (``REQUEST_TIMEOUT_S``, the default, shortened as STALL_S is)."""
    monkeypatch.setattr(kafka_io, "STALL_S", 0.2)
    monkeypatch.setattr(kafka_io, "REQUEST_TIMEOUT_S", 1.0)
    settings = load_settings(kafka_bootstrap_servers=broker.bootstrap)
    async with TopicReader(settings, topics["results"]) as reader:
        consumer = reader._require()

        async def no_answer() -> set[str]:
            await asyncio.Event().wait()  # a broker silent, not gone (a refused connection fails at once)
            raise AssertionError("unreachable")

        monkeypatch.setattr(consumer, "topics", no_answer)
        start = await reader.end_offsets()
        began = time.monotonic()

        async def read() -> None:
            async with asyncio.timeout(10):
                async for _ in reader.follow(start):
                    pass

        with pytest.raises(BrokerUnavailable, match=r"lost the broker .* no answer within 1 s"):
            await read()
    assert time.monotonic() - began < 0.2 + 1.0 + 1.0


async def test_a_close_that_hangs_is_cut_short_and_still_closes_the_connections(
    broker: TansuBroker, topics: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop_within``: a reader's close past its time is cancelled, and the connections are closed
    all the same (an interrupted ``stop`` left them open)."""
    reader = TopicReader(load_settings(kafka_bootstrap_servers=broker.bootstrap), topics["results"])
    await reader.start()
    await reader.end_offsets()  # a fetch too: the fetcher's connection
    consumer = reader._require()
    connections = list(consumer._client._conns.values())
    assert any(conn.connected() for conn in connections)

    async def hangs() -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(consumer._fetcher, "close", hangs)  # the consumer's stop waits on it
    began = time.monotonic()
    await reader.stop_within(0.3)
    assert time.monotonic() - began < 2
    assert not any(conn.connected() for conn in connections)
