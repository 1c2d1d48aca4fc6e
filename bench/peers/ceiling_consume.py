"""Ceiling A: a bare aiokafka consumer reading the backlog, no processing, no group, no commits.

Prints one JSON line: ``{"count", "elapsed_s", "rate"}``, timed from the first fetch (right after
the seek to the beginning) to the arrival of the last record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiokafka import AIOKafkaConsumer, TopicPartition


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=args.bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=1_114_112
    )
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(args.input) or set())
        while not partitions:
            await consumer.topics()
            await asyncio.sleep(0.05)
            partitions = sorted(consumer.partitions_for_topic(args.input) or set())
        consumer.assign([TopicPartition(args.input, p) for p in partitions])
        await consumer.seek_to_beginning()
        count, first = 0, time.perf_counter()
        last = first
        while count < args.expected:
            batches = await consumer.getmany(timeout_ms=500)
            got = sum(len(records) for records in batches.values())
            if got:
                last = time.perf_counter()
                count += got
            if time.perf_counter() - first > args.max_seconds:
                break
    finally:
        await consumer.stop()
    elapsed = last - first
    print(json.dumps({"count": count, "elapsed_s": elapsed, "rate": count / elapsed if elapsed > 0 else 0.0}))


if __name__ == "__main__":
    asyncio.run(main())
