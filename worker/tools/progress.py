"""Progress of a long operation (replaying thousands of records, draining a topic), on stderr.

stdout stays for results a script can parse; progress goes to stderr, at most one line per
interval, so a short run prints nothing but its summary and a long one shows it is alive.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, *, stream: TextIO | None = None, interval_s: float = 1.0) -> None:
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._last = self._started
        self.counts: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` more of ``name``; print a line when the interval has passed."""
        self.counts[name] = self.counts.get(name, 0) + n
        now = time.monotonic()
        if now - self._last >= self._interval_s:
            self._last = now
            self._print(now)

    def set_total(self, name: str, total: int) -> None:
        self.counts[f"{name}_total"] = total

    def _print(self, now: float) -> None:
        parts = []
        for name, value in self.counts.items():
            if name.endswith("_total"):
                continue
            total = self.counts.get(f"{name}_total")
            parts.append(f"{name} {value}/{total}" if total is not None else f"{name} {value}")
        elapsed = now - self._started
        print(f"{self._label}: {', '.join(parts)} ({elapsed:.0f}s)", file=self._stream, flush=True)
