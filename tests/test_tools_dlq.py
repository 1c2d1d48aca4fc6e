"""``dlq list|replay``: reading the coc-dlq-* explanation, choosing records, the replayed headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from worker.cli import main
from worker.consumer import Message
from worker.publisher import DeadLetter, Publisher, dead_letter_headers
from worker.settings import load_settings
from worker.tools.dlq import DeadLetterRecord, Selection, _refusal, list_header, list_row, replay_headers
from worker.tools.kafka_io import Delivered, OutRecord, PartialWrite

TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
EVENT = {"event_id": "e1", "type": "change.ended", "ticket_id": "CM1", "sub_ticket_id": "s1"}


def dead_letter(value: bytes | None = None, key: bytes | None = b"CM1", **changes: object) -> Message:
    fields: dict[str, object] = {
        "key": key,
        "value": json.dumps(EVENT).encode() if value is None else value,
        "headers": [("origin", b"ci"), ("coc-replayed-from-offset", b"3")],
        "status": "rejected",
        "reason": "api_rejected",
        "detail": "GOM.00001005: sub-ticket s1 is pending",
        "topic": "in",
        "partition": 2,
        "offset": 40,
        "event_id": "e1",
    }
    fields.update(changes)
    letter = DeadLetter(**fields)  # type: ignore[arg-type]
    headers = dead_letter_headers(letter, "w-1", TRACEPARENT, datetime(2025, 11, 28, tzinfo=UTC))
    return Message("dlq", 1, 7, letter.key, letter.value, headers, 0)


def test_a_record_is_read_from_its_headers() -> None:
    record = DeadLetterRecord.from_message(dead_letter(), 1 << 20)
    assert (record.status, record.reason, record.event_id, record.ticket_id) == (
        "rejected",
        "api_rejected",
        "e1",
        "CM1",
    )
    assert record.source == "in/2/40"
    assert record.error == "GOM.00001005: sub-ticket s1 is pending"
    assert record.as_json()["dlq"] == {"topic": "dlq", "partition": 1, "offset": 7}
    assert record.at == "2025-11-28T00:00:00Z"  # as the outcomes write their times
    assert (record.http_status, record.error_code) == (None, None)
    assert record.answer == record.error


def test_the_apis_status_and_code_travel_with_the_dead_letter() -> None:
    """A DLQ consumer tells a step out of order (400) from an unknown ticket (404) without joining
    the results topic: the letter carries the API's answer, and ``dlq list`` shows it."""
    message = dead_letter(http_status=400, error_code="GOM.00001005", detail="sub-ticket s1 is pending")
    headers = dict(message.headers)
    assert (headers["coc-dlq-http-status"], headers["coc-dlq-error-code"]) == (b"400", b"GOM.00001005")
    record = DeadLetterRecord.from_message(message, 1 << 20)
    assert (record.http_status, record.error_code) == (400, "GOM.00001005")
    assert record.as_json()["http_status"] == 400
    assert record.as_json()["error_code"] == "GOM.00001005"
    assert list_row(record).endswith("HTTP 400 GOM.00001005: sub-ticket s1 is pending")
    # A status the header cannot hold as a number is left out, not raised over.
    odd = [(k, b"4x" if k == "coc-dlq-http-status" else v) for k, v in message.headers]
    garbled = Message("dlq", 1, 7, message.key, message.value, odd, 0)
    assert DeadLetterRecord.from_message(garbled, 1 << 20).http_status is None


def test_ticket_and_event_id_fall_back_to_the_value_and_never_trust_a_hostile_key() -> None:
    record = DeadLetterRecord.from_message(dead_letter(key=b"../etc", event_id=None), 1 << 20)
    assert (record.ticket_id, record.event_id) == ("CM1", "e1")
    garbage = DeadLetterRecord.from_message(
        dead_letter(value=b"\xff", key=None, event_id=None, status="invalid"), 1 << 20
    )
    assert (garbage.ticket_id, garbage.event_id, garbage.status) == (None, None, "invalid")
    bare = DeadLetterRecord.from_message(Message("dlq", 0, 0, None, None, [], 0), 1 << 20)
    assert (bare.status, bare.reason, bare.source) == ("?", "?", "?/?/?")


def test_selection() -> None:
    record = DeadLetterRecord.from_message(dead_letter(), 1 << 20)
    assert Selection().matches(record)
    assert not Selection().narrows
    assert Selection(reasons=frozenset({"api_rejected", "x"}), tickets=frozenset({"CM1"})).matches(record)
    assert not Selection(statuses=frozenset({"invalid"})).matches(record)
    assert not Selection(event_ids=frozenset({"e2"})).matches(record)
    assert Selection(from_offset=0).narrows


def test_bounds_narrow_the_topic_range() -> None:
    begin, end = {0: 0, 1: 5, 2: 0}, {0: 10, 1: 9, 2: 0}
    assert Selection().bounds(begin, end) == (begin, end)
    assert Selection(partition=1, from_offset=2, to_offset=6).bounds(begin, end) == ({1: 5}, {1: 7})
    assert Selection(to_offset=100).bounds(begin, end) == (begin, end)


def test_replayed_headers_drop_the_dlq_explanation_and_say_where_from() -> None:
    record = DeadLetterRecord.from_message(dead_letter(), 1 << 20)
    now = datetime(2025, 11, 28, 4, tzinfo=UTC)
    headers = replay_headers(record, now)
    assert headers == [
        ("origin", b"ci"),
        ("traceparent", TRACEPARENT.encode()),
        ("coc-replayed-from-topic", b"dlq"),
        ("coc-replayed-from-partition", b"1"),
        ("coc-replayed-from-offset", b"7"),
        ("coc-replayed-at", b"2025-11-28T04:00:00Z"),
    ]


def test_the_dead_letter_of_an_unreadable_record_is_never_replayed() -> None:
    """Its empty key and value are not the event: replayed, they went to the input as a junk
    message (a new bad_json dead letter pointing at the copy), and the run reported success."""
    record = DeadLetterRecord.from_message(
        dead_letter(value=b"", key=None, event_id=None, status="invalid", reason="unreadable"), 1 << 20
    )
    assert _refusal(record, "in", from_any_topic=False) == (
        "the Kafka client could not read the input record (a header key that is not UTF-8);"
        " the whole message is at in/2/40"
    )


class _DeadLetterTopic:
    """Stands in for ``TopicReader`` of the DLQ: one partition holding ``messages`` from offset 0."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages

    def __call__(self, settings: Any, topic: str) -> _DeadLetterTopic:
        self.topic = topic
        return self

    async def __aenter__(self) -> _DeadLetterTopic:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    async def beginning_offsets(self) -> dict[int, int]:
        return {0: 0}

    async def end_offsets(self) -> dict[int, int]:
        return {0: len(self.messages)}

    async def read_range(self, start: dict[int, int], end: dict[int, int]) -> AsyncGenerator[Message, None]:
        for message in self.messages[start[0] : end[0]]:
            yield message


class _Accepts:
    """Stands in for ``EventProducer``: every record acknowledged; what was sent, by topic."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[OutRecord]]] = []

    def __call__(self, settings: Any) -> _Accepts:
        return self

    async def __aenter__(self) -> _Accepts:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    async def send_many(self, topic: str, records: Sequence[OutRecord]) -> list[Delivered]:
        self.sent.append((topic, list(records)))
        return [Delivered(topic, 0, i) for i in range(len(records))]

    def event_ids(self) -> list[tuple[str, str]]:
        return [(topic, json.loads(r.value or b"")["event_id"]) for topic, rs in self.sent for r in rs]


class _AnswerLost(_Accepts):
    """The write times out after two records were handed to the client, the first of them
    acknowledged (as ``EventProducer.send_many`` raises it)."""

    async def send_many(self, topic: str, records: Sequence[OutRecord]) -> list[Delivered]:
        self.sent.append((topic, list(records)))
        raise PartialWrite("timed out", [Delivered(topic, 0, 0), None, None], handed=2)


def _replay_kafka(topic: str = "in") -> list[str]:
    return ["--kafka-bootstrap-servers", "127.0.0.1:9", "--input-topic", topic, "--dlq-topic", "dlq"]


def _letter_from(topic: str, event_id: str, offset: int, ticket: str = "CM1") -> Message:
    """A dead letter as the worker writes one, of an event of ``ticket`` read from ``topic``."""
    value = json.dumps({**EVENT, "event_id": event_id, "ticket_id": ticket}).encode()
    dead = DeadLetter(ticket.encode(), value, [], "rejected", "api_rejected", "d", topic, 0, offset, event_id)
    headers = dead_letter_headers(dead, "w-1", TRACEPARENT, datetime.now(UTC))
    return Message("dlq", 0, offset, ticket.encode(), value, headers, 0)


def test_records_sent_but_not_acknowledged_are_reported_as_unknown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record handed to the client whose acknowledgement never came (a timeout) may be written:
    before, it was reported 'NOT replayed ... were not written'. The replay's account of a partial
    write, not the broker, is tested here: the DLQ and the producer are stand-ins."""
    letters = [_letter_from("in", f"r{i}", i, ticket="CM-R") for i in range(3)]
    producer = _AnswerLost()
    monkeypatch.setattr("worker.tools.dlq.TopicReader", _DeadLetterTopic(letters))
    monkeypatch.setattr("worker.tools.dlq.EventProducer", producer)
    code = main(["dlq", "replay", "--all", *_replay_kafka()])
    out, err = capsys.readouterr()
    assert code == 1
    [(topic, records)] = producer.sent
    assert (topic, [json.loads(r.value or b"")["event_id"] for r in records]) == ("in", ["r0", "r1", "r2"])
    assert [line.split()[0] for line in out.splitlines()] == ["replay", "UNKNOWN", "NOT"]
    assert "1 marked UNKNOWN were sent but not acknowledged and may have been written" in err


def test_dlq_list_keeps_its_columns_and_its_identifiers_whole() -> None:
    """The widest reason stays in its column, an id `send` made is shown whole (an operator copies
    it into `dlq replay`), and a long error is cut with a mark instead of silently."""
    long_id = "cli-" + "a" * 32
    records = [
        DeadLetterRecord.from_message(dead_letter(reason="retries_exhausted", event_id=long_id), 1 << 20),
        DeadLetterRecord.from_message(dead_letter(reason="event_id_reused", detail="x " * 300), 1 << 20),
    ]
    lines = [list_header(), *(list_row(r) for r in records)]
    starts = [
        line.index(word)
        for line, word in zip(lines, ("REASON", "retries_exhausted", "event_id_reused"), strict=True)
    ]
    assert len(set(starts)) == 1
    assert long_id in lines[1]
    assert lines[2].endswith("…")
    assert lines[1].index("in/2/40") == lines[2].index("in/2/40") == lines[0].index("SOURCE")


def test_following_the_to_topic_hint_sends_only_that_topics_dead_letters(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two workers share a DLQ. The hint for the other topic's record says --to-topic other; with
    it every record went there, this worker's own too, exit code 0."""
    letters = [_letter_from("in", "x0", 0), _letter_from("other", "x1", 1)]
    producer = _Accepts()
    monkeypatch.setattr("worker.tools.dlq.TopicReader", _DeadLetterTopic(letters))
    monkeypatch.setattr("worker.tools.dlq.EventProducer", producer)
    assert main(["dlq", "replay", "--all", *_replay_kafka()]) == 1
    assert "replay it with --to-topic other" in capsys.readouterr().out
    assert main(["dlq", "replay", "--all", "--to-topic", "other", *_replay_kafka()]) == 1
    assert (
        main(["dlq", "replay", "--all", "--to-topic", "renamed", "--from-any-topic", *_replay_kafka()]) == 0
    )
    assert producer.event_ids() == [("in", "x0"), ("other", "x1"), ("renamed", "x0"), ("renamed", "x1")]


def test_records_the_worker_did_not_write_are_never_replayed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record written to the DLQ by hand: a keyed tombstone went to the input topic as a
    tombstone, and one without key or value made aiokafka raise an AssertionError past every
    handler (a traceback, the records before it in the same group sent and never reported)."""
    letters = [
        _letter_from("in", "x0", 0),
        Message("dlq", 0, 1, None, None, [], 0),
        Message("dlq", 0, 2, b"CM1", None, [], 0),
        Message("dlq", 0, 3, b"CM1", json.dumps(EVENT).encode(), [], 0),
    ]
    producer = _Accepts()
    monkeypatch.setattr("worker.tools.dlq.TopicReader", _DeadLetterTopic(letters))
    monkeypatch.setattr("worker.tools.dlq.EventProducer", producer)
    assert main(["dlq", "replay", "--all", *_replay_kafka()]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["replay", "NOT", "NOT", "NOT"]
    assert all("not a dead letter of the worker" in line for line in out[1:])
    assert producer.event_ids() == [("in", "x0")]


def test_a_replay_goes_on_when_its_output_is_cut(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dlq replay --all | head``: the first line after head left raised BrokenPipeError and the
    run ended with the first group of 500 sent and the rest not, exit code 141, no summary."""
    import io

    class Cut(io.StringIO):
        def write(self, text: str) -> int:
            if self.tell() > 200:
                raise BrokenPipeError
            return super().write(text)

    letters = [_letter_from("in", f"x{i}", i) for i in range(600)]
    producer = _Accepts()
    monkeypatch.setattr("worker.tools.dlq.TopicReader", _DeadLetterTopic(letters))
    monkeypatch.setattr("worker.tools.dlq.EventProducer", producer)
    monkeypatch.setattr("sys.stdout", Cut())
    assert main(["dlq", "replay", "--all", *_replay_kafka()]) == 0
    assert len(producer.event_ids()) == 600
    assert "replayed 600 of 600 record(s)" in capsys.readouterr().err


def test_a_dead_letter_is_listed_and_chosen_by_its_events_ticket_not_its_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the worker reads it: the value's ticket_id, the key only when the value names none.
    Almost any key is a valid ticket id, so the key came first: a record keyed ``svc-payments`` of
    ticket CMB was listed as ``svc-payments``, ``--ticket CMB`` chose nothing and
    ``--ticket svc-payments`` replayed other tickets' events."""
    value = json.dumps({**EVENT, "ticket_id": "CMB"}).encode()
    record = DeadLetterRecord.from_message(dead_letter(value=value, key=b"svc-payments"), 1 << 20)
    assert record.ticket_id == "CMB"
    assert record.as_json()["ticket_id"] == "CMB"
    assert " CMB " in list_row(record)
    assert Selection(tickets=frozenset({"CMB"})).matches(record)
    assert not Selection(tickets=frozenset({"svc-payments"})).matches(record)
    # A value that names no valid ticket: the key still says whose event it was.
    broken = DeadLetterRecord.from_message(dead_letter(value=b"{", key=b"CM9", status="invalid"), 1 << 20)
    assert broken.ticket_id == "CM9"

    letter = dead_letter(value=value, key=b"svc-payments")
    producer = _Accepts()
    monkeypatch.setattr("worker.tools.dlq.TopicReader", _DeadLetterTopic([letter]))
    monkeypatch.setattr("worker.tools.dlq.EventProducer", producer)
    assert main(["dlq", "replay", "--ticket", "svc-payments", *_replay_kafka()]) == 0
    assert producer.sent == []
    assert main(["dlq", "replay", "--ticket", "CMB", *_replay_kafka()]) == 0
    assert producer.event_ids() == [("in", "e1")]
    assert "ticket=CMB" in capsys.readouterr().out


def _written_without_its_headers(letter: DeadLetter, monkeypatch: pytest.MonkeyPatch) -> Message:
    """The record the dead-letter writer makes of ``letter`` when the input's own headers are too
    large: the broker refuses every record that still carries them."""
    written: list[Message] = []

    async def send(topic: str, *, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
        if any(k.startswith("origin") for k, _ in headers):
            raise MessageSizeTooLargeError()
        written.append(Message(topic, 0, 9, key, value, headers, 0))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def write() -> None:
        publisher = Publisher(load_settings())
        monkeypatch.setattr(publisher._producer, "send", send)
        try:
            await publisher._deliver_dead_letter(letter, TRACEPARENT)
        finally:
            await publisher.stop()

    asyncio.run(write())  # not an async test: ``main`` below runs its own event loop
    [record] = written
    return record


def test_a_dead_letter_written_without_its_producers_headers_is_never_replayed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The writer's third size step keeps key and value but leaves out the input's own headers
    (``coc-dlq-headers-dropped``). Replayed, the event reached the input stripped of its
    producer's headers and nothing said so."""
    value = json.dumps(EVENT).encode()
    headers = [("origin", b"x" * 2_000_000), ("origin-2", b"ci")]
    letter = DeadLetter(b"CM1", value, headers, "rejected", "api_rejected", "d", "in", 2, 40, "e1")
    message = _written_without_its_headers(letter, monkeypatch)
    assert (message.key, message.value, dict(message.headers)["coc-dlq-headers-dropped"]) == (
        b"CM1",
        value,
        b"2",
    )
    record = DeadLetterRecord.from_message(message, 1 << 20)
    assert record.cut == "the dead-letter writer left out its 2 producer header(s) (too large)"
    assert record.as_json()["cut"] == record.cut
    assert _refusal(record, "in", from_any_topic=True) == f"{record.cut}; the whole message is at in/2/40"

    producer = _Accepts()
    monkeypatch.setattr("worker.tools.dlq.TopicReader", _DeadLetterTopic([message]))
    monkeypatch.setattr("worker.tools.dlq.EventProducer", producer)
    assert main(["dlq", "replay", "--all", *_replay_kafka()]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("NOT replayable 0/9 rejected api_rejected ticket=CM1 event=e1: the dead-letter")
    assert producer.sent == []


@pytest.mark.parametrize(
    "flags",
    [
        ["replay", "--from-offset", "0"],
        ["replay", "--to-offset", "5", "--dry-run"],
        ["list", "--from-offset", "1"],
        ["list", "--from-offset", "0", "--to-offset", "1"],
    ],
)
def test_offsets_without_a_partition_are_refused(
    flags: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offsets are one partition's. Without --partition they applied to every partition and
    counted as a selection: `dlq replay --from-offset 0` replayed the whole DLQ without --all."""
    letters = [_letter_from("in", f"o{i}", i) for i in range(3)]
    producer = _Accepts()
    monkeypatch.setattr("worker.tools.dlq.TopicReader", _DeadLetterTopic(letters))
    monkeypatch.setattr("worker.tools.dlq.EventProducer", producer)
    assert main(["dlq", *flags, *_replay_kafka()]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "needs --partition" in err
    assert producer.sent == []
    # with the partition named, the same offsets select
    assert main(["dlq", "replay", "--partition", "0", "--from-offset", "1", *_replay_kafka()]) == 0
    assert producer.event_ids() == [("in", "o1"), ("in", "o2")]
