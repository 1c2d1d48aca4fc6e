"""A TCP proxy for the fault tests: put it between the worker and the broker, or Redis, and cut it.

``TcpProxy`` forwards every accepted connection to one upstream address, both directions, in
the event loop that started it. ``cut()`` makes the upstream unreachable:

* ``mode="refuse"`` (the default) closes every open connection (both sides) and stops listening,
  so new connections are refused (a crashed or restarting peer);
* ``mode="blackhole"`` keeps listening and keeps the sockets open but forwards nothing, in either
  direction, for old and new connections alike (a network partition: the client sees timeouts,
  not errors). Connections accepted while blackholed stay dead after ``restore()``: their clients
  must time out and reconnect, as they would after a real partition.

``restore()`` listens again on the same port and forwards again. The proxy counts connections
and bytes so a test can prove traffic really went through it.

The proxy accepts connections itself (``loop.sock_accept``) instead of through ``asyncio.Server``:
CPython 3.11's server, closed while a connection it has just accepted is still being wrapped,
fails that wrapping on an assertion (``Server._attach``) and leaves the socket to the garbage
collector. A refuse-cut closes the listener at arbitrary moments, so that turned into rare
``ResourceWarning`` failures of whichever test was running. Here every accepted socket is ours
from the moment ``accept()`` returns it, and is closed by us.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from dataclasses import dataclass, field
from typing import Literal

from worker.sandbox import free_port

CutMode = Literal["refuse", "blackhole"]
_CHUNK = 64 * 1024
#: How long closing waits: for the accept loop to see the wake-up connection, for a socket to close.
_CLOSE_TIMEOUT_S = 5.0


@dataclass(slots=True)
class ProxyStats:
    accepted: int = 0
    refused_upstream: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cuts: int = 0


@dataclass(eq=False, slots=True)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: A connection accepted or cut during a blackhole never forwards again.
    dead: bool = False


class TcpProxy:
    """``async with TcpProxy("127.0.0.1", 6379) as proxy:`` -> clients connect to ``proxy.address``."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = listen_port or free_port()
        #: A port picked here may be taken by the time it is listened on (an ephemeral port of
        #: another connection): until the first listen, nobody has been told it, and it may move.
        self._port_movable = listen_port is None
        self.stats = ProxyStats()
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut: CutMode | None = None
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        #: Sockets accepted and not yet wrapped in a stream, then the client writers made from them:
        #: together every accepted connection, until stop() closed it.
        self._accepted_socks: set[socket.socket] = set()
        self._accepted: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut is not None

    @property
    def open_connections(self) -> int:
        return sum(1 for pipe in self._pipes if not pipe.dead)

    async def start(self) -> TcpProxy:
        await self._listen()
        return self

    async def stop(self) -> None:
        await self._unlisten()
        await self._close_all()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_accepted()

    async def cut(self, mode: CutMode = "refuse") -> None:
        """Make the upstream unreachable through this proxy until ``restore()``."""
        self.stats.cuts += 1
        self._cut = mode
        if mode == "refuse":
            await self._unlisten()
            await self._close_all()
        else:
            for pipe in self._pipes:
                pipe.dead = True

    async def restore(self) -> None:
        """Forward again (a blackholed connection stays dead; its client reconnects)."""
        mode, self._cut = self._cut, None
        if mode == "refuse":
            await self._listen()
        elif mode == "blackhole":
            await self._close_all(only_dead=True)

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- internals ------------------------------------------------------------------------------------
    async def _listen(self) -> None:
        if self._listener is not None:
            return
        for tries_left in range(4, -1, -1):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((self.host, self.port))
            except OSError as exc:
                listener.close()  # not left to the collector (a ResourceWarning in a later test)
                if exc.errno != errno.EADDRINUSE or not self._port_movable or not tries_left:
                    raise
                self.port = free_port()
                continue
            break
        self._port_movable = False
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop(listener))

    async def _unlisten(self) -> None:
        """Stop accepting; connections still in the kernel's queue are reset when it closes.

        The accept loop is woken with a connection of our own, not cancelled: a cancel landing
        just after ``sock_accept`` returned would drop the socket it accepted.
        """
        listener, self._listener = self._listener, None
        acceptor, self._acceptor = self._acceptor, None
        if listener is None or acceptor is None:
            return
        loop = asyncio.get_running_loop()
        waker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        waker.setblocking(False)
        try:
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(loop.sock_connect(waker, (self.host, self.port)), _CLOSE_TIMEOUT_S)
            done, _ = await asyncio.wait({acceptor}, timeout=_CLOSE_TIMEOUT_S)
            if not done:
                acceptor.cancel()
                await asyncio.gather(acceptor, return_exceptions=True)
        finally:
            waker.close()
            listener.close()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self._accepted_socks.add(conn)
            if self._listener is not listener:  # closing (a refuse-cut or stop): not forwarded
                conn.close()
                return
            task = loop.create_task(self._forward(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _close_all(self, *, only_dead: bool = False) -> None:
        pipes = [p for p in self._pipes if p.dead or not only_dead]
        for pipe in pipes:
            self._pipes.discard(pipe)
            for writer in (pipe.client, pipe.upstream):
                if writer is not None:
                    _abort(writer)
            for task in pipe.tasks:
                task.cancel()
        tasks = [t for p in pipes for t in p.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_accepted(self) -> None:
        """Close every connection ever accepted, whatever its pipe did, and wait until it is closed:
        a socket left to the garbage collector fails the test that owns it."""
        writers, self._accepted = self._accepted, set()
        for writer in writers:
            _abort(writer)
        for writer in writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT_S)
        socks, self._accepted_socks = self._accepted_socks, set()
        for sock in socks:
            sock.close()

    async def _forward(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        finally:
            self._accepted_socks.discard(conn)  # closed, or the writer below owns it
        self._accepted.add(writer)
        if self._listener is None:
            _abort(writer)  # refused or stopped while it was being wrapped
            return
        self.stats.accepted += 1
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        if self._cut == "blackhole":
            pipe.dead = True  # accepted, never answered: the client times out
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.stats.refused_upstream += 1
            self._pipes.discard(pipe)
            _abort(writer)
            return
        if pipe not in self._pipes:  # cut while connecting
            _abort(up_writer)
            return
        pipe.upstream = up_writer
        pipe.tasks = [
            asyncio.create_task(self._pump(pipe, reader, up_writer, up=True)),
            asyncio.create_task(self._pump(pipe, up_reader, writer, up=False)),
        ]
        for task in pipe.tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, pipe: _Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if pipe.dead:
                    await asyncio.Event().wait()  # blackholed: swallow, until restore() closes us
                writer.write(data)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end both, like a real connection whose peer went away.
            if pipe in self._pipes and not pipe.dead:
                self._pipes.discard(pipe)
                _abort(pipe.client)
                if pipe.upstream is not None:
                    _abort(pipe.upstream)


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()
