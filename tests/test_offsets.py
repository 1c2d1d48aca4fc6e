"""The commit watermark never passes an unfinished message."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.offsets import NotAssigned, OffsetTracker, OffsetWentBack, PartitionOffsets


def test_watermark_is_first_unfinished() -> None:
    part = PartitionOffsets()
    for offset in (10, 11, 12, 13):
        part.take(offset)
    assert part.watermark == 10
    part.finish(12)
    assert part.watermark == 10
    part.finish(10)
    assert part.watermark == 11
    part.finish(11)
    assert part.watermark == 13
    part.finish(13)
    assert part.watermark == 14
    assert part.pending == 0


def test_gaps_in_offsets_are_fine() -> None:
    part = PartitionOffsets()
    part.take(5)
    part.take(9)  # compacted or transactional markers leave gaps
    part.finish(5)
    assert part.watermark == 9
    part.finish(9)
    assert part.watermark == 10


def test_offsets_must_increase() -> None:
    part = PartitionOffsets()
    part.take(3)
    with pytest.raises(OffsetWentBack, match="must increase"):
        part.take(3)
    part.finish(3)
    with pytest.raises(OffsetWentBack, match="below the finished position"):
        part.take(2)


@given(st.integers(min_value=1, max_value=200), st.randoms(use_true_random=False))
def test_never_commits_past_unfinished(count: int, rnd: random.Random) -> None:
    part = PartitionOffsets()
    offsets = list(range(100, 100 + count))
    for offset in offsets:
        part.take(offset)
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    for offset in order:
        part.finish(offset)
        finished.add(offset)
        mark = part.watermark
        assert mark is not None
        assert all(o in finished for o in offsets if o < mark)
        assert mark == 100 + count or mark not in finished
    assert part.watermark == 100 + count


def test_tracker_reports_only_moved_watermarks() -> None:
    tracker = OffsetTracker()
    a, b = ("t", 0), ("t", 1)
    tracker.assign(a)
    tracker.assign(b)
    in_a = tracker.take(a, 0)
    tracker.take(b, 0)
    assert tracker.to_commit() == {a: 0, b: 0}
    tracker.committed({a: 0, b: 0})
    assert tracker.to_commit() == {}
    tracker.finish(a, 0, in_a)
    assert tracker.to_commit() == {a: 1}
    assert tracker.to_commit({b}) == {}
    tracker.drop({a})
    tracker.finish(a, 5, in_a)  # a late finisher of a revoked partition is ignored
    assert tracker.to_commit() == {}
    assert tracker.pending() == 1


def test_a_late_finisher_of_an_earlier_assignment_is_ignored() -> None:
    """The partition was revoked and assigned back: the offset is taken again by a copy still
    running, and the earlier job's finish must not let the commit pass it."""
    tracker = OffsetTracker()
    key = ("t", 0)
    tracker.assign(key)
    before = tracker.take(key, 6)
    tracker.drop({key})
    tracker.assign(key)
    tracker.take(key, 6)
    tracker.finish(key, 6, before)
    assert tracker.to_commit() == {key: 6}


def test_a_partition_not_assigned_is_not_tracked() -> None:
    tracker = OffsetTracker()
    tracker.assign(("t", 1))
    with pytest.raises(NotAssigned):
        tracker.take(("t", 0), 5)
    assert tracker.keys() == {("t", 1)}
