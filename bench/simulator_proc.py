"""Run the COC API simulator in its own process and print its URL on the first stdout line.

The benchmark runs the simulator here, not in its own event loop, so that the simulator's work does
not compete with the measured process's event loop (they still share the machine's cores).
``python bench/simulator_proc.py --ak AK --sk SK --latency-ms 20`` prints ``http://127.0.0.1:PORT``.
Faults can be changed between scenarios through the admin API (``PUT /_sim/faults``,
``POST /_sim/reset``). It keeps no logs (one entry each) and freezes its start-up heap: a
test double that stalls for its own garbage collector is not a "0 ms" API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.simulator import FaultConfig, SimulatorConfig, run_simulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ak", required=True)
    parser.add_argument("--sk", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    config = SimulatorConfig(
        port=args.port,
        credentials={args.ak: args.sk},
        auto_create=True,
        faults=FaultConfig(latency_ms=args.latency_ms),
        # The benchmark reads counters only: logs of one entry keep the heap, and with it the
        # garbage collector's full passes, small (with every change kept, passes of 20-70 ms
        # stalled every answer behind them: the "0 ms" API's p99 was ~30 ms, 5 ms without them).
        request_log_size=1,
        applied_log_size=1,
    )

    def ready(url: str) -> None:
        # What is alive once it listens (modules, the app) lives for the whole benchmark: out
        # of the collector's passes, as the worker does with its own (worker/cli.py).
        gc.collect()
        gc.freeze()
        print(url, flush=True)

    # On uvloop, as the worker runs: the simulator shares the machine's two cores with what it
    # measures, and asyncio's own loop cost it ~10-20% more CPU per request.
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_simulator(config, ready=ready))


if __name__ == "__main__":
    main()
