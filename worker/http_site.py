"""An aiohttp TCP site that stops without dropping a connection it has just accepted.

CPython's selector loop accepts a connection in one loop iteration and wraps it in a transport
in the next. ``asyncio.Server.close()`` landing between the two fails the wrap
(``Server._attach`` asserts; python/cpython#109564, open), and the accepted socket is left to the
garbage collector as an unclosed-socket ``ResourceWarning``. A server stopped while clients
connect (a worker retrying against a restarting simulator, a scrape during shutdown) hits it.
``stop()`` therefore stops accepting first, lets the accepted connections be wrapped, then closes
the listener; aiohttp's runner then closes those connections like any other. uvloop wraps an
accepted connection in the same callback that accepts it, so it has no such window.
"""

from __future__ import annotations

import asyncio

from aiohttp import web


class TcpSite(web.TCPSite):
    """``web.TCPSite`` whose ``stop()`` drains the accept step before closing the listener."""

    async def stop(self) -> None:
        server = self._server
        loop = asyncio.get_running_loop()
        if isinstance(server, asyncio.Server) and isinstance(loop, asyncio.SelectorEventLoop):
            for sock in server.sockets:
                # Also cancels an accept callback the selector has already queued this iteration.
                loop.remove_reader(sock.fileno())
            # Wrapping runs one iteration after accepting: one yield lets every accepted
            # connection attach to the server before close() makes attaching fail.
            await asyncio.sleep(0)
        await super().stop()
