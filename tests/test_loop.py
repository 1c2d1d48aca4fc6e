"""The worker's event loop: uvloop, but a write to a lost connection raises an OSError as aiokafka expects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import uvloop

from worker.loop import loop_factory

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop] | None
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]
Probe = Callable[[asyncio.StreamWriter], None]


def _connected(
    factory: LoopFactory,
    handler: Handler,
    then: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]],
) -> T:
    """On a fresh loop from ``factory``: connect to a local server running ``handler``, run ``then``."""

    async def scenario() -> T:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return await then(reader, writer)
            finally:
                writer.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(scenario())


def _reset(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN (SO_LINGER 0), so the client's read fails and its transport closes."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _after_reset(factory: LoopFactory, probe: Probe) -> BaseException | None:
    """The server resets the connection at once (as a cut broker link does); once the loop has
    closed our side, ``probe`` writes. Returns what the write raised."""

    async def then(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> BaseException | None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        try:
            probe(writer)
        except (RuntimeError, OSError) as err:
            return err
        return None

    return _connected(factory, _reset, then)


def _write(writer: asyncio.StreamWriter) -> None:
    writer.write(b"request")


def _writelines(writer: asyncio.StreamWriter) -> None:
    writer.writelines([b"re", b"quest"])


@pytest.mark.parametrize("probe", [_write, _writelines])
def test_write_to_a_lost_connection_raises_connection_reset(probe: Probe) -> None:
    err = _after_reset(loop_factory(), probe)
    assert isinstance(err, ConnectionResetError), err


@pytest.mark.parametrize("probe", [_write, _writelines])
def test_plain_uvloop_raises_runtime_error_there(probe: Probe) -> None:
    """Why worker.loop exists (aio-libs/aiokafka#1038). If this starts failing, uvloop changed and
    the adapter may be unneeded."""
    err = _after_reset(uvloop.new_event_loop, probe)
    assert type(err) is RuntimeError, err


def test_asyncio_drops_that_write() -> None:
    """The contract the adapter keeps: asyncio's transports never raise RuntimeError there."""
    assert _after_reset(None, _write) is None


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


def test_other_runtime_errors_stay_runtime_errors() -> None:
    """A write after our own write_eof is a bug, not a lost connection: it is not disguised."""

    async def then(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> BaseException | None:
        writer.write_eof()
        try:
            writer.write(b"late")
        except RuntimeError as err:
            return err
        return None

    err = _connected(loop_factory(), _hold, then)
    assert type(err) is RuntimeError, err


def test_the_transport_answers_everything_else_as_itself() -> None:
    async def then(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[object, bool]:
        return writer.get_extra_info("peername"), writer.is_closing()

    peer, closing = _connected(loop_factory(), _hold, then)
    assert peer[1] > 0  # type: ignore[index]
    assert closing is False
