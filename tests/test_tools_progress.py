"""Progress lines on stderr: none for a quick operation, counts (of a total) for a long one."""

from __future__ import annotations

import io

from worker.tools.progress import Progress


def test_quiet_within_the_interval() -> None:
    stream = io.StringIO()
    progress = Progress("dlq replay", stream=stream, interval_s=3600)
    for _ in range(1000):
        progress.add("read")
    assert stream.getvalue() == ""
    assert progress.counts == {"read": 1000}


def test_a_line_per_interval_with_totals() -> None:
    stream = io.StringIO()
    progress = Progress("dlq replay", stream=stream, interval_s=0)
    progress.set_total("read", 10)
    progress.add("read", 4)
    progress.add("sent", 2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("dlq replay: read 4/10 (")
    assert lines[1].startswith("dlq replay: read 4/10, sent 2 (")
