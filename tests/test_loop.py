"""The worker's event loop: uvloop, but a write to a lost connection raises an OSError as aiokafka expects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

import pytest
import uvloop

from worker.loop import loop_factory

Probe = Callable[[asyncio.StreamWriter], None]


def _run(factory: Callable[[], asyncio.AbstractEventLoop] | None, probe: Probe) -> BaseException | None:
    """Connect to a server that resets the connection at once (as a cut broker link does), wait until
    the loop has closed our side, then probe."""

    async def scenario() -> BaseException | None:
        server = await asyncio.start_server(_reset, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionError):
                await reader.read()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            try:
                probe(writer)
            except (RuntimeError, OSError) as err:
                return err
            return None

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(scenario())


def _reset(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN (SO_LINGER 0), so the client's read fails and its transport closes."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _write(writer: asyncio.StreamWriter) -> None:
    writer.write(b"request")


def _writelines(writer: asyncio.StreamWriter) -> None:
    writer.writelines([b"re", b"quest"])


@pytest.mark.parametrize("probe", [_write, _writelines])
def test_write_to_a_lost_connection_raises_connection_reset(probe: Probe) -> None:
    err = _run(loop_factory(), probe)
    assert isinstance(err, ConnectionResetError), err


@pytest.mark.parametrize("probe", [_write, _writelines])
def test_plain_uvloop_raises_runtime_error_there(probe: Probe) -> None:
    """Why worker.loop exists (aio-libs/aiokafka#1038). If this starts failing, uvloop changed and
    the adapter may be unneeded."""
    err = _run(uvloop.new_event_loop, probe)
    assert type(err) is RuntimeError, err


def test_asyncio_drops_that_write() -> None:
    """The contract the adapter keeps: asyncio's transports never raise RuntimeError there."""
    assert _run(None, _write) is None


def test_other_runtime_errors_stay_runtime_errors() -> None:
    """A write after our own write_eof is a bug, not a lost connection: it is not disguised."""

    async def scenario() -> BaseException | None:
        async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read()
            w.close()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write_eof()
            try:
                writer.write(b"late")
            except RuntimeError as err:
                return err
            finally:
                writer.close()
            return None

    factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        err = runner.run(scenario())
    assert type(err) is RuntimeError, err


def test_the_transport_answers_everything_else_as_itself() -> None:
    async def scenario() -> tuple[object, object]:
        server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            peer = writer.get_extra_info("peername")
            closing = writer.is_closing()
            writer.close()
            return peer, closing

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        peer, closing = runner.run(scenario())
    assert peer[1] > 0  # type: ignore[index]
    assert closing is False
