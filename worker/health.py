"""The operations HTTP server: ``/healthz`` (alive), ``/readyz`` (ready to work), ``/metrics``.

``/readyz`` is 200 only while the worker has joined its group, the broker answers, and no
systemic failure has paused consumption; Kubernetes then stops counting a paused pod as ready.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worker.http_site import TcpSite
from worker.settings import WorkerSettings

#: How long a stop lets requests in progress finish.
_SHUTDOWN_TIMEOUT_S = 2.0


class HealthServer:
    def __init__(
        self,
        settings: WorkerSettings,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        extra_routes: list[web.RouteDef] | None = None,
        *,
        idle_timeout_s: float = 15.0,
    ) -> None:
        self._settings = settings
        self._idle_timeout_s = idle_timeout_s
        #: What ``/metrics`` shows: the worker's metrics, or only the ingress's when it runs alone.
        self._registry = registry
        self._status = status
        self._app = web.Application()
        self._app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics_handler),
                *(extra_routes or []),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        # A connection that sends nothing (or half a request) is closed after this long, instead of
        # aiohttp's hour: idle clients must not hold the worker's file descriptors.
        # A stop waits this long for requests in progress (aiohttp's 60 s outlasted the pod's
        # termination grace: an ingress POST waits up to 30 s for a broker that is gone).
        self._runner = web.AppRunner(
            self._app,
            access_log=None,
            keepalive_timeout=self._idle_timeout_s,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await self._runner.setup()
        site = TcpSite(self._runner, self._settings.http_host, self._settings.http_port)
        await site.start()
        self.port = site.port  # the bound one when the setting is 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, _: web.Request) -> web.Response:
        status = self._status()
        return web.json_response(status, status=200 if status.get("ready") else 503)

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response
