"""Which offset may be committed: per partition, the first message that is not finished yet.

Messages of one partition finish out of order (different tickets run concurrently), but Kafka
stores one position per partition. The watermark is the lowest unfinished offset: committing it
means "everything before this is finished", and never skips an unfinished message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

#: (topic, partition)
PartitionKey = tuple[str, int]


@dataclass(slots=True)
class PartitionOffsets:
    """Offsets taken from one partition, in the order they were consumed."""

    taken: deque[int] = field(default_factory=deque)
    finished: set[int] = field(default_factory=set)
    next_position: int | None = None  # first offset not yet finished, once known
    committed: int | None = None

    def take(self, offset: int) -> None:
        if self.taken and offset <= self.taken[-1]:
            raise OffsetWentBack(f"offset {offset} taken after {self.taken[-1]}: offsets must increase")
        if self.next_position is not None and offset < self.next_position:
            raise OffsetWentBack(f"offset {offset} is below the finished position {self.next_position}")
        self.taken.append(offset)

    def finish(self, offset: int) -> None:
        self.finished.add(offset)
        while self.taken and self.taken[0] in self.finished:
            first = self.taken.popleft()
            self.finished.discard(first)
            self.next_position = first + 1

    @property
    def watermark(self) -> int | None:
        """The offset to commit: the first unfinished one, or one past the last finished."""
        if self.taken:
            return self.taken[0]
        return self.next_position

    @property
    def pending(self) -> int:
        return len(self.taken)

    @property
    def unfinished(self) -> int:
        """Messages taken and not finished: this partition's share of the worker's buffer."""
        return len(self.taken) - len(self.finished)


class NotAssigned(KeyError):
    """A message of a partition that is not (or no longer) assigned to this member."""


class OffsetWentBack(ValueError):
    """A message at or below an offset already taken in its partition: the log was truncated or
    the partition read again from an earlier position (the worker starts it over)."""


class OffsetTracker:
    """Watermarks of every assigned partition."""

    def __init__(self) -> None:
        self._parts: dict[PartitionKey, PartitionOffsets] = {}

    def assign(self, key: PartitionKey) -> None:
        self._parts.setdefault(key, PartitionOffsets())

    def take(self, key: PartitionKey, offset: int) -> PartitionOffsets:
        """The partition's tracker, which ``finish`` is given back. Raises ``NotAssigned`` for a
        partition not assigned: tracked again, it would be named in every later commit, and the
        broker refuses a whole commit naming a partition not ours."""
        part = self._parts.get(key)
        if part is None:
            raise NotAssigned(key)
        part.take(offset)
        return part

    def finish(self, key: PartitionKey, offset: int, taken_in: PartitionOffsets) -> None:
        """Ignored unless ``taken_in`` still tracks the partition: a late finisher of a revoked
        partition (a job its revoke's grace gave up on) must not mark that offset finished in the
        tracker of the partition assigned back, where a copy of the message may still run."""
        if self._parts.get(key) is taken_in:
            taken_in.finish(offset)

    def pending_of(self, key: PartitionKey) -> int:
        """Messages of one partition taken and not committable yet (from its oldest unfinished)."""
        part = self._parts.get(key)
        return part.pending if part is not None else 0

    def unfinished_of(self, key: PartitionKey) -> int:
        part = self._parts.get(key)
        return part.unfinished if part is not None else 0

    def pending(self, keys: set[PartitionKey] | None = None) -> int:
        return sum(p.pending for k, p in self._parts.items() if keys is None or k in keys)

    def to_commit(self, keys: set[PartitionKey] | None = None) -> dict[PartitionKey, int]:
        """Watermarks that moved since the last ``committed()`` call."""
        out = {}
        for key, part in self._parts.items():
            if keys is not None and key not in keys:
                continue
            mark = part.watermark
            if mark is not None and mark != part.committed:
                out[key] = mark
        return out

    def committed(self, positions: dict[PartitionKey, int]) -> None:
        for key, offset in positions.items():
            part = self._parts.get(key)
            if part is not None:
                part.committed = offset

    def committed_position(self, key: PartitionKey) -> int | None:
        part = self._parts.get(key)
        return part.committed if part else None

    def start_over(self, key: PartitionKey, offset: int) -> None:
        """The partition's log went back (truncated, the topic recreated): track it afresh from
        ``offset``, the new log's, which is what commits now name. The old log's watermark named a
        position the new log had not reached: committed, by the periodic commit, a revoke or a
        stop while old jobs still ran, it skipped the new log's first messages for the next owner.
        Old jobs' finishes go to the tracker they were taken in, no longer this one."""
        old = self._parts.get(key)
        self._parts[key] = PartitionOffsets(next_position=offset, committed=old.committed if old else None)

    def drop(self, keys: set[PartitionKey]) -> None:
        for key in keys:
            self._parts.pop(key, None)

    def keys(self) -> set[PartitionKey]:
        return set(self._parts)
