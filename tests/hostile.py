"""A deterministic corpus of hostile messages: every one must end as an `invalid` outcome + DLQ."""

from __future__ import annotations

import json
import random
from typing import Any

from worker.decode import decode
from worker.errors import InvalidEvent

#: ticket_id values that try to escape the URL path or smuggle something into a request.
INJECTIONS = [
    "../etc/passwd",
    "..%2f..%2fadmin",
    "%2e%2e",
    "%2E%2E%2F",
    "CM1/../../v2",
    "CM1?x=1",
    "CM1#frag",
    "CM1\r\nX-Injected: 1",
    "CM1\nX: y",
    "CM1\x00",
    "CM1 ",
    " CM1",
    "CM1\t",
    "\uff23\uff2d\uff11",  # fullwidth look-alikes of CM1
    "\u0421\u041c1",  # Cyrillic Es and Em: looks like CM1
    "CM1\u200b",  # zero-width space
    "CM1\u202e",  # right-to-left override
    "CM1%00",
    "CM1;rm -rf",
    "CM1'--",
    "<script>",
    "${jndi:ldap://x}",
    "",
    "A" * 65,
    "CM1\\..\\x",
    "CM1/",
    "/CM1",
    ".",
    "..",
    "CM1\u00a0",
]


def _base(kind: str = "change.started") -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": "hostile-1",
        "type": kind,
        "ticket_id": "CM1",
        "sub_ticket_id": "s-1",
    }
    return event


def _structural(rng: random.Random, max_bytes: int) -> list[tuple[str, bytes | None]]:
    deep = b"[" * 50_000 + b"]" * 50_000
    nested_obj = json.dumps(_base() | {"source": None}).encode()
    for _ in range(20):
        nested_obj = b'{"x": ' + nested_obj + b"}"
    return [
        ("tombstone", None),
        ("empty", b""),
        ("whitespace", b"   \n"),
        ("invalid utf-8", b'{"event_id": "\xff\xfe"}'),
        ("utf-16", json.dumps(_base()).encode("utf-16")),
        ("latin-1", json.dumps(_base() | {"source": "caf\xe9"}, ensure_ascii=False).encode("latin-1")),
        ("deep arrays", deep),
        ("deep objects", nested_obj),
        (
            "NaN",
            b'{"event_id": "e", "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": "s", "x": NaN}',
        ),
        ("Infinity", json.dumps(_base()).encode()[:-1] + b', "result": {"rollback_start_time": Infinity}}'),
        ("-Infinity", b'{"schema_version": -Infinity}'),
        (
            "duplicate key",
            b'{"event_id": "a", "event_id": "b", "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": "s"}',
        ),
        (
            "duplicate nested key",
            json.dumps(_base("change.succeeded")).encode()[:-1]
            + b', "result": {"comment": "a", "comment": "b"}}',
        ),
        ("huge string", json.dumps(_base() | {"source": "x" * 500_000}).encode()),
        ("huge array", json.dumps(_base() | {"extra": list(range(100_000))}).encode()),
        ("oversized", b'{"event_id": "' + b"a" * (max_bytes + 10) + b'"}'),
        (
            "lone surrogate",
            json.dumps(_base("change.succeeded")).encode()[:-1] + b', "result": {"comment": "\\ud800"}}',
        ),
        ("not an object: list", b"[1, 2, 3]"),
        ("not an object: string", b'"change.started"'),
        ("not an object: number", b"42"),
        ("not an object: null", b"null"),
        ("trailing garbage", json.dumps(_base()).encode() + b" trailing"),
        ("truncated", json.dumps(_base()).encode()[:-5]),
        ("random bytes", bytes(rng.getrandbits(8) for _ in range(200))),
    ]


def _field_attacks(rng: random.Random) -> list[tuple[str, bytes | None]]:
    out: list[tuple[str, bytes | None]] = []
    for value in INJECTIONS:
        out.append((f"ticket_id={value!r}", json.dumps(_base() | {"ticket_id": value}).encode()))
        out.append((f"sub_ticket_id={value!r}", json.dumps(_base() | {"sub_ticket_id": value}).encode()))
        out.append(("event_id=" + repr(value), json.dumps(_base() | {"event_id": value + "/"}).encode()))
    wrong_types: list[tuple[str, Any]] = [
        ("ticket_id", 123),
        ("ticket_id", None),
        ("ticket_id", ["CM1"]),
        ("ticket_id", {"id": "CM1"}),
        ("event_id", 1.5),
        ("type", 1),
        ("type", "change.STARTED"),
        ("type", "change.started "),
        ("schema_version", 2),
        ("schema_version", "1"),
        ("schema_version", True),
        ("schema_version", 1.0),
        ("occurred_at", 1764300000),
        ("occurred_at", "2025-11-28"),
        ("occurred_at", "2025-11-28T10:00:00"),
        ("occurred_at", "yesterday"),
        ("source", "s" * 129),
        ("unknown_field", "x"),
        ("result", {"comment": "x"}),  # result on change.started
        ("ticket_info", {"phase": "phase_change_close"}),  # ticket_info on change.started
    ]
    for name, value in wrong_types:
        out.append((f"{name}={value!r}", json.dumps(_base() | {name: value}).encode()))
    results: list[dict[str, Any]] = [
        {"comment": "c" * 2001},
        {"is_monitor_found": "true"},
        {"is_monitor_found": 1},
        {"rollback_start_time": 1_750_000_000_010, "rollback_end_time": 1_750_000_000_005},
        {"rollback_start_time": -1},
        {"rollback_start_time": 2**63},
        {"rollback_start_time": "1764300000000"},
        {"change_fail_type": None, "unknown": 1},
        {"verified_docs": ["a"]},
    ]
    for result in results:
        out.append(
            (
                f"failed result {result!r}"[:80],
                json.dumps(_base("change.failed") | {"result": result}).encode(),
            )
        )
    out.append(
        (
            "succeeded with failure fields",
            json.dumps(_base("change.succeeded") | {"result": {"is_monitor_found": True}}).encode(),
        )
    )
    out.append(
        (
            "cancelled with rollback",
            json.dumps(_base("change.cancelled") | {"result": {"rollback_start_time": 1}}).encode(),
        )
    )
    for info in (
        {},
        {"phase": "phase_change_closed"},
        {"phase": "PHASE_CHANGE_CLOSE"},
        {"work_flow_status": "w" * 300},
        {"x": 1},
    ):
        event = {"event_id": "t", "type": "ticket.update", "ticket_id": "CM1", "ticket_info": info}
        out.append((f"ticket_info={info!r}"[:80], json.dumps(event).encode()))
    missing = {"event_id": "m", "type": "change.ended", "ticket_id": "CM1"}
    out.append(("change.* without sub_ticket_id", json.dumps(missing).encode()))
    out.append(
        (
            "ticket.update without ticket_info",
            json.dumps({"event_id": "m", "type": "ticket.update", "ticket_id": "CM1"}).encode(),
        )
    )
    return out


def _mutations(rng: random.Random, count: int) -> list[tuple[str, bytes | None]]:
    """Random corruptions of a valid event: flipped bytes, cut ends, spliced junk."""
    valid = json.dumps(
        _base("change.failed") | {"result": {"comment": "ok", "is_monitor_found": True}}
    ).encode()
    out: list[tuple[str, bytes | None]] = []
    while len(out) < count:
        data = bytearray(valid)
        how = rng.randrange(4)
        if how == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
        elif how == 1:
            del data[rng.randrange(1, len(data)) :]
        elif how == 2:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        else:
            at = rng.randrange(len(data))
            data[at:at] = rng.choice([b"\x00", b"\\u0000", b'"', b"{", b"}", b",", b"\r\n"])
        blob = bytes(data)
        try:
            decode(blob, 1 << 20)
        except InvalidEvent:
            out.append((f"mutation {len(out)}", blob))
    return out


def hostile_corpus(
    count: int = 1000, max_bytes: int = 1 << 20, seed: int = 2026
) -> list[tuple[str, bytes | None]]:
    """At least ``count`` labelled messages, none of which is a valid event."""
    rng = random.Random(seed)
    corpus = _structural(rng, max_bytes) + _field_attacks(rng)
    corpus += _mutations(rng, max(0, count - len(corpus)))
    return corpus
