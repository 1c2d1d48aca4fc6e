"""The records every dedup backend stores and the one rule all of them follow (``decide``).

In a module of their own so that every backend reads a record the same way, importing this and
nothing of the other backends or of the package (no import cycle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from pydantic_core import to_json


class ClaimKind(StrEnum):
    NEW = "new"  # the caller now holds the claim and may call the API
    HELD = "held"  # another live owner holds it: wait, then ask again
    APPLIED = "applied"  # already applied; the outcome may not have been published
    DONE = "done"  # finished; its outcome and dead letter published, or owed to a redelivery


#: How long a claim record outlives its lease at least (so a taker learns it took over a dead
#: owner's claim); ``open_store`` keeps it as long as an applied record (``dedup_ttl_s``) when that
#: is longer: a message read again days after its worker crashed mid-send must still find the
#: claim, or it is sent again without a look at the ticket (the first send may have landed).
CLAIM_RECORD_KEEP_S = 24 * 3600.0
#: Written by the stores' probes; '@' never occurs in an event_id (nor "@probe" in a message's
#: position key, ``@topic/partition/offset``: an outcome decided without the API, or a refusal
#: or failure, kept by position too).
PROBE_KEY = "@probe"
PROBE_OWNER = "coc-worker-probe"
#: The Redis store's creation time (``RedisStore``), under its prefix as the rate limit's
#: ``@ratelimit:<group>`` is: '@' never occurs in an event_id, and a message's position key
#: (``@topic/partition/offset``) always holds a '/'.
EPOCH_KEY = "@epoch"


@dataclass(frozen=True, slots=True)
class DedupRecord:
    state: str  # "claimed" | "applied" | "done"
    owner: str = ""
    source: str = ""  # "topic/partition/offset" of the message that produced it
    status: str = ""  # outcome status, for "applied" and "done"
    attempts: int = 0
    http_status: int | None = None
    lease_until: float = 0.0  # epoch seconds, for "claimed"
    reason: str = ""  # outcome reason, for "applied" and "done"
    #: What a redelivery needs to repeat a dead letter, for "done" (redacted, cut short)
    error_code: str | None = None
    detail: str = ""
    #: What the event changes (``Pipeline``'s ``event_target``), for "applied" and "done": another
    #: message with this event_id but another target reused the id, it is not a duplicate
    target: str = ""
    #: Which claim of its owner this is, for "claimed" (``Pipeline``: one per claim it asks for):
    #: a release or renewal of an earlier claim, late, must not act on a later one of the owner
    token: str = ""
    #: What a claim replaced (``claim_keeps``), for "claimed": the same ask made again, its first
    #: answer lost (a Redis call that timed out after it ran), is answered as the first was
    #: (``decide``); and the pipeline sees through a claim of its own message left unfinished to the
    #: record before it. Never itself more than one claim deep.
    replaced: DedupRecord | None = None

    def of_another_change(self, target: str) -> bool:
        """Whether this record is of another change than ``target``: the event_id was reused.
        A record without a target (an earlier release's) cannot tell."""
        return bool(target and self.target and self.target != target)

    def is_claim_of(self, owner: str, token: str) -> bool:
        """Whether this is the claim ``owner`` made with ``token``: what a renewal or a release acts
        on. An empty token matches only a record without one (an earlier release's claim, the
        probe's): matching any claim of its owner, it would reach that owner's later claims."""
        return self.state == "claimed" and self.owner == owner and self.token == token

    def encode(self) -> str:
        return to_json(self._data()).decode()

    def _data(self) -> dict[str, Any]:
        # Not dataclasses.asdict (it deep-copies every value) nor the json module (3x slower):
        # both are measurable at three writes per event. The dead-letter fields, the target, the
        # token and the record replaced are written only when set, and decode leaves out keys it
        # does not know: a release reads the records of a later one (a rolling update, a rollback).
        data = {name: getattr(self, name) for name in _BASE_FIELDS}
        if self.error_code is not None:
            data["error_code"] = self.error_code
        if self.detail:
            data["detail"] = self.detail
        if self.target:
            data["target"] = self.target
        if self.token:
            data["token"] = self.token
        if self.replaced is not None:
            data["replaced"] = self.replaced._data()
        return data

    @classmethod
    def decode(cls, text: str | bytes) -> DedupRecord:
        """Keys this release does not know (a later one's) are left out, not an error. A record
        that cannot be read is ``UNREADABLE`` (``_from_data``), not an error either."""
        try:
            return _from_data(json.loads(text))
        except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
            return UNREADABLE


#: What every backend makes of a record it cannot read: an expired claim of no one, taken over as
#: such (the ticket is read before the change is sent: whatever the record was, the event may have
#: been sent), and written over by a done-record; never renewed nor released. The Redis scripts
#: read a record the same way (``redis._RECORD_LUA``): they and ``decide`` must agree on every
#: record, or Redis' answer would not be the claim it wrote.
UNREADABLE = DedupRecord("claimed")

_BASE_FIELDS = tuple(
    f.name
    for f in fields(DedupRecord)
    if f.name not in ("error_code", "detail", "target", "token", "replaced")
)
#: Each field's JSON type (``bool`` is no number here, as in Lua).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "state": str,
    "owner": str,
    "source": str,
    "status": str,
    "attempts": int,
    "http_status": int,
    "lease_until": (int, float),
    "reason": str,
    "error_code": str,
    "detail": str,
    "target": str,
    "token": str,
}
#: The fields the rule compares (``decide``, ``done_may_replace``, the scripts): one of another type
#: makes the record unreadable. Any other field of another type is left at its default (a lease
#: that is no number is 0: expired, as the scripts' ``tonumber(x) or 0``).
_RULE_FIELDS = frozenset({"state", "owner", "source", "status", "target", "token"})
_STATES = frozenset({"claimed", "applied", "done"})


def _from_data(data: object) -> DedupRecord:
    """The record of a decoded JSON value: ``UNREADABLE`` unless it is an object with a known
    state whose rule fields (``_RULE_FIELDS``) are strings where present."""
    if not isinstance(data, dict):
        return UNREADABLE
    values: dict[str, Any] = {}
    for name, value in data.items():
        kind = _FIELD_TYPES.get(name)
        if kind is None:
            if name == "replaced" and isinstance(value, dict):
                values[name] = _from_data(value)
            continue  # a later release's key, or a replaced record that is none
        if isinstance(value, kind) and not isinstance(value, bool):
            values[name] = value
        elif name in _RULE_FIELDS:
            return UNREADABLE
    if values.get("state") not in _STATES:
        return UNREADABLE
    return DedupRecord(**values)


def done_may_replace(current: DedupRecord | None, owner: str, token: str, now: float) -> bool:
    """Whether a done-record written by ``owner`` for its claim ``token`` may replace ``current``:
    the one rule of every backend's ``mark_done`` (the Redis script mirrors it).

    Never over an ``applied`` record: a worker whose claim ran out while its gate was closed (an
    outage longer than the lease) may finish late, after another worker took the event over and
    applied it; its done-record then turned the event back into a failure, and a later copy of the
    event was no duplicate. Nor over a live claim of another (another owner's, or another claim of
    the owner's, ``DedupRecord.is_claim_of``): that stale owner erased the claim of the worker that
    took the event over and may be sending it, and the event's next message was claimed as new
    while it was. Over anything else: no record, its own claim (expired or not), an expired claim,
    a done-record, one that cannot be read. ``owner`` "": a writer without a claim (a record kept
    by position), which replaces no live claim."""
    if current is None:
        return True
    if current.state == "applied":
        return False
    return current.state != "claimed" or current.is_claim_of(owner, token) or current.lease_until <= now


@dataclass(frozen=True, slots=True)
class Claim:
    kind: ClaimKind
    record: DedupRecord | None = None
    taken_over: bool = False  # NEW over an unfinished claim: another owner's expired one, or our own
    #: NEW over no record in a store younger than its window (Redis' ``dedup_forgotten_window_s``):
    #: such a store cannot tell an event never seen from one it forgot (a Redis without persistence
    #: that restarted empty lost every claim and applied record; the event may be a redelivery of
    #: one applied before). The ticket is read before the first send; unlike ``maybe_sent``, no
    #: answer of ours is known lost, so a refusal after that read is an ordinary one.
    store_young: bool = False

    @property
    def maybe_sent(self) -> bool:
        """Whether an earlier attempt may have reached the API without its answer being recorded:
        an unfinished claim, or an earlier message of this event that failed (its last answer may
        have been lost). The change is then checked against the ticket before it is sent."""
        return self.taken_over or (self.record is not None and self.record.status == "failed")


def decide(
    record: DedupRecord | None, owner: str, source: str, now: float, target: str = "", token: str = ""
) -> Claim:
    """What an existing record means for a new claim (``NEW``: the caller takes the claim).

    The one rule shared by every backend (the Redis script mirrors it). ``target``: what the
    claiming message's event changes; a rejected or failed event is retried by another message
    only for the same change (records without a target, an earlier release's, cannot tell).
    ``token``: the claim's; the claim ``owner`` made with it (``first_record``) is the same ask
    again, answered as the first was.
    """
    record = first_record(record, owner, token)
    if record is None:
        return Claim(ClaimKind.NEW)
    if record.of_another_change(target):
        # This message reuses the id: whatever the first change's state, it neither sends nor
        # takes the record over (an unfinished claim's change may have been sent; the first
        # message's redelivery takes it over and reads its own ticket).
        return Claim(ClaimKind.APPLIED if record.state == "applied" else ClaimKind.DONE, record)
    if record.state == "claimed":
        if record.owner == owner:  # a job of ours that did not finish: it may have sent the change
            return Claim(ClaimKind.NEW, record, taken_over=True)
        if record.lease_until > now:
            return Claim(ClaimKind.HELD, record)
        return Claim(ClaimKind.NEW, record, taken_over=True)
    if record.state == "applied":
        return Claim(ClaimKind.APPLIED, record)
    if record.status != "applied" and record.source != source:
        return Claim(ClaimKind.NEW, record)  # rejected/failed before: another message may retry
    return Claim(ClaimKind.DONE, record)


def first_record(record: DedupRecord | None, owner: str, token: str) -> DedupRecord | None:
    """The record a claim by ``owner`` with ``token`` replaced, given the record it found: that
    one, unless it is that very claim (a token names one ask: ``Pipeline`` asks again with the same
    token only when the answer did not come), whose ``replaced`` is then. The first answer, lost
    (a Redis call timed out after it ran), took over another's claim or replaced a failed message's
    record; answered "our own claim", the ask again hid it: the pipeline's check for a message read
    again after its event was retried was skipped, and the message was sent again. An empty token
    names no ask (the probe's, an earlier release's claims): such a claim is taken over."""
    if token and record is not None and record.is_claim_of(owner, token):
        return record.replaced
    return record


def claim_keeps(found: DedupRecord | None, owner: str, token: str) -> DedupRecord | None:
    """What a claim by ``owner`` with ``token`` keeps (``DedupRecord.replaced``) of the record it
    replaces, ``found``: what the first ask kept, when ``found`` is its claim (``first_record``);
    else ``found``, with only the last record before a chain of claims (a claim taken over from a
    claim that had taken one over): a claim holds at most one claim, and that one no claim."""
    kept = first_record(found, owner, token)
    if kept is not found or found is None:
        return kept
    inner = found.replaced
    if inner is None:
        return found
    if found.state != "claimed":
        return replace(found, replaced=None)
    return replace(found, replaced=inner.replaced) if inner.state == "claimed" else found


def claim_over(
    found: DedupRecord | None,
    owner: str,
    source: str,
    now: float,
    lease_s: float,
    target: str = "",
    token: str = "",
) -> tuple[Claim, DedupRecord | None]:
    """A claim over ``found``, the record there: the answer (``decide``) and, when it is ``NEW``,
    the claim to write in its place (keeping what ``claim_keeps`` says). The backends that run the
    rule in Python (memory, sqlite) call this; Redis' script mirrors it."""
    answer = decide(found, owner, source, now, target, token)
    if answer.kind is not ClaimKind.NEW:
        return answer, None
    return answer, claimed(owner, source, now, lease_s, target, token, claim_keeps(found, owner, token))


def claimed(
    owner: str,
    source: str,
    now: float,
    lease_s: float,
    target: str = "",
    token: str = "",
    replaced: DedupRecord | None = None,
) -> DedupRecord:
    """A claim, with the change it is for (another change under the same id is a reuse), the
    token its owner gave it and what it replaced (``claim_keeps``)."""
    return DedupRecord(
        "claimed", owner, source, lease_until=now + lease_s, target=target, token=token, replaced=replaced
    )


def renewed(
    record: DedupRecord | None, owner: str, token: str, now: float, lease_s: float
) -> DedupRecord | None:
    """``record`` with its lease renewed for ``lease_s`` from ``now`` when it is the claim ``owner``
    made with ``token`` (``DedupRecord.is_claim_of``); None when there is no such claim to renew.
    The rule of every backend's ``extend`` (the Redis script mirrors it)."""
    if record is None or not record.is_claim_of(owner, token):
        return None
    return replace(record, lease_until=now + lease_s)
