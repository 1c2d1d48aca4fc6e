"""W3C trace context: carry the producer's ``traceparent`` to the API call and the outcome.

No tracing SDK is needed to *propagate*: a valid incoming ``traceparent`` keeps its trace id and
gets a new span id per hop; an absent or malformed one starts a fresh trace.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

HEADER = "traceparent"
_random = random.Random()
#: A later version may append fields ("-..."), which a version-00 parser reads past (W3C).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        return _traceparent(self.trace_id, self.span_id, self.flags)

    def child_traceparent(self) -> str:
        """The ``traceparent`` of a child span: the same trace, a new span id, one per outgoing hop
        (API call, outcome record). Only its header is needed, so no child is built."""
        return _traceparent(self.trace_id, _span_id(), self.flags)


def _traceparent(trace_id: str, span_id: str, flags: str) -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def _span_id() -> str:
    # Ids must be unique and random, not secret (W3C trace context): the PRNG is enough, and a
    # syscall per id (secrets) is measurable at thousands of messages per second.
    return f"{_random.getrandbits(64) or 1:016x}"


def new_trace() -> TraceContext:
    return TraceContext(f"{_random.getrandbits(128) or 1:032x}", _span_id())


def parse(value: str | bytes | None) -> TraceContext | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    if rest is not None:
        if version == "00":  # version 00 has exactly four fields
            return None
        flags = f"{int(flags, 16) & 0x01:02x}"  # of a later version's flags, only "sampled" is known
    return TraceContext(trace_id, span_id, flags)


def from_headers(
    headers: Sequence[tuple[str, bytes]] | None, position: tuple[str, int, int, int] | None = None
) -> TraceContext:
    """The trace of an input message: its ``traceparent`` header, else a new trace. With the
    message's ``position`` (topic, partition, offset, timestamp), that new trace's id is derived
    from it: a message read again (a crash before the commit) keeps its trace id, and its repeated
    outcome and dead letter join the first ones' trace."""
    for key, value in headers or ():
        if key.lower() == HEADER:
            found = parse(value)
            if found is not None:
                return found
    if position is None:
        return new_trace()
    topic, partition, offset, timestamp_ms = position  # the timestamp tells a recreated topic's apart
    trace_id = hashlib.blake2b(
        f"{topic}/{partition}/{offset}/{timestamp_ms}".encode(), digest_size=16
    ).hexdigest()
    return TraceContext(trace_id if trace_id != "0" * 32 else "1".zfill(32), _span_id())
