"""W3C ``traceparent``: what is taken from an input, what is refused."""

from __future__ import annotations

import re

import pytest

from worker.tracing import TraceContext, from_headers, parse

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE}-{SPAN}-01",
        f"01-{TRACE}-{SPAN}-01",
        f"01-{TRACE}-{SPAN}-01-what-a-later-version-adds",  # before: refused, the trace broken
        f"cc-{TRACE}-{SPAN}-03-x",
    ],
)
def test_this_and_later_versions_are_continued(value: str) -> None:
    found = parse(value)
    assert found is not None
    assert (found.trace_id, found.span_id) == (TRACE, SPAN)
    assert found.flags == "01"  # of a later version's flags, only "sampled" is known


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has four fields
        f"ff-{TRACE}-{SPAN}-01",
        f"00-{'0' * 32}-{SPAN}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}",
    ],
)
def test_what_the_standard_refuses_starts_a_new_trace(value: str) -> None:
    assert parse(value) is None


def test_a_childs_traceparent_keeps_the_trace_and_takes_a_new_span() -> None:
    parent = TraceContext(TRACE, SPAN, "00")
    values = {parent.child_traceparent() for _ in range(100)}
    assert len(values) == 100
    for value in values:
        child = parse(value)
        assert child is not None
        assert value == f"00-{TRACE}-{child.span_id}-00"
        assert child.span_id != SPAN


def test_a_message_without_a_traceparent_keeps_its_trace_id_when_read_again() -> None:
    """A new random trace per read: a message read again after a crash got a second trace id, and
    a consumer joining outcomes (and dead letters) by trace id saw two traces for one message."""
    position = ("in", 3, 41, 1_764_000_000_000)
    first, again = from_headers([], position), from_headers([("other", b"x")], position)
    assert first.trace_id == again.trace_id
    assert first.span_id != again.span_id  # each read is its own hop
    assert re.fullmatch(r"[0-9a-f]{32}", first.trace_id)
    assert from_headers([], ("in", 3, 42, 1_764_000_000_000)).trace_id != first.trace_id
    assert from_headers([], ("in", 3, 41, 1_764_000_000_001)).trace_id != first.trace_id  # recreated
    assert from_headers([], None).trace_id != from_headers([], None).trace_id
