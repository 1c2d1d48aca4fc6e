"""The ``coc-worker`` command line. Nothing in the package imports this module.

Every setting of ``WorkerSettings`` is also a flag of ``run`` (``--max-in-flight 64`` overrides
``COC_WORKER_MAX_IN_FLIGHT``); flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.errors import CocWorkerError, ConfigError
from worker.logs import configure
from worker.settings import SECRET_FIELDS, WorkerSettings, load_settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also COC_WORKER_<NAME>)")
    for name, field in WorkerSettings.model_fields.items():
        if name in SECRET_FIELDS:
            continue  # secrets on a command line end up in `ps` and shell history: env or *_FILE only
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _settings_from(args: argparse.Namespace) -> WorkerSettings:
    overrides = {name: getattr(args, name, None) for name in WorkerSettings.model_fields}
    return load_settings(**overrides)


# --- commands ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    configure(settings.log_level, settings.log_format)
    from worker.app import Worker  # imported late: `coc-worker schema` must not need a broker client

    async def main() -> None:
        worker = Worker(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(main())
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.export import write_all

    for path in write_all(Path(args.out)) if args.out else write_all():
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return asyncio.run(run_demo(verbose=args.verbose))


_FAULT_FLAGS = (
    "error_ratio",
    "throttle_ratio",
    "retry_after_s",
    "latency_ms",
    "latency_jitter_ms",
    "spike_ratio",
    "spike_ms",
    "hang_ratio",
    "hang_s",
    "drop_ratio",
    "drop_after_apply_ratio",
)


def _add_simulator_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443, help="0 picks a free port")
    parser.add_argument("--ak", default="demo-ak", help="access key the simulator accepts")
    parser.add_argument("--sk", default="demo-sk-0123456789", help="its secret key (a simulator default)")
    parser.add_argument("--token", action="append", default=[], help="also accept this X-Auth-Token")
    parser.add_argument("--seed-file", type=Path, help='JSON {"tickets": [{"ticket_id", "sub_tickets"}]}')
    parser.add_argument("--auto-create", action="store_true", help="create unknown tickets on first sight")
    parser.add_argument("--rng-seed", type=int, default=0)
    faults = parser.add_argument_group("injected faults (ratios are per-request probabilities)")
    for name in _FAULT_FLAGS:
        faults.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None)


def cmd_simulate(args: argparse.Namespace) -> int:
    import json

    from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

    configure("INFO", "auto")
    faults = {name: getattr(args, name) for name in _FAULT_FLAGS if getattr(args, name) is not None}
    seed = json.loads(args.seed_file.read_text(encoding="utf-8")) if args.seed_file else None
    config = SimulatorConfig(
        host=args.host,
        port=args.port,
        credentials={args.ak: args.sk},
        tokens=set(args.token),
        auto_create=args.auto_create,
        seed=seed,
        faults=FaultConfig(**faults),
        rng_seed=args.rng_seed,
    )

    def ready(url: str) -> None:
        print(f"COC API simulator listening on {url} (admin: {url}/_sim/stats)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_simulator(config, ready=ready))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coc-worker", description="Apply Kafka change events to the COC change-ticket API."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume change events and apply them (the worker)")
    _add_settings_flags(run)
    run.set_defaults(func=cmd_run)

    schema = sub.add_parser("schema", help="write the JSON Schemas of the contract")
    schema.add_argument("--out", default=None, help="directory (default: the package's schemas/json)")
    schema.set_defaults(func=cmd_schema)

    demo = sub.add_parser("demo", help="broker + simulator + worker + a scripted scenario, then exit")
    demo.add_argument("--verbose", action="store_true", help="show the worker's log lines")
    demo.set_defaults(func=cmd_demo)

    simulate = sub.add_parser("simulate", help="run the COC API simulator")
    _add_simulator_flags(simulate)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Any = args.func(args)
    except ConfigError as exc:
        print(f"coc-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    except CocWorkerError as exc:
        print(f"coc-worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
