"""The ``redis://`` / ``rediss://`` dedup backend: one store shared by every replica.

Claims are atomic by Lua script, which follows ``records.decide`` with Redis' own clock.

A Redis without persistence that restarts comes back empty (its replicas resync to empty): every
claim and applied record is gone, and an applied event read again (its offset not yet committed)
would be claimed as new and sent again. The store keeps its creation time under ``@epoch``,
written by the first claim of an empty store (the claim script itself: no round trip more, and
through the same ``WAIT`` as the claim); for ``forgotten_window_s`` after it, a claim over no
record may be of a forgotten event, and is answered ``store_young`` (the ticket is read first).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from worker.dedup.records import (
    CLAIM_RECORD_KEEP_S,
    EPOCH_KEY,
    PROBE_KEY,
    PROBE_OWNER,
    Claim,
    ClaimKind,
    DedupRecord,
    decide,
    first_record,
)
from worker.errors import DedupRecordError, DedupUnavailable
from worker.logs import get_logger, redact_cut
from worker.redis_config import (
    DEFAULT_PREFIX,
    DedupTarget,
    is_read_only,
    leave_demoted_node,
    redis_client,
    server_text,
)

log = get_logger(__name__)

#: How long a Redis write waits for its replicas' acknowledgements (``RedisStore._write``).
_REPLICA_WAIT_MS = 1000


#: How every script reads a record, as ``DedupRecord.decode`` does (``records._from_data``): nil when
#: it cannot be read (not JSON, not an object, no known state, a field the rule compares that is no
#: string), then taken as ``records.UNREADABLE``; a lease that is no number is 0 (expired). A Lua
#: error here (``tonumber(nil) > now``, a record that is no table) failed the call as the store
#: being away: the worker paused, its probe passed, the same record paused it again.
_RECORD_LUA = """
local function record(v)
  local ok, r = pcall(cjson.decode, v)
  if not ok or type(r) ~= 'table' then return nil end
  for _, k in ipairs({'state', 'owner', 'source', 'status', 'target', 'token'}) do
    if r[k] ~= nil and type(r[k]) ~= 'string' then return nil end
  end
  local s = r['state']
  if s ~= 'claimed' and s ~= 'applied' and s ~= 'done' then return nil end
  if type(r['lease_until']) ~= 'number' then r['lease_until'] = 0 end
  return r
end
"""
# Claim atomically with Redis' clock, following ``decide()``. Returns {taken, previous-or-false,
# epoch, age}: the store's creation time (KEYS[2], Unix seconds on Redis' clock, no TTL), written
# here when absent or unreadable (of another type too), and its age in whole seconds (0 when
# written now). The claim keeps what it replaced (``records.claim_keeps``), for the same ask made
# again (its answer lost) to be answered as the first was (``records.first_record``).
_CLAIM_LUA = (
    _RECORD_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local epoch = redis.pcall('GET', KEYS[2])
local age = 0
if type(epoch) == 'string' and tonumber(epoch) then
  age = math.floor(now - tonumber(epoch))
else
  epoch = string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))
  redis.call('SET', KEYS[2], epoch)
end
local mine = cjson.decode(ARGV[2])
local v = redis.call('GET', KEYS[1])
if v then
  local r = record(v)
  if not r then
    mine['replaced'] = {state = 'claimed'}  -- records.UNREADABLE: taken over as an expired claim
  else
    -- the id reused for another change: never taken, whatever the record's state
    if ARGV[6] ~= '' and r['target'] and r['target'] ~= '' and r['target'] ~= ARGV[6] then
      return {0, v, epoch, age}
    end
    if r['state'] == 'claimed' then
      if r['owner'] ~= ARGV[1] and r['lease_until'] > now then return {0, v, epoch, age} end
    elseif r['state'] == 'applied' then
      return {0, v, epoch, age}
    elseif r['status'] == 'applied' or r['source'] == ARGV[3] then
      return {0, v, epoch, age}
    end
    local token = mine['token'] or ''
    if r['state'] == 'claimed' and r['owner'] == ARGV[1] and token ~= '' and r['token'] == token then
      mine['replaced'] = r['replaced']  -- this very claim, asked again: what the first replaced
    else
      local q = r['replaced']
      if r['state'] ~= 'claimed' then
        r['replaced'] = nil
      elseif type(q) == 'table' and q['state'] == 'claimed' then
        r['replaced'] = q['replaced']  -- one claim deep at most
      end
      mine['replaced'] = r
    end
  end
end
mine['lease_until'] = now + tonumber(ARGV[4])
local ok, claim = pcall(cjson.encode, mine)
if not ok then  -- what it replaced holds what cjson cannot write (NaN, Inf): kept as unreadable
  mine['replaced'] = {state = 'claimed'}
  claim = cjson.encode(mine)
end
redis.call('SET', KEYS[1], claim, 'PX', ARGV[5])
return {1, v or false, epoch, age}
"""
)
# Renew / release the claim owner ARGV[1] made with the token in the last ARGV, as
# ``DedupRecord.is_claim_of`` (a record without a token matches only the empty one).
_EXTEND_LUA = (
    _RECORD_LUA
    + """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local r = record(v)
if r and r['state'] == 'claimed' and r['owner'] == ARGV[1] and (r['token'] or '') == ARGV[4] then
  local t = redis.call('TIME')
  r['lease_until'] = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2])
  redis.call('SET', KEYS[1], cjson.encode(r), 'PX', ARGV[3])
  return 1
end
return 0
"""
)
_RELEASE_LUA = (
    _RECORD_LUA
    + """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local r = record(v)
if r and r['state'] == 'claimed' and r['owner'] == ARGV[1] and (r['token'] or '') == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)
#: ``records.done_may_replace`` for owner ARGV[3]'s claim with token ARGV[4]: a done-record never
#: replaces an applied record nor a live claim of another, which is returned instead.
_DONE_LUA = (
    _RECORD_LUA
    + """
local v = redis.call('GET', KEYS[1])
if v then
  local r = record(v)
  if r and r['state'] == 'applied' then return v end
  if r and r['state'] == 'claimed' and not (r['owner'] == ARGV[3] and (r['token'] or '') == ARGV[4]) then
    local t = redis.call('TIME')
    if r['lease_until'] > tonumber(t[1]) + tonumber(t[2]) / 1000000 then return v end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
)
#: A key of another type under the prefix: this record's fault, not the store's
#: (``DedupRecordError``). A script's own runtime error is not: the scripts read every record shape
#: (``_RECORD_LUA``), so one would be a bug of the script, which would fail every event alike, and
#: the worker pauses on it instead (the messages wait for a fix, none is dead-lettered).
_RECORD_ERROR = re.compile(r"\bWRONGTYPE\b")


class _NotReplicated(DedupUnavailable):
    """A Redis write the primary made but too few replicas acknowledged; ``result`` is its answer."""

    def __init__(self, detail: str, result: Any) -> None:
        super().__init__(detail)
        self.result = result


class RedisStore:
    """Shared by every replica; atomic claims by Lua script."""

    remote = True

    def __init__(
        self,
        url: str | DedupTarget,
        prefix: str = DEFAULT_PREFIX,
        claim_keep_s: float = CLAIM_RECORD_KEEP_S,
        min_replicas: int = 0,
        forgotten_window_s: float = 0.0,
    ) -> None:
        """``url``: alone, or with the password of its own setting (``dedup_target``);
        ``forgotten_window_s``: how long after the store's creation a claim over no record is
        answered ``store_young`` (``dedup_forgotten_window_s``); 0: never."""
        self._prefix = prefix
        self._claim_keep_s = claim_keep_s
        self._min_replicas = min_replicas
        self._forgotten_window_s = forgotten_window_s
        self._epoch_key = prefix + EPOCH_KEY
        #: The store's creation time as this process last saw it (None: no claim answered yet).
        self._epoch: bytes | None = None
        #: Events whose claim here was refused for want of replicas only (``claim``), with the
        #: record that claim replaced on the primary (None: none).
        self._unreplicated: dict[str, str | bytes | None] = {}
        self._client: aioredis.Redis = redis_client(url, socket_timeout_s=2.0)
        self._claim = self._client.register_script(_CLAIM_LUA)
        self._extend = self._client.register_script(_EXTEND_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)
        self._done = self._client.register_script(_DONE_LUA)

    def _key(self, event_id: str) -> str:
        return self._prefix + event_id

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except redis_errors.AuthenticationError as exc:
            # Not "unreachable": a wrong or missing password, which waiting will not mend. redis-py's
            # text is the server's (WRONGPASS, NOAUTH), never the password; redacted all the same.
            reason = redact_cut(str(exc), 200)
            raise DedupUnavailable(
                f"redis dedup store refused the login: {type(exc).__name__}"
                + (f": {reason}" if reason else "")
            ) from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            # One lost connection, all of them, most likely (a restart, a failover, a network cut):
            # the probe would pass on a fresh one and each job then meet another dead one, every
            # pause starting from the backoff already reached. The idle ones are dropped and made
            # afresh; those in use end on their own.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            # redis-py's text names the address it tried (never the password; redacted all the same)
            reason = redact_cut(str(exc), 200)
            raise DedupUnavailable(
                f"redis dedup store unreachable: {type(exc).__name__}" + (f": {reason}" if reason else "")
            ) from exc
        except redis_errors.RedisError as exc:
            if is_read_only(exc):  # also as a script's error before Redis 7: redis_config.is_read_only
                await leave_demoted_node(self._client)
                raise DedupUnavailable("redis dedup store is a read-only replica now (failover)") from exc
            # The server's text (redacted all the same): its own words, or a script's position and
            # Lua's message, and in a pipeline the start of the command (a key, never a password).
            reason = redact_cut(str(exc), 300)
            if type(exc) is redis_errors.ResponseError and _RECORD_ERROR.search(server_text(exc)):
                # This event's record, not the store: the job fails, the worker does not pause
                # (NOREPLICAS, OOM, MISCONF, NOPERM, BUSY... still do: the store cannot write).
                raise DedupRecordError(f"redis dedup store cannot use this event's key: {reason}") from exc
            raise DedupUnavailable(
                f"redis dedup store error: {type(exc).__name__}" + (f": {reason}" if reason else "")
            ) from exc

    async def _write(self, command: Callable[[Any], Any]) -> Any:
        """``command(client)``, a write. With ``min_replicas``, sent on one connection followed by
        ``WAIT``, and refused as the store being away unless that many replicas acknowledged it:
        Redis replicates asynchronously, and a failover lost the last claims and records the
        worker had acted on (another worker claimed the same event as new and sent it too)."""
        if not self._min_replicas:
            return await self._call(command(self._client))

        async def replicated() -> Any:
            async with self._client.pipeline(transaction=False) as pipe:
                queued = command(pipe)
                if inspect.isawaitable(queued):  # a script queues itself in a coroutine
                    await queued
                pipe.wait(self._min_replicas, _REPLICA_WAIT_MS)
                result, acked = await pipe.execute()
            if acked < self._min_replicas:
                raise _NotReplicated(
                    f"redis dedup store: a write reached {acked} of {self._min_replicas} replicas"
                    f" in {_REPLICA_WAIT_MS} ms",
                    result,
                )
            return result

        return await self._call(replicated())

    async def claim(
        self, event_id: str, owner: str, source: str, lease_s: float, target: str = "", token: str = ""
    ) -> Claim:
        mine = DedupRecord("claimed", owner, source, target=target, token=token).encode()
        keep_ms = int((lease_s + self._claim_keep_s) * 1000)
        try:
            taken, previous, epoch, age_s = await self._write(
                lambda client: self._claim(
                    keys=[self._key(event_id), self._epoch_key],
                    args=[owner, mine, source, lease_s, keep_ms, target],
                    client=client,
                )
            )
        except _NotReplicated as exc:
            refused_taken, replaced, *_ = exc.result
            if refused_taken:  # written on the primary: our claim, nothing sent yet
                # What it replaced is what this claim answers for when asked again. Our own claim,
                # written by an earlier refused attempt, tells nothing: what that one replaced
                # stays. Anything else (another owner's claim or failed record, taken after our
                # refused claim ran out) is the record now, and must not be hidden by an older one.
                before = DedupRecord.decode(replaced) if replaced else None
                if before is not None and before.state == "claimed" and before.owner == owner:
                    self._unreplicated.setdefault(event_id, replaced)
                else:
                    self._unreplicated[event_id] = replaced or None
            raise
        self._see_epoch(epoch, age_s)
        record = DedupRecord.decode(previous) if previous else None
        if taken:
            # Our claim with this token: this ask, made again (its answer lost), answered as then.
            record = first_record(record, owner, token)
            if event_id in self._unreplicated:
                replaced = self._unreplicated.pop(event_id)
                if record is not None and record.state == "claimed" and record.owner == owner:
                    # Our own claim, written by the refused attempt: the record before it tells
                    # what this claim took over (another owner's expired claim, a failed event).
                    record = DedupRecord.decode(replaced) if replaced else None
            # The script followed decide(): any previous claim (another owner's expired one, or
            # our own unfinished one) was a takeover. No record at all in a young store: never
            # seen, or forgotten with the store (after the record substitution above: a record
            # our refused claim replaced is what was there).
            return Claim(
                ClaimKind.NEW,
                record,
                taken_over=record is not None and record.state == "claimed",
                store_young=record is None and self._young(age_s),
            )
        assert record is not None
        self._unreplicated.pop(event_id, None)  # no claim of ours there any more: nothing to answer for
        # Not taken: held by a live owner, claimed for another change, applied, or done. decide()
        # says which (a held claim's lease is by definition in the future of Redis' clock, hence
        # "now" = 0 for it).
        answer = decide(record, owner, source, 0.0, target, token)
        if answer.kind is ClaimKind.NEW:  # the script and decide() read the record apart: no claim
            raise DedupRecordError(
                "redis dedup store: the claim script refused a record that decide() takes"
                f" ({record.state}, of {record.owner!r}); nothing was written"
            )
        return answer

    def _young(self, age_s: int) -> bool:
        """Whether a store of this age may have forgotten what it was told before (a negative age,
        Redis' clock stepped back, is not trusted as old either)."""
        return self._forgotten_window_s > 0 and age_s < self._forgotten_window_s

    def _see_epoch(self, epoch: bytes, age_s: int) -> None:
        """Say once per process that the store is young (what the window costs: a read of each
        ticket), and each time it was emptied while this process ran (another creation time than
        the last seen; once per emptying, as the new epoch is kept): a restart without persistence,
        a failover to a replica that never had the key, or an eviction; records of events applied
        before may be gone."""
        if self._epoch is None:
            self._epoch = epoch
            if self._young(age_s):
                log.warning(
                    "dedup_store_young",
                    age_s=age_s,
                    window_s=self._forgotten_window_s,
                    detail="new events have their ticket read before they are sent until the window ends",
                )
        elif epoch != self._epoch:
            log.error(
                "dedup_store_emptied",
                age_s=age_s,
                window_s=self._forgotten_window_s,
                created=epoch.decode(errors="replace"),
                last_seen=self._epoch.decode(errors="replace"),
                detail="the store lost its records: events applied before may be read again as new;"
                " run Redis with persistence",
            )
            self._epoch = epoch

    async def extend(self, event_id: str, owner: str, lease_s: float, token: str = "") -> bool:
        keep_ms = int((lease_s + self._claim_keep_s) * 1000)
        extended = await self._write(
            lambda client: self._extend(
                keys=[self._key(event_id)], args=[owner, lease_s, keep_ms, token], client=client
            )
        )
        return bool(extended)

    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        await self._put(event_id, record, ttl_s)

    async def mark_done(
        self, event_id: str, record: DedupRecord, ttl_s: float, *, owner: str = "", token: str = ""
    ) -> DedupRecord | None:
        value, ttl_ms = record.encode(), int(ttl_s * 1000)
        kept = await self._write(
            lambda client: self._done(
                keys=[self._key(event_id)], args=[value, ttl_ms, owner, token], client=client
            )
        )
        return DedupRecord.decode(kept) if kept else None

    async def _put(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        value = record.encode()
        await self._write(lambda client: client.set(self._key(event_id), value, px=int(ttl_s * 1000)))

    async def release(self, event_id: str, owner: str, token: str = "") -> None:
        # A write like the others: one no replica acknowledged may come back after a failover
        # (the claim then runs out its lease), so it is reported as not done, as a renewal is.
        await self._write(
            lambda client: self._release(keys=[self._key(event_id)], args=[owner, token], client=client)
        )

    async def ping(self) -> None:
        """A claim of the probe key, not ``PING``: a replica answers ``PING``, as an ACL user
        without scripts answers a ``SET``, and the gate would reopen onto a node (or with a user)
        that refuses every claim."""
        await self.claim(PROBE_KEY, PROBE_OWNER, "probe", 1.0)  # acknowledged as a claim must be

    async def close(self) -> None:
        await self._client.aclose()
