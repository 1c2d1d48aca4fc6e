"""The event loop the worker runs on: uvloop, with asyncio's contract for writes to a lost connection.

uvloop costs the worker ~5% less CPU per event than asyncio's own loop (bench/README.md; ~15%
while the API client's socket work still ran on the loop), and the worker is CPU-bound. One
difference kept it out: a write to a connection the peer has already closed is dropped by
asyncio's transports (the reader then reports the loss), but raises ``RuntimeError`` in uvloop's.
aiokafka only catches ``OSError`` there (aio-libs/aiokafka#1038), so after a broker cut its
coordinator task died and the consumer never fetched again.

Every transport this loop opens therefore turns that ``RuntimeError`` into
``ConnectionResetError``: the error aiokafka, redis-py and asyncio's streams already handle as "the
connection is gone". Any other ``RuntimeError`` (a write on a transport that is still open) is a
bug and is raised unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any


class _LostWritesRaiseOSError:
    """A transport whose writes after the connection is lost raise ``ConnectionResetError``."""

    __slots__ = ("_transport",)

    def __init__(self, transport: object) -> None:
        self._transport: Any = transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._transport.write(data)
        except RuntimeError as err:
            self._raise_if_lost(err)
            raise

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        try:
            self._transport.writelines(chunks)
        except RuntimeError as err:
            self._raise_if_lost(err)
            raise

    def _raise_if_lost(self, err: RuntimeError) -> None:
        """On a closing transport the error means "connection lost"; otherwise it is a bug, and
        the caller re-raises it unchanged. (try/except, not a context manager: it costs nothing
        when no error is raised, and this is every write the worker makes.)"""
        if self._transport.is_closing():
            raise ConnectionResetError(f"write to a closed connection: {err}") from err

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop for ``asyncio.Runner``: uvloop where it is installed, else asyncio's own (None)."""
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows or PyPy build
        return None

    class Loop(uvloop.Loop):
        """uvloop whose client connections keep asyncio's contract for lost writes."""

        async def create_connection(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            transport, protocol = await super().create_connection(*args, **kwargs)
            return _LostWritesRaiseOSError(transport), protocol

    return Loop
