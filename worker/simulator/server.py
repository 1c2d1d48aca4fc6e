"""Running the simulator inside the current event loop: a context manager and a run-forever entry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from worker.http_site import TcpSite
from worker.simulator.app import build_app
from worker.simulator.state import SimulatorConfig, SimulatorState

#: Connections the kernel queues before the server accepts them. aiohttp's default, 128, overflowed
#: when a client opened 256 connections at once on a busy machine (the benchmark's ceiling B': the
#: kernel logged "Possible SYN flooding" and a connection was reset); an API gateway has room for
#: far more. The kernel caps it at ``net.core.somaxconn``.
_LISTEN_BACKLOG = 1024


class SimulatorServer:
    """``async with SimulatorServer(config) as sim:`` serves on ``sim.url`` until the block ends."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.state = SimulatorState(self.config)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> SimulatorServer:
        # access_log=None: no per-request logging, the request log in ``state`` is the record.
        runner = web.AppRunner(
            build_app(self.state, self.config),
            access_log=None,
            shutdown_timeout=self.config.shutdown_timeout_s,
        )
        await runner.setup()
        try:
            site = TcpSite(runner, self.config.host, self.config.port, backlog=_LISTEN_BACKLOG)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.state.stopping.clear()
        # Port 0 binds a free port atomically; read back which one.
        host, port = runner.addresses[0][:2]
        self.url = f"http://{_url_host(str(host))}:{port}"
        return self

    async def stop(self) -> None:
        """Release hung requests, then close the listener and every connection; idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.state.stopping.set()
        await runner.cleanup()

    async def __aenter__(self) -> SimulatorServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run_simulator(config: SimulatorConfig, ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled; ``ready(url)`` is called once the port accepts connections."""
    async with SimulatorServer(config) as sim:
        if ready is not None:
            ready(sim.url)
        await asyncio.Event().wait()
