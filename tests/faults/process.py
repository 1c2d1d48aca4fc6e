"""The real worker as a subprocess (``python -m worker run``): start, SIGTERM, SIGKILL, watch.

Its output (JSON log lines, stdout and stderr together) goes to a file per process, so a long run
costs the test loop nothing and the evidence survives the test. ``/readyz`` is read over HTTP on
the port the worker logged at start; RSS is sampled with ``psutil``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

import aiohttp
import psutil

_POLL_S = 0.05


class WorkerProcess:
    """One worker process lifetime (a restart is a new object); ``spawn()`` starts it and waits for HTTP."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.http_port: int | None = None
        self.started_at = 0.0
        self.peak_rss = 0
        self._rss_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> WorkerProcess:
        assert self.proc is None, "a WorkerProcess runs once; restart with a new one"
        with _fresh(self.log_path) as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker",
                "run",
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        self.started_at = time.monotonic()
        self._rss_task = asyncio.create_task(self._sample_rss(), name=f"rss-{self.name}")
        return self

    async def wait_started(self, timeout_s: float = 60.0) -> int:
        """Wait for the ``worker_started`` log line; returns the operations HTTP port."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.events("worker_started"):
                if isinstance(line.get("http_port"), int):
                    self.http_port = line["http_port"]
                    return self.http_port
            if not self.alive:
                raise AssertionError(f"{self.name} exited with {self.returncode()}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start within {timeout_s}s:\n{self.tail()}")
            await asyncio.sleep(_POLL_S)

    async def spawn(self) -> WorkerProcess:
        """Start the process and wait until it serves HTTP."""
        await self.start()
        await self.wait_started()
        return self

    async def ready(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]] | None:
        """``(status, body)`` of ``/readyz``, or None when the process does not answer."""
        if self.http_port is None or not self.alive:
            return None
        try:
            async with session.get(
                f"http://127.0.0.1:{self.http_port}/readyz", timeout=aiohttp.ClientTimeout(total=2)
            ) as response:
                return response.status, await response.json()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_assigned(self, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        """Wait until the worker reports at least one assigned partition."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = await self.ready(session)
            if answer is not None and answer[1].get("assigned"):
                return
            if not self.alive:
                raise AssertionError(f"{self.name} exited with {self.returncode()}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} got no partitions within {timeout_s}s:\n{self.tail()}")
            await asyncio.sleep(_POLL_S * 2)

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"{self.name} did not exit within {timeout_s}s:\n{self.tail()}") from None
        finally:
            await self._stop_sampling()
        return rc

    async def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the exit code."""
        self.terminate()
        return await self.wait(timeout_s)

    async def ensure_dead(self) -> None:
        if self.alive:
            self.kill()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 10)
        await self._stop_sampling()

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    # --- output -------------------------------------------------------------------------------------
    def text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.text().splitlines():
            if raw.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(raw))
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    # --- memory -------------------------------------------------------------------------------------
    async def _sample_rss(self, every_s: float = 0.1) -> None:
        try:
            ps = psutil.Process(self.pid)
            while self.alive:
                with contextlib.suppress(psutil.Error):
                    self.peak_rss = max(self.peak_rss, ps.memory_info().rss)
                await asyncio.sleep(every_s)
        except psutil.Error:
            return

    async def _stop_sampling(self) -> None:
        task, self._rss_task = self._rss_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _fresh(path: Path) -> IO[bytes]:
    return open(path, "wb")
