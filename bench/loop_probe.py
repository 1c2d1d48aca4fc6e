"""How much of the paced latency is the broker round trip, and how much the event loop's load?

A diagnostic, not part of ``make bench``. In one process, on a fresh Tansu: a paced producer
writes ``--rate`` records/s for 10 s; a consumer (the worker's fetch settings) answers each record
with an ``acks=all`` produce, after burning ``--burn-ms`` of CPU on the event loop in four slices
with an ``await`` between them (the shape of the worker's stages). It prints, from the input
record's timestamp, when the record was fetched and when its answer was acknowledged, p50/p99::

    python bench/loop_probe.py --rate 555 --burn-ms 0 1.0

With no burn it is the floor of the paced scenario on this machine; with the worker's loop CPU
per event it reproduces the worker's paced p99 (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scenarios import PARTITIONS
from bench.stats import percentile
from bench.workload import produce_paced
from worker.sandbox import TansuBroker, create_topics

DURATION_S = 10.0


def _burn(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def probe(rate: float, burn_s: float) -> tuple[list[float], list[float]]:
    count = int(rate * DURATION_S)
    fetched: list[float] = []
    acked: list[float] = []
    with TansuBroker() as broker:
        await create_topics(broker.bootstrap, ["in", "out"], partitions=PARTITIONS)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        answers = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=2)
        await consumer.start()
        # Assigned, as the benchmark's other readers are: no group to join before reading live.
        consumer.assign([TopicPartition("in", p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        await answers.start()
        pending: set[asyncio.Task[None]] = set()

        async def answer(key: bytes | None, value: bytes | None, stamp_ms: int) -> None:
            for _ in range(4):
                _burn(burn_s / 4)
                await asyncio.sleep(0)
            await (await answers.send("out", key=key, value=value))
            acked.append(time.time() * 1000 - stamp_ms)

        async def consume() -> None:
            while len(fetched) < count:
                batches = await consumer.getmany(timeout_ms=1000, max_records=256)
                for records in batches.values():
                    for r in records:
                        fetched.append(time.time() * 1000 - r.timestamp)
                        task = asyncio.create_task(answer(r.key, r.value, r.timestamp))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)

        try:
            reader = asyncio.create_task(consume())
            records = [(f"t{i % 1000}".encode(), b"x" * 400) for i in range(count)]
            await produce_paced(broker.bootstrap, "in", records, rate)  # the benchmark's own producer
            await asyncio.wait_for(reader, 60)
        finally:
            await consumer.stop()
            await answers.stop()
    return fetched, acked


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=555.0, help="records per second")
    parser.add_argument("--burn-ms", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    for burn_ms in args.burn_ms:
        fetched, acked = asyncio.run(probe(args.rate, burn_ms / 1000))
        print(
            f"rate {args.rate:.0f}/s, loop CPU {burn_ms:.2f} ms per record: "
            f"fetched p50/p99 {_p50_p99(fetched)} ms, answer acknowledged p50/p99 {_p50_p99(acked)} ms"
        )


def _p50_p99(values: list[float]) -> str:
    return "/".join(f"{percentile(values, q) or 0:.1f}" for q in (50, 99))


if __name__ == "__main__":
    main()
