"""Ceiling B: bare signed aiohttp PUTs against the simulator, at a given concurrency.

The same events as the backlog (regenerated from the same seed), mapped to the same request
bodies ahead of time and signed per request with the worker's signer. Each ticket's requests go
in order (so the simulator's state machine accepts them all, as it does the worker's), at most
``--concurrency`` at a time over all tickets. Prints one JSON line:
``{"count", "elapsed_s", "rate", "statuses"}``; ``count`` and ``rate`` are of 2xx answers only.

``--client pyreqwest`` sends them with the worker's own HTTP client library instead of aiohttp, and
``--loop uvloop`` runs on the worker's event loop: not the issue's ceiling B (aiohttp), an
experiment on how much of the worker's ratio its cheaper client and loop are worth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.workload import Workload, generate
from schemas.events import CHANGE_EVENT_ADAPTER
from worker.mapping import request_path, request_wire
from worker.signing import sign


def requests_by_ticket(workload: Workload) -> dict[str, list[tuple[str, bytes, str]]]:
    """ticket -> [(path, body, event_id)] in event order."""
    out: dict[str, list[tuple[str, bytes, str]]] = {}
    for _, value in generate(workload):
        event = CHANGE_EVENT_ADAPTER.validate_json(value)
        body = json.dumps(request_wire(event), separators=(",", ":")).encode()
        out.setdefault(event.ticket_id, []).append((request_path(event.ticket_id), body, event.event_id))
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--tickets", type=int, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--client", choices=("aiohttp", "pyreqwest"), default="aiohttp")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    return parser.parse_args()


def accepted(statuses: Counter[int]) -> int:
    """The answers that count: a refusal (a bad signature, a step out of order) is cheaper than a
    change, and counted it made the ceiling look faster (the report names any such status)."""
    return sum(n for status, n in statuses.items() if 200 <= status < 300)


async def main(args: argparse.Namespace) -> None:
    if args.client == "pyreqwest":
        send = await _pyreqwest_sender(args.concurrency)
    else:
        send = None
    ak, sk = os.environ["BENCH_API_AK"], os.environ["BENCH_API_SK"]
    host = urlsplit(args.api).netloc
    plan = requests_by_ticket(Workload(args.events, args.tickets, args.seed))
    gate = asyncio.Semaphore(args.concurrency)
    statuses: Counter[int] = Counter()
    deadline = [0.0]

    async def run_ticket(session: aiohttp.ClientSession, requests: list[tuple[str, bytes, str]]) -> None:
        for path, body, event_id in requests:
            async with gate:
                if time.perf_counter() > deadline[0]:
                    return
                headers = sign(
                    ak=ak,
                    sk=sk,
                    method="PUT",
                    host=host,
                    path=path,
                    headers={"Content-Type": "application/json;charset=UTF-8", "X-Event-Id": event_id},
                    body=body,
                )
                if send is not None:
                    statuses[await send(args.api + path, body, headers)] += 1
                    continue
                async with session.put(args.api + path, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline[0] = started + args.max_seconds
        await asyncio.gather(*(run_ticket(session, reqs) for reqs in plan.values()))
        elapsed = time.perf_counter() - started
    count = accepted(statuses)
    print(
        json.dumps(
            {
                "count": count,
                "elapsed_s": elapsed,
                "rate": count / elapsed if elapsed > 0 else 0.0,
                "statuses": {str(k): v for k, v in statuses.items()},
            }
        )
    )


async def _pyreqwest_sender(concurrency: int) -> Callable[[str, bytes, dict[str, str]], Awaitable[int]]:
    """A PUT on pyreqwest, as the worker's client sends one (its bookkeeping left out)."""
    from pyreqwest.client import ClientBuilder

    client = ClientBuilder().max_connections(concurrency).error_for_status(False).build()

    async def send(url: str, body: bytes, headers: dict[str, str]) -> int:
        response = await client.request("PUT", url).headers(headers).body_bytes(body).build().send()
        await response.bytes()
        return int(response.status)

    return send


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.loop == "uvloop":
        import uvloop

        uvloop.run(main(parsed))
    else:
        asyncio.run(main(parsed))
