"""The ``memory://`` dedup backend: nothing to run or keep on disk, and nothing kept past the process."""

from __future__ import annotations

import time
from collections import OrderedDict

from worker.dedup.records import (
    CLAIM_RECORD_KEEP_S,
    Claim,
    DedupRecord,
    claim_over,
    done_may_replace,
    renewed,
)
from worker.settings import MEMORY_MAX_ENTRIES


class MemoryStore:
    """Bounded LRU in this process: protects against redelivery, not against restarts."""

    remote = False

    def __init__(
        self, max_entries: int = MEMORY_MAX_ENTRIES, claim_keep_s: float = CLAIM_RECORD_KEEP_S
    ) -> None:
        self._max = max_entries
        self._claim_keep_s = claim_keep_s
        self._items: OrderedDict[str, tuple[DedupRecord, float]] = OrderedDict()  # record, expires_at

    def _get(self, event_id: str) -> DedupRecord | None:
        item = self._items.get(event_id)
        if item is None:
            return None
        if item[1] < time.monotonic():
            del self._items[event_id]
            return None
        self._items.move_to_end(event_id)
        return item[0]

    def _put(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        self._items[event_id] = (record, time.monotonic() + ttl_s)
        self._items.move_to_end(event_id)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    async def claim(
        self, event_id: str, owner: str, source: str, lease_s: float, target: str = "", token: str = ""
    ) -> Claim:
        now = time.time()
        answer, record = claim_over(self._get(event_id), owner, source, now, lease_s, target, token)
        if record is not None:
            self._put(event_id, record, lease_s + self._claim_keep_s)
        return answer

    async def extend(self, event_id: str, owner: str, lease_s: float, token: str = "") -> bool:
        renewal = renewed(self._get(event_id), owner, token, time.time(), lease_s)
        if renewal is None:
            return False
        self._put(event_id, renewal, lease_s + self._claim_keep_s)
        return True

    async def mark_applied(self, event_id: str, record: DedupRecord, ttl_s: float) -> None:
        self._put(event_id, record, ttl_s)

    async def mark_done(
        self, event_id: str, record: DedupRecord, ttl_s: float, *, owner: str = "", token: str = ""
    ) -> DedupRecord | None:
        current = self._get(event_id)
        if not done_may_replace(current, owner, token, time.time()):
            return current
        self._put(event_id, record, ttl_s)
        return None

    async def release(self, event_id: str, owner: str, token: str = "") -> None:
        record = self._get(event_id)
        if record is not None and record.is_claim_of(owner, token):
            del self._items[event_id]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
