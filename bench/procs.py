"""Processes the benchmark starts: the simulator, the measured subject, and samplers of CPU/RSS.

Each measured subject (the worker, a peer, the baseline, a ceiling) is its own OS process, so
its CPU seconds and peak RSS are its own: ``psutil`` samples the PID every ``interval_s`` in a
thread of the harness, and the kernel's ``VmHWM`` (peak RSS) is read just before it is stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from bench.stats import Sample

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@dataclass(slots=True)
class Usage:
    samples: list[Sample] = field(default_factory=list)
    peak_rss_bytes: int = 0
    exit_code: int | None = None
    stop_s: float = 0.0  # from SIGTERM to exit
    killed: bool = False  # did not exit within the timeout after SIGTERM


class Sampler:
    """Samples one PID's CPU time and RSS in a background thread until ``stop()``."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self._proc = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.usage = Usage()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _sample(self) -> None:
        with self._proc.oneshot():
            cpu = self._proc.cpu_times()
            rss = self._proc.memory_info().rss
        self.usage.samples.append(Sample(time.time(), cpu.user + cpu.system, rss))
        self.usage.peak_rss_bytes = max(self.usage.peak_rss_bytes, rss, _vm_hwm(self._proc.pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self._sample()
            self._stop.wait(self._interval_s)

    def stop(self) -> Usage:
        """Take a last sample (the process must still be alive for it) and stop the thread."""
        with contextlib.suppress(psutil.Error):
            self._sample()
        self._stop.set()
        self._thread.join(timeout=5)
        return self.usage


class Bystanders:
    """Samples the processes that share the machine with a subject during its run: the simulator,
    the broker and this harness (the backlog's producer, the outcomes' reader).

    A subject's throughput here is bounded by the two cores that all of them share, so the report
    shows their CPU per event next to the subject's own.
    """

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self._samplers = {name: Sampler(pid).start() for name, pid in pids.items() if pid is not None}

    def stop(self) -> dict[str, Usage]:
        return {name: sampler.stop() for name, sampler in self._samplers.items()}


def _vm_hwm(pid: int) -> int:
    """The kernel's peak resident set size of ``pid`` (Linux), 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return 0


class Subject:
    """A measured process: started with ``cmd`` and ``env``, sampled, stopped with SIGTERM."""

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Subject:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        self.sampler = Sampler(self.proc.pid).start()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> Usage:
        """Last sample, then SIGTERM (SIGKILL after ``timeout_s``); returns what was sampled."""
        assert self.proc is not None
        assert self.sampler is not None
        usage = self.sampler.stop()
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            # The high-water mark keeps being read until the process is gone: the drain after
            # SIGTERM is part of the worker's life, and of its peak memory.
            while self.proc.poll() is None and time.monotonic() - started < timeout_s:
                usage.peak_rss_bytes = max(usage.peak_rss_bytes, _vm_hwm(self.proc.pid))
                time.sleep(0.05)
            if self.proc.poll() is None:
                usage.killed = True
                self.proc.kill()
                self.proc.wait(timeout=10)
        usage.stop_s = time.monotonic() - started
        usage.exit_code = self.proc.returncode
        if self._log is not None:
            self._log.close()
        return usage

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class SimulatorProcess:
    """``bench/simulator_proc.py`` as a child process; steered through its ``/_sim`` admin API."""

    def __init__(self, ak: str, sk: str, log_path: Path) -> None:
        self._ak, self._sk = ak, sk
        self._log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self._err: IO[str] | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> SimulatorProcess:
        cmd = [sys.executable, str(BENCH / "simulator_proc.py"), "--ak", self._ak, "--sk", self._sk]
        self._err = open(self._log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        # its URL, the first line it prints; wait for it at most timeout_s (EOF if it died first)
        printed, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline().strip() if printed else ""
        if not line.startswith("http"):
            self.stop()
            raise RuntimeError(f"the simulator did not start: {self._log_path.read_text()[-2000:]}")
        self.url = line
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exit_code(self) -> int | None:
        """None while it runs; its exit code (negative: killed by that signal) once it has died."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, chars: int = 600) -> str:
        try:
            return self._log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def reset(self, latency_ms: float) -> None:
        """Forget every ticket and log, then set the injected API latency."""
        self._admin("POST", "/_sim/reset", {})
        self._admin("PUT", "/_sim/faults", {"latency_ms": latency_ms})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("GET", "/_sim/stats")
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._err is not None:
            self._err.close()
            self._err = None
