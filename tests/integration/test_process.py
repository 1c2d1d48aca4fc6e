"""`coc-worker run` as a real process: signals, exit codes, logs, secrets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import AK, SK
from helpers import event, read_json, send

from worker.sandbox import TansuBroker, committed_offsets
from worker.simulator import SimulatorServer

SASL_PASSWORD = "kafka-password-never-printed"


def worker_env(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, tmp_path: Path, group: str
) -> dict[str, str]:
    sk_file = tmp_path / "sk"
    sk_file.write_text(SK + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COC_WORKER_")}
    env.update(
        {
            "COC_WORKER_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "COC_WORKER_INPUT_TOPIC": topics["input"],
            "COC_WORKER_RESULTS_TOPIC": topics["results"],
            "COC_WORKER_DLQ_TOPIC": topics["dlq"],
            "COC_WORKER_GROUP_ID": group,
            "COC_WORKER_API_ENDPOINT": simulator.url,
            "COC_WORKER_API_AK": AK,
            "COC_WORKER_API_SK_FILE": str(sk_file),
            "COC_WORKER_DEDUP_URL": f"sqlite:///{tmp_path}/dedup.sqlite3",
            "COC_WORKER_HTTP_PORT": "0",
            "COC_WORKER_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "COC_WORKER_KAFKA_HEARTBEAT_INTERVAL_MS": "300",
            "COC_WORKER_KAFKA_FETCH_MAX_WAIT_MS": "20",
            "COC_WORKER_COMMIT_INTERVAL_S": "0.2",
            "COC_WORKER_LOG_LEVEL": "DEBUG",
            # a secret that must never show up, even though it is unused with PLAINTEXT
            "COC_WORKER_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        }
    )
    return env


async def start_worker(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_sigterm_drains_commits_and_exits_zero(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, tmp_path: Path, unique: str
) -> None:
    simulator.state.set_faults(latency_ms=30)
    group = f"proc-{unique}"
    stream = [event("change.started", f"CMP{n:03d}", "s1") for n in range(60)]
    await send(broker.bootstrap, topics["input"], stream)
    # at most 16 taken at a time: SIGTERM comes while most of the stream is still in Kafka
    flags = ("--max-in-flight", "16", "--max-buffered", "16")
    proc = await start_worker(worker_env(broker, topics, simulator, tmp_path, group), *flags)
    try:
        await simulator.state.wait_for(lambda: len(simulator.state.applied_log) >= 10, 30)
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode()[-2000:]
    text = output.decode()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "worker_stopping" in events
    # the process runs on uvloop with the lost-write adapter (worker/loop.py), not a plain loop
    (started,) = (line for line in lines if line["event"] == "worker_started")
    assert started["event_loop"] == "worker.loop.Loop"
    assert events[-1] == "worker_stopped"
    # every line about a message names it fully
    assert sum(line["event"] == "event_applied" for line in lines) >= 10
    for line in lines:
        if line["event"] in ("event_applied", "event_invalid", "event_duplicate"):
            assert {"event_id", "ticket_id", "topic", "partition", "offset"} <= line.keys()
    for secret in (SK, SASL_PASSWORD):
        assert secret not in text
    # what was applied has an outcome and is committed; nothing past it is committed
    applied = len(simulator.state.applied_log)
    assert 10 <= applied < len(stream)
    outcomes = await read_json(broker.bootstrap, topics["results"], applied)
    assert len(outcomes) == applied
    committed = await committed_offsets(broker.bootstrap, group, topics["input"], 4)
    done: dict[int, set[int]] = {}
    for o in outcomes:
        done.setdefault(o["source"]["partition"], set()).add(o["source"]["offset"])
    for partition, position in committed.items():
        finished = done.get(partition, set())
        assert all(offset in finished for offset in range(max(position, 0)))
    assert sum(max(p, 0) for p in committed.values()) == applied


@pytest.mark.parametrize(
    ("env_change", "message"),
    [
        ({"COC_WORKER_MAX_IN_FLIGHT": "0"}, "COC_WORKER_MAX_IN_FLIGHT"),
        ({"COC_WORKER_DEDUP_URL": "mysql://x"}, "COC_WORKER_DEDUP_URL"),
        ({"COC_WORKER_API_ENDPOINT": "ftp://x"}, "COC_WORKER_API_ENDPOINT"),
    ],
)
async def test_invalid_settings_stop_the_process_naming_the_setting(
    broker: TansuBroker,
    topics: dict[str, str],
    simulator: SimulatorServer,
    tmp_path: Path,
    env_change: dict[str, str],
    message: str,
) -> None:
    env = worker_env(broker, topics, simulator, tmp_path, "g")
    env.update(env_change)
    proc = await start_worker(env)
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert message in output.decode()
    assert SASL_PASSWORD not in output.decode()
