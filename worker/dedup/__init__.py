"""Deduplication by ``event_id``: a claim before the API call, a record of what was applied after.

Each event id moves through three states in the store::

    (absent) --claim--> claimed(owner, lease) --API success-------------------> applied (TTL, 7 days)
                           |   |
                           |   +--not applied (rejected, failed), before its outcome--> done (TTL, 7 days)
                           |  lease expires / release
                           v
                        (absent)

* ``claimed`` is a lease: two workers racing on one event (after a rebalance) cannot both call
  the API; a crashed owner's claim expires after ``lease_s`` and may then be *taken over*. The
  taker is told (``Claim.taken_over``): the dead owner may have reached the API, so the change
  is checked against the ticket before it is sent again. The same holds for a worker's own
  unfinished claim (a job cancelled mid-call by a revocation past its grace, the partition
  assigned back): its owner, the same process, may claim it again at once, as a takeover. A
  restarted worker is another owner (``Pipeline``'s claimant carries a per-process nonce) and
  takes it over once the lease has run out or been handed on. A claim carries its owner's token
  for it: a renewal or release acts only on that one claim, not on a later claim of the same
  owner (``DedupStore``).
* ``applied`` is written right after the API accepted the change, *before* the outcome is
  published, and is the event's last record: a redelivery, whether the crash came before the
  outcome was published or after, republishes ``applied`` without calling the API again.
* ``done`` remembers an outcome that is not ``applied`` (invalid, rejected, failed), the message
  it came from and its dead letter's detail, *before* the outcome and the dead letter are
  published: a redelivery repeats both, never calling the API again.
* Both keep the outcome's status and reason for the TTL. The same message read again (a crash
  before the commit) gets the same outcome again, marked ``redelivered``. Another message with
  the same ``event_id`` and the same change (the records' ``target``) is a duplicate when the
  event was applied; when it was rejected or failed, it may try again (a fixed ticket, a replay
  from the DLQ). One for another change reused the id: the claim answers ``DONE`` and the
  pipeline refuses it (records of an earlier release, without a target, cannot tell). A claim
  keeps its target too: a message for another change that meets an unfinished claim is refused
  the same way, and never takes the claim over, which the first message's redelivery does.
* A done-record is written over the writer's own claim (its owner and token), an expired claim,
  another done-record or nothing, never over an applied record or another worker's live claim
  (``records.done_may_replace``): a worker whose lease ran out meanwhile (a pause) erased the
  claim of the worker that took the event over, and the event's next message was claimed as new
  while the other may have been sending.
* A claim keeps what it replaced (``DedupRecord.replaced``, at most one claim deep): the same ask
  made again (its answer lost: a Redis call that timed out after it ran) is answered as the first
  was (``records.first_record``), and a message read again after an unfinished claim sees the
  record beneath it.

* A store that cannot tell "never seen" from "forgotten": a Redis without persistence that
  restarted empty lost every claim and applied record. The Redis store keeps its own creation
  time (``@epoch``, written by the claim script); while it is younger than
  ``dedup_forgotten_window_s`` a NEW claim over no record is ``Claim.store_young``, and the
  change is checked against the ticket before it is sent, as after a takeover.

* A record a backend cannot read (not JSON, not an object, no known state, a field the rule
  compares of another type) is an expired claim of no one (``records.UNREADABLE``): taken over,
  the ticket read first, and written over by a done-record. Every backend reads a record so
  (``DedupRecord.decode``, the Redis scripts' ``record``); a lease that is no number is expired.

Backends by URL: ``memory://?max_entries=N`` (bounded LRU, one process), ``sqlite:///path``
(survives restarts on one node), ``redis://host:port/db?prefix=...`` (shared by all replicas).
Every backend failure is raised as ``DedupUnavailable`` (the worker pauses); what one event's own
record refuses (a Redis key of another type) as ``DedupRecordError``, which fails that job only.

The package: ``records`` (the records and ``decide``, the rule every backend follows), one
module per backend (``memory``, ``sqlite``, ``redis``), and here the ``DedupStore`` Protocol and
``open_store``, which picks the backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from worker.dedup.memory import MemoryStore
from worker.dedup.records import (
    CLAIM_RECORD_KEEP_S,
    Claim,
    ClaimKind,
    DedupRecord,
    claimed,
    decide,
)
from worker.dedup.redis import RedisStore
from worker.dedup.sqlite import SqliteStore
from worker.errors import ConfigError, DedupRecordError
from worker.logs import get_logger
from worker.redis_config import DedupTarget, key_prefix
from worker.settings import is_redis_url, memory_max_entries

__all__ = [
    "CLAIM_RECORD_KEEP_S",
    "Claim",
    "ClaimKind",
    "DedupRecord",
    "DedupRecordError",
    "DedupStore",
    "MemoryStore",
    "RedisStore",
    "SqliteStore",
    "claimed",
    "decide",
    "open_store",
]

log = get_logger(__name__)


class DedupStore(Protocol):
    """What the pipeline needs from a dedup backend (memory, sqlite, Redis): atomic claims with a
    lease, and the records that let a redelivery repeat its first answer instead of calling again.

    ``token`` names one claim of its owner (``Pipeline`` gives each claim a fresh one): ``extend``
    and ``release`` act only on the claim with the owner *and* the token they are given. A hand-on
    that timed out may still run later on Redis (a command already sent runs after the client gave
    up on it), after the owner claimed the event again: matched by owner alone, it deleted or
    changed that newer claim, and another worker could claim the event and send it too. (sqlite
    runs its calls in the order they were made, so there the token is a second line of defence.)
    An empty token matches only a claim without one (an earlier release's, the probe's), never a
    claim that has one: a caller that cannot name its claim must not act on whichever is there."""

    #: A server that may answer later (a start waits for it); a local file or memory either works
    #: at once or never will.
    remote: bool

    async def claim(
        self, event_id: str, owner: str, source: str, lease_s: float, target: str = "", token: str = ""
    ) -> Claim: ...
    async def extend(self, event_id: str, owner: str, lease_s: float, token: str = "") -> bool: ...
    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        """Write the applied record whatever is there (one plain write, on the hot path): it is
        the event's last record and true whoever holds the claim now; a worker that took the event
        over finds it (its renewal fails, its next claim answers ``APPLIED``), and the event's next
        message is a duplicate, as it should be."""
        ...

    async def mark_done(
        self, event_id: str, record: DedupRecord, ttl_s: float, *, owner: str = "", token: str = ""
    ) -> DedupRecord | None:
        """Write the done-record, atomically with a look at what is there (``done_may_replace``):
        over no record, the claim ``owner`` made with ``token`` (the writer's own, expired or not),
        an expired claim, a done-record or one that cannot be read; never over an applied record
        nor a live claim of another (``owner`` "": a writer without a claim). Returns None when
        written, else the record kept, unchanged: an applied one (the event's outcome is that
        one's), or the live claim of a worker that took the event over (it may be sending: the
        caller's job ends with its own outcome, and leaves that claim to its owner)."""
        ...

    async def release(self, event_id: str, owner: str, token: str = "") -> None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


def open_store(
    url: str | DedupTarget,
    record_ttl_s: float = 0.0,
    redis_min_replicas: int = 0,
    redis_forgotten_window_s: float = 0.0,
) -> DedupStore:
    """The backend named by ``url`` (``COC_WORKER_DEDUP_URL``); ``record_ttl_s`` is how long it
    keeps an applied or done record (``dedup_ttl_s``), claims at least as long;
    ``redis_min_replicas`` the replicas that must acknowledge each Redis write;
    ``redis_forgotten_window_s`` how long a new Redis store answers new claims ``store_young``
    (``dedup_forgotten_window_s``; 0, the default here, never). Memory and sqlite have no window:
    ``memory://`` is documented as lost with its process, sqlite keeps its file. ``url`` may carry
    the Redis password of its own setting (``redis_config.dedup_target``)."""
    target = url if isinstance(url, DedupTarget) else DedupTarget(url)
    url = target.url
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    keep_s = max(CLAIM_RECORD_KEEP_S, record_ttl_s)
    if parts.scheme == "memory":
        try:
            return MemoryStore(max_entries=memory_max_entries(url), claim_keep_s=keep_s)
        except ValueError as exc:
            raise ConfigError(f"COC_WORKER_DEDUP_URL: {exc}") from None
    if parts.scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :].split("?", 1)[0])
        if not url.startswith("sqlite:///") or not path:
            raise ConfigError("COC_WORKER_DEDUP_URL: use sqlite:///relative/path or sqlite:////absolute/path")
        return SqliteStore(Path(path), claim_keep_s=keep_s)
    if is_redis_url(url):
        for option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            # Read when connecting: a missing file would look like the store being down.
            if option in query and not os.access(query[option], os.R_OK):
                raise ConfigError(f"COC_WORKER_DEDUP_URL: ?{option}= names no readable file: {query[option]}")
        if query.get("ssl_cert_reqs") == "none":  # said as loudly as for Kafka and the API
            log.warning("redis_tls_verification_disabled", setting="COC_WORKER_DEDUP_URL")
        return RedisStore(
            target,
            prefix=key_prefix(url),
            claim_keep_s=keep_s,
            min_replicas=redis_min_replicas,
            forgotten_window_s=redis_forgotten_window_s,
        )
    raise ConfigError(f"COC_WORKER_DEDUP_URL: unsupported scheme {parts.scheme!r}")
