"""An HTTP CONNECT proxy with Basic auth: what an egress proxy in front of the API does.

It opens a tunnel to the target a ``CONNECT`` names and relays bytes both ways; TLS runs through
the tunnel end to end, so the proxy sees only the target. A wrong or missing
``Proxy-Authorization`` gets 407, as Squid answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

#: Every variable the HTTP client reads a proxy from, and CGI's, which turns them all off.
PROXY_ENV = (
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "REQUEST_METHOD",
)  # fmt: skip


def clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The test's own proxy variables only, not the machine's."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@dataclass
class ConnectProxy:
    user: str
    password: str
    url: str = ""  # http://127.0.0.1:PORT, once serving
    #: ``host:port`` of every tunnel opened, in order.
    tunnels: list[str] = field(default_factory=list)
    #: Requests refused with 407.
    refused: int = 0

    def _authorized(self, header: str | None) -> bool:
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)
            }
            if method != "CONNECT" or not self._authorized(headers.get("proxy-authorization")):
                self.refused += 1
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="egress"\r\nContent-Length: 0\r\n\r\n'
                )
                await writer.drain()
                return
            host, _, port = target.rpartition(":")
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            self.tunnels.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            try:
                await asyncio.gather(_relay(reader, upstream_writer), _relay(upstream_reader, writer))
            finally:
                upstream_writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()


@contextlib.asynccontextmanager
async def serving_proxy(user: str, password: str) -> AsyncIterator[ConnectProxy]:
    proxy = ConnectProxy(user, password)
    server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield proxy
    finally:
        server.close()
        await server.wait_closed()
