"""Catching sockets and transports that are left to the garbage collector instead of closed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def unraisable() -> Iterator[list[str]]:
    """Collect what ``__del__`` reports while the block runs and at garbage collections after it.

    An unclosed socket or transport only warns when it is collected, and a warning in ``__del__``
    is unraisable: it reaches ``sys.unraisablehook``, not the test, and only if ResourceWarning is
    an error. Each report is kept as text: the report itself holds the object it is about (through
    its traceback), and an object kept alive here would warn later, in another test. Assert that
    the returned list is empty once the block has ended.
    """
    leaked: list[str] = []

    def keep(report: Any) -> None:
        leaked.append(f"{report.exc_value!r} in {report.object!r}")

    hook, sys.unraisablehook = sys.unraisablehook, keep
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            yield leaked
            # A transport that warned drops its socket only once freed: collect until quiet.
            while gc.collect():
                pass
    finally:
        sys.unraisablehook = hook


async def connect_and_close(port: int) -> bool:
    """One client that connects to ``127.0.0.1:port`` and leaves; False when it was refused."""
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True
