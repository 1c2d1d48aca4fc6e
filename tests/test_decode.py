"""Decoding a Kafka message value: strict JSON, the contract, and errors that are safe to publish."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import ChangeFailed, ChangeStarted, EventType
from worker.decode import MAX_DEPTH, MAX_KEYS, decode, decode_or_salvage, salvage_identity
from worker.errors import InvalidEvent
from worker.logs import REDACTED, register_secrets

MAX_BYTES = 64 * 1024
TICKET_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
EVENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)


def event(**fields: Any) -> dict[str, Any]:
    return {
        "event_id": "evt-1",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.started",
        **fields,
    }


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def invalid(value: bytes | None, max_bytes: int = MAX_BYTES) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode(value, max_bytes)
    assert str(info.value) == f"{info.value.reason}: {info.value.detail}"
    return info.value


# --- happy path ----------------------------------------------------------------------------------


def test_decodes_a_valid_event() -> None:
    parsed = decode(encode(event(source="argo-cd")), MAX_BYTES)
    assert isinstance(parsed, ChangeStarted)
    assert (parsed.event_id, parsed.ticket_id, parsed.sub_ticket_id) == ("evt-1", "CM1", "S1")
    assert parsed.source == "argo-cd"


def test_a_producer_that_writes_null_for_every_unset_field() -> None:
    """Jackson's default (Go without omitempty): one envelope class for every type, null where a
    field is unset; its change.started was invalid while its change.succeeded passed."""
    envelope = dict.fromkeys(["schema_version", "occurred_at", "source", "result", "ticket_info"])
    started = decode(encode(event(**envelope)), MAX_BYTES)
    assert started == decode(encode(event()), MAX_BYTES)
    update = {
        "event_id": "e1",
        "ticket_id": "CM1",
        "type": "ticket.update",
        "ticket_info": {"phase": "phase_change_end"},
    }
    assert decode(
        encode({**update, "schema_version": None, "sub_ticket_id": None, "result": None}), MAX_BYTES
    ) == (decode(encode(update), MAX_BYTES))


def test_non_ascii_text_survives() -> None:
    raw = encode(event(type="change.failed", result={"comment": "回滚成功 — ok ✓ 😀"}))
    parsed = decode(raw, MAX_BYTES)
    assert isinstance(parsed, ChangeFailed)
    assert parsed.result.comment == "回滚成功 — ok ✓ 😀"


def test_escaped_surrogate_pair_is_one_character() -> None:
    raw = encode(event(type="change.cancelled", result={"comment": "PLACEHOLDER"}))
    raw = raw.replace(b"PLACEHOLDER", rb"\ud83d\ude00")
    assert decode(raw, MAX_BYTES).result.comment == "\U0001f600"


def test_escaped_backslash_u_is_plain_text() -> None:
    raw = encode(event(type="change.cancelled", result={"comment": "PLACEHOLDER"}))
    raw = raw.replace(b"PLACEHOLDER", rb"\\ud800")
    assert decode(raw, MAX_BYTES).result.comment == "\\ud800"


def test_exactly_max_bytes_is_accepted() -> None:
    raw = encode(event())
    padded = raw + b" " * (512 - len(raw))
    assert len(padded) == 512
    assert decode(padded, 512).ticket_id == "CM1"


# --- refusals before the contract ----------------------------------------------------------------


def test_tombstone() -> None:
    assert invalid(None).reason == "empty"


def test_oversized() -> None:
    raw = encode(event())
    err = invalid(raw + b" ", max_bytes=len(raw))
    assert err.reason == "too_large"
    assert str(len(raw) + 1) in err.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",
        b'{"event_id": "\xff"}',
        b'{"ticket_id": "\xc0\xaf"}',  # overlong '/'
        b'{"ticket_id": "\xed\xa0\x80"}',  # a UTF-8 encoded surrogate
        b'{"ticket_id": "\xe2\x82"}',  # truncated sequence
        "{}".encode("utf-16"),
    ],
)
def test_invalid_utf8(raw: bytes) -> None:
    assert invalid(raw).reason == "not_utf8"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"{",
        b'{"a":}',
        b"{} x",
        b"{}{}",
        b"{'type': 'change.started'}",
        b'{"a": 1,}',
        b'{"a": 01}',
        b'{"a": "\x01"}',  # raw control character in a string
        "\ufeff{}".encode(),  # byte-order mark
        b'{"a": undefined}',
    ],
)
def test_bad_json(raw: bytes) -> None:
    assert invalid(raw).reason == "bad_json"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id": "e1", "ticket_id": "CM1", "ticket_id": "CM2", "sub_ticket_id": "S1", "type": "change.started"}',
        b'{"event_id": "e1", "ticket_id": "CM1", "sub_ticket_id": "S1", "type": "change.failed",'
        b' "result": {"comment": "a", "comment": "b"}}',
        b'{"a": [{"x": 1, "x": 1}]}',
    ],
)
def test_duplicate_keys(raw: bytes) -> None:
    err = invalid(raw)
    assert err.reason == "bad_json"
    assert "duplicate key" in err.detail


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity(constant: bytes) -> None:
    raw = (
        b'{"event_id": "e1", "ticket_id": "CM1", "sub_ticket_id": "S1", "type": "change.failed",'
        b' "result": {"rollback_start_time": ' + constant + b"}}"
    )
    err = invalid(raw)
    assert err.reason == "bad_json"
    assert constant.decode() in err.detail
    assert invalid(constant).reason == "bad_json"


def test_huge_exponent_is_not_a_number_we_take() -> None:
    raw = encode(event(type="change.failed", result={"rollback_start_time": 0})).replace(b": 0", b": 1e400")
    assert invalid(raw).reason == "schema"


def test_integer_with_too_many_digits() -> None:
    raw = encode(event(type="change.failed", result={"rollback_start_time": 0})).replace(
        b": 0", b": " + b"9" * 5000
    )
    assert invalid(raw).reason == "bad_json"


@pytest.mark.parametrize(
    "raw", [b"[" * 100_000, b'{"a":' * 100_000, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]
)
def test_deep_nesting(raw: bytes) -> None:
    err = invalid(raw, max_bytes=1 << 20)
    assert err.reason == "bad_json"
    assert "nesting" in err.detail


def test_nesting_just_past_the_limit() -> None:
    deep: Any = "x"
    for _ in range(MAX_DEPTH):
        deep = [deep]
    within = event(type="change.cancelled", result={"comment": "x"}, deep=deep[0])
    assert invalid(encode(within)).reason == "schema"  # nesting is fine, the unknown field is not
    too_deep = event(type="change.cancelled", result={"comment": "x"}, deep=deep)
    err = invalid(encode(too_deep))
    assert err.reason == "bad_json"
    assert f"deeper than {MAX_DEPTH}" in err.detail


@pytest.mark.parametrize("where", ["top", "result"])
def test_objects_wider_than_the_limit(where: str) -> None:
    """A value of ~95,000 unknown keys (under 1 MiB) made pydantic list an error per key, which
    kept the event loop busy ~0.4 s per message: such an object is refused by the parser."""

    def with_keys(count: int) -> bytes:
        extra = {f"k{i}": 0 for i in range(count)}
        if where == "top":
            return encode(event(type="change.cancelled", **extra))
        return encode(event(type="change.cancelled", result={"comment": "x", **extra}))

    assert invalid(with_keys(MAX_KEYS - 10), max_bytes=1 << 20).reason == "schema"  # wide, but within
    err = invalid(with_keys(MAX_KEYS + 1), max_bytes=1 << 20)
    assert err.reason == "bad_json"
    assert f"more than {MAX_KEYS}" in err.detail


@pytest.mark.parametrize("escape", [rb"\ud800", rb"\uDFFF", rb"a\udc00b", rb"\ud83d"])
def test_lone_surrogate_in_comment(escape: bytes) -> None:
    raw = encode(event(type="change.succeeded", result={"comment": "PLACEHOLDER"})).replace(
        b"PLACEHOLDER", escape
    )
    err = invalid(raw)
    assert err.reason == "bad_json"
    assert "surrogate" in err.detail


def test_lone_surrogate_in_a_key() -> None:
    err = invalid(b'{"\\ud800": 1}')
    assert err.reason == "bad_json"


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"[]", "an array"),
        (b"[{}]", "an array"),
        (b'"change.started"', "a string"),
        (b"42", "a number"),
        (b"1.5", "a number"),
        (b"null", "null"),
        (b"true", "a boolean"),
    ],
)
def test_non_object_json(raw: bytes, kind: str) -> None:
    """Named in JSON's words, as the producer tools name them: not NoneType or list."""
    err = invalid(raw)
    assert err.reason == "schema"
    assert err.detail == f"$: expected a JSON object, got {kind}"


# --- contract errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"type": "change.failed", "result": {"comment": "c" * 2001}}, "$.result.comment"),
        ({"type": "change.failed", "result": {"is_monitor_found": "true"}}, "$.result.is_monitor_found"),
        ({"ticket_id": "../../etc/passwd"}, "$.ticket_id"),
        ({"sub_ticket_id": "S1\r\nX-Injected: 1"}, "$.sub_ticket_id"),
        ({"event_id": ""}, "$.event_id"),
        ({"occurred_at": 1750965578}, "$.occurred_at"),
        (
            {"type": "change.cancelled", "result": {"comment": "ok", "is_monitor_found": True}},
            "$.result.is_monitor_found",
        ),
    ],
)
def test_errors_carry_the_json_path(fields: dict[str, Any], path: str) -> None:
    err = invalid(encode(event(**fields)))
    assert err.reason == "schema"
    assert err.detail.startswith(f"{path}: ")


def test_error_path_inside_ticket_info() -> None:
    raw = {
        "event_id": "e1",
        "ticket_id": "CM1",
        "type": "ticket.update",
        "ticket_info": {"phase": "phase_change_x"},
    }
    assert invalid(encode(raw)).detail.startswith("$.ticket_info.phase: ")


def test_unknown_type_names_the_allowed_ones() -> None:
    err = invalid(encode(event(type="change.exploded")))
    assert err.reason == "schema"
    assert err.detail.startswith("$: type must be one of:")
    for kind in EventType:
        assert kind.value in err.detail
    assert "change.exploded" not in err.detail


@pytest.mark.parametrize(
    "fields",
    [
        {"ticket_id": "SECRET-VALUE/../x"},
        {"event_id": "SECRET-VALUE with spaces"},
        {"type": "change.failed", "result": {"comment": "SECRET-VALUE" * 200}},
        {"type": "change.failed", "result": {"change_fail_type": ["SECRET-VALUE"]}},
        {"source": "SECRET-VALUE" * 20},
        {"occurred_at": "SECRET-VALUE"},
        {"type": "SECRET-VALUE"},
        {"extra": "SECRET-VALUE"},
    ],
)
def test_errors_never_echo_the_input_value(fields: dict[str, Any]) -> None:
    err = invalid(encode(event(**fields)))
    assert "SECRET-VALUE" not in str(err)


def test_hostile_keys_are_not_echoed_raw() -> None:
    long_key = "k" * 10_000
    err = invalid(encode(event(**{long_key: 1, "a\r\nX-Injected: 1": 2, "\u202eevil": 3})))
    assert err.reason == "schema"
    assert len(err.detail) < 1000
    assert "\r" not in err.detail
    assert "\n" not in err.detail
    assert "\u202e" not in err.detail
    assert err.detail.count("Extra inputs are not permitted") == 3


def test_many_errors_are_summarised() -> None:
    raw = {"type": "change.failed", "result": {f"unknown_{i}": i for i in range(20)}}
    err = invalid(encode(raw))
    assert err.detail.endswith("more)")
    assert err.detail.count("; ") == 4


# --- properties ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400)
@given(raw=st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_invalid_event(raw: bytes) -> None:
    reason = "ok"
    try:
        decode(raw, 256)
    except InvalidEvent as err:
        reason = err.reason
    assert reason in {"ok", "too_large", "not_utf8", "bad_json", "schema"}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, extra=st.dictionaries(st.text(max_size=16), json_values, max_size=4))
def test_arbitrary_json_only_raises_invalid_event(value: Any, extra: dict[str, Any]) -> None:
    for candidate in (
        value,
        {**event(), **extra},
        event(result=value),
        event(type="change.failed", result=value),
    ):
        reason = "ok"
        try:
            decode(json.dumps(candidate).encode(), MAX_BYTES)
        except InvalidEvent as err:
            reason = err.reason
        assert reason in {"ok", "bad_json", "schema"}


@settings(max_examples=300)
@given(data=st.data())
def test_mutated_valid_events_only_raise_invalid_event(data: st.DataObject) -> None:
    raw = bytearray(encode(event(type="change.failed", result={"comment": "é", "rollback_start_time": 1})))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(InvalidEvent):
        decode(bytes(raw), MAX_BYTES)


# --- salvage_identity ----------------------------------------------------------------------------


def test_salvage_of_an_invalid_event_keeps_the_valid_ids() -> None:
    raw = encode(event(type="change.failed", result={"comment": 1}))
    with pytest.raises(InvalidEvent):
        decode(raw, MAX_BYTES)
    assert salvage_identity(raw, MAX_BYTES) == {
        "event_id": "evt-1",
        "ticket_id": "CM1",
        "sub_ticket_id": "S1",
        "type": "change.failed",
    }


@pytest.mark.parametrize(
    "ticket_id",
    ["../x", "a/b", "a\n", "a\r\nb", "\uff41", "CM\u0430", "%2e%2e", "x" * 65, "", 7, None, ["CM1"]],
)
def test_salvage_drops_a_hostile_ticket_id(ticket_id: Any) -> None:
    found = salvage_identity(encode(event(ticket_id=ticket_id, sub_ticket_id=ticket_id)), MAX_BYTES)
    assert found["ticket_id"] is None
    assert found["sub_ticket_id"] is None
    assert found["event_id"] == "evt-1"


def test_salvage_drops_an_unknown_type_and_bad_event_id() -> None:
    found = salvage_identity(encode(event(type="change.exploded", event_id="a b")), MAX_BYTES)
    assert found == {"event_id": None, "ticket_id": "CM1", "sub_ticket_id": "S1", "type": None}


@pytest.mark.parametrize(
    "raw", [None, b"", b"\xff", b"[1]", b'"CM1"', b'{"ticket_id": "A", "ticket_id": "B"}', b"[" * 10_000]
)
def test_salvage_of_unreadable_messages(raw: bytes | None) -> None:
    assert salvage_identity(raw, MAX_BYTES) == dict.fromkeys(
        ("event_id", "ticket_id", "sub_ticket_id", "type")
    )


def test_salvage_respects_max_bytes() -> None:
    raw = encode(event())
    assert salvage_identity(raw, len(raw) - 1)["ticket_id"] is None


@settings(max_examples=300)
@given(
    ticket_id=st.one_of(st.text(max_size=70), st.from_regex(TICKET_ID, fullmatch=True), json_values),
    event_id=st.one_of(st.text(max_size=130), json_values),
    kind=st.one_of(st.text(max_size=20), st.sampled_from([t.value for t in EventType])),
)
def test_salvage_never_returns_a_hostile_id(ticket_id: Any, event_id: Any, kind: str) -> None:
    raw = encode({"ticket_id": ticket_id, "sub_ticket_id": ticket_id, "event_id": event_id, "type": kind})
    found = salvage_identity(raw, MAX_BYTES)
    for name in ("ticket_id", "sub_ticket_id"):
        assert found[name] is None or (found[name] == ticket_id and TICKET_ID.fullmatch(found[name]))
    assert found["event_id"] is None or (
        found["event_id"] == event_id and EVENT_ID.fullmatch(found["event_id"])
    )
    assert found["type"] is None or found["type"] in {t.value for t in EventType}


@settings(max_examples=300)
@given(raw=st.binary(max_size=256))
def test_salvage_of_arbitrary_bytes(raw: bytes) -> None:
    found = salvage_identity(raw, MAX_BYTES)
    assert set(found) == {"event_id", "ticket_id", "sub_ticket_id", "type"}
    assert found["ticket_id"] is None or TICKET_ID.fullmatch(found["ticket_id"])


@pytest.mark.parametrize(
    "raw",
    [
        encode(event()),
        encode(event(type="change.failed", result={"comment": 1})),
        encode(event(ticket_id="../x")),
        b"{not json",
        None,
        b"[1, 2]",
    ],
)
def test_decode_or_salvage_is_decode_and_salvage_from_one_parse(raw: bytes | None) -> None:
    """The dispatcher's one call: the event, or why not and what the value still names (it parsed
    an invalid message twice, once to decode it and once to salvage its identity)."""
    event_, why, found = decode_or_salvage(raw, MAX_BYTES)
    if event_ is not None:
        assert (event_, why, found) == (decode(raw, MAX_BYTES), None, None)
        return
    refused = invalid(raw)
    assert why is not None
    assert (why.reason, why.detail) == (refused.reason, refused.detail)
    assert found == salvage_identity(raw, MAX_BYTES)


@pytest.mark.parametrize(
    ("raw", "key", "ticket"),
    [
        (b'{"event_id": "bad-1", "ticket_id": "T4"', b"T4", "T4"),  # broken JSON: the key tells
        (b"x" * (MAX_BYTES + 1), b"T4", "T4"),  # too large
        (json.dumps({"event_id": "e", "ticket_id": "T7/../x"}).encode(), b"T7", "T7"),  # hostile id
        (
            json.dumps({"event_id": "e", "ticket_id": "T8", "type": "nope"}).encode(),
            b"T9",
            "T8",
        ),  # value first
        (b"not json", b"T/../x", None),  # a hostile key is no ticket either
        (b"not json", b"\xff\xfe", None),
        (b"not json", None, None),
    ],
)
def test_an_invalid_message_names_the_ticket_of_its_key_when_its_value_names_none(
    raw: bytes, key: bytes | None, ticket: str | None
) -> None:
    """Inputs are keyed by ticket_id: a broken event keyed T4 had a keyless outcome with
    ticket_id null, so T4's consumers never learnt its event was refused (``dlq list`` showed T4)."""
    event_, why, found = decode_or_salvage(raw, MAX_BYTES, key=key)
    assert event_ is None
    assert why is not None
    assert found is not None
    assert found["ticket_id"] == ticket


_BASE = {"event_id": "e1", "ticket_id": "CM1", "sub_ticket_id": "s1"}


@pytest.mark.parametrize(
    ("event", "said"),
    [
        (
            {**_BASE, "type": "change.failed", "result": {"rollback_start_time": 1_764_300_000}},
            "$.result.rollback_start_time: Input should be greater than or equal to 946684800000 (epoch"
            " milliseconds from 2000-01-01: a time in seconds is 1,000 times smaller)",
        ),
        (
            {**_BASE, "type": "change.started", "result": {"comment": "x"}},
            "$.result: change.started takes no result (only change.succeeded, change.failed,"
            " change.cancelled take it)",
        ),
        (
            {**_BASE, "type": "change.succeeded", "result": {"is_monitor_found": True}},
            "$.result.is_monitor_found: change.succeeded takes no is_monitor_found (only change.failed takes it)",
        ),
        (
            {**_BASE, "type": "change.failed", "ticket_info": {"phase": "phase_change_x"}},
            "$.ticket_info: change.failed takes no ticket_info (only ticket.update takes it)",
        ),
        ({**_BASE, "type": "change.succeeded", "result": "x"}, "$.result: Input should be a JSON object"),
        # null is a left-out key only where the type takes no such key; here it takes one
        (
            {**_BASE, "type": "change.ended", "sub_ticket_id": None},
            "$.sub_ticket_id: Value error, every change.* type requires a sub-ticket id, not null (null"
            " stands for a left-out key only where the type takes no such key)",
        ),
        (
            {"event_id": "e1", "ticket_id": "CM1", "type": "ticket.update", "ticket_info": None},
            "$.ticket_info: Value error, ticket.update requires a ticket_info object, not null (null"
            " stands for a left-out key only where the type takes no such key)",
        ),
        # a value, not null, of another type's key: still refused, in the same words as before
        (
            {**_BASE, "type": "change.started", "result": {}, "ticket_info": None},
            "$.result: change.started takes no result (only change.succeeded, change.failed,"
            " change.cancelled take it)",
        ),
        (
            {
                "event_id": "e1",
                "ticket_id": "CM1",
                "type": "ticket.update",
                "sub_ticket_id": "s1",
                "result": None,
                "ticket_info": {"work_flow_status": "done"},
            },
            "$.sub_ticket_id: ticket.update takes no sub_ticket_id (only change.started, change.ended,"
            " change.succeeded, change.failed, change.cancelled take it)",
        ),
        (
            {**_BASE, "type": "change.started", "occurred_at": "2025-06-26T19:19:38+0800"},
            "$.occurred_at: Value error, the offset needs a colon: ±hh:mm (+08:00, not +0800), or Z",
        ),
        (
            {**_BASE, "type": "change.started", "occurred_at": "2016-12-31T23:59:60Z"},
            "$.occurred_at: Value error, second 60 (a leap second) is refused by this worker: second must"
            " be 00-59",
        ),
        # a key no type takes: pydantic's own words
        (
            {**_BASE, "type": "change.failed", "result": {"bogus": 1}},
            "$.result.bogus: Extra inputs are not permitted",
        ),
    ],
)
def test_an_invalid_events_error_says_how_to_put_it_right(event: dict[str, Any], said: str) -> None:
    """ "Extra inputs are not permitted" for a field of another type's event, a bare minimum for a
    time in seconds, a Python class name: the producer learned what was wrong, not what to send."""
    with pytest.raises(InvalidEvent) as refused:
        decode(json.dumps(event).encode(), 1 << 20)
    assert str(refused.value) == f"schema: {said}"


def test_a_number_too_long_for_python_says_so_in_the_producers_words() -> None:
    """Python's error told the producer to call sys.set_int_max_str_digits()."""
    with pytest.raises(InvalidEvent) as refused:
        decode(b'{"event_id": ' + b"1" * 5000 + b"}", 1 << 20)
    assert str(refused.value) == "bad_json: a number of thousands of digits: no field takes one"


_KEY_SECRET = "Zq9vR2mXk7LpT4wYb8NcD3fHj6GsA1eQ0uVi5oPn"  # 40 characters, as a secret key


@pytest.mark.parametrize(
    "value",
    [
        # an unknown key quoting a secret: the path shows the key cut to 32 characters
        '{"event_id": "e1", "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": "s1", '
        f'"sk={_KEY_SECRET}": 1}}',
        # a duplicate key quoting one: the error shows the key cut to 64 characters
        f'{{"{"k" * 30}{_KEY_SECRET}": 1, "{"k" * 30}{_KEY_SECRET}": 2}}',
    ],
    ids=["unknown_key", "duplicate_key"],
)
def test_a_secret_in_a_refused_key_is_redacted_before_the_key_is_cut(value: str) -> None:
    """The key was cut first and redacted later (the outcome, the dead letter, the log line): a
    secret across the cut matched nothing there, and up to 34 of its 40 characters went out."""
    register_secrets([_KEY_SECRET])
    with pytest.raises(InvalidEvent) as caught:
        decode(value.encode(), 1 << 20)
    detail = caught.value.detail
    assert REDACTED in detail
    assert not any(_KEY_SECRET[i : i + 8] in detail for i in range(len(_KEY_SECRET) - 7)), detail
