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
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Literal

from worker.sandbox import free_port

CutMode = Literal["refuse", "blackhole"]
_CHUNK = 64 * 1024
#: How long stop() waits for the sockets of closed listeners to be closed.
_CLOSE_WAIT_S = 5.0


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
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut: CutMode | None = None
        #: Client connections handed to us and not yet closed by stop(), whatever their pipe did.
        self._accepted: set[asyncio.StreamWriter] = set()
        #: Every listener this proxy opened: stop() waits until each has no socket left open.
        self._servers: list[asyncio.Server] = []

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
        await self._wait_sockets_closed()

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
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
            self._servers.append(self._server)

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # Server.wait_closed() also waits for the accepted connections' handlers: do not.

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

    async def _wait_sockets_closed(self) -> None:
        """Close every connection the listeners accepted and wait until none is left open.

        A socket left to the garbage collector fails the test that owns it. A connection the kernel
        accepted as the listener closed reaches us a loop turn or two later, so the condition is
        the servers' own count of open sockets (what Python 3.12's ``Server.wait_closed()`` waits
        for; 3.11's returns at once), polled with a deadline.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CLOSE_WAIT_S
        while loop.time() < deadline:
            for writer in self._accepted:
                _abort(writer)
            self._accepted.clear()
            await asyncio.sleep(0.005)
            if not self._accepted and not any(server._active_count for server in self._servers):
                return

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Called as the connection is made (not as a task that might never start), so every
        accepted connection is known at once, and closed by stop() whatever happens next."""
        self._accepted.add(writer)
        if self._server is None:
            # Accepted by the kernel just before the listener closed (a refuse-cut or stop()):
            # close it now.
            _abort(writer)
            return
        task = asyncio.get_running_loop().create_task(self._forward(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
