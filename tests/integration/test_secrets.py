"""Secrets never appear in logs, outcomes, DLQ records or metrics, whatever happens in a run."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
from conftest import AK, SK
from helpers import event, read_records, send
from test_process import worker_env

from worker.sandbox import TansuBroker
from worker.simulator import SimulatorServer

TOKEN = "tok-never-printed-9f8e7d6c"


async def test_no_secret_in_any_output(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, tmp_path: Path, unique: str
) -> None:
    env = worker_env(broker, topics, simulator, tmp_path, f"sec-{unique}")
    env["COC_WORKER_API_SK"] = SK  # given directly this time, not as a file
    del env["COC_WORKER_API_SK_FILE"]
    env["COC_WORKER_HTTP_PORT"] = "0"
    secrets = [SK, env["COC_WORKER_KAFKA_SASL_PASSWORD"]]
    # a rejected event, an invalid one carrying the SK in its body, and a 401 storm in between
    inputs = [
        event("change.ended", "CM-SEC", "s1"),  # refused: the sub-ticket was never started
        b'{"event_id": "leak", "type": "change.started", "ticket_id": "' + SK.encode() + b'/x"}',
        event("change.started", "CM-SEC", "s2"),
    ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        simulator.state.revoke(True)
        await send(broker.bootstrap, topics["input"], inputs)
        await simulator.state.wait_for(lambda: simulator.state.status_counts["401"] >= 2, 30)
        simulator.state.revoke(False)
        outcomes = await read_records(broker.bootstrap, topics["results"], len(inputs), timeout_s=60)
        dead = await read_records(broker.bootstrap, topics["dlq"], 2, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert len(outcomes) == len(inputs)
    everything = [output]
    for record in outcomes + dead:
        everything.append(record.value or b"")
        everything.extend(value for _, value in record.headers)
    # the invalid message's own bytes carry the SK (a producer's mistake): the DLQ keeps the
    # message as it was, so search the DLQ *headers* and everything else, not that value
    leaked_value = next(r for r in dead if r.value and SK.encode() in r.value)
    everything.remove(leaked_value.value)
    blob = b"\n".join(everything)
    for secret in secrets:
        assert secret.encode() not in blob, "a secret leaked"
    assert b"api_auth" in output  # the 401 storm was logged, without the credentials


async def test_metrics_and_status_carry_no_secret(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, tmp_path: Path, unique: str
) -> None:
    env = worker_env(broker, topics, simulator, tmp_path, f"sec2-{unique}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    seen: list[bytes] = []
    try:
        port = await asyncio.wait_for(_http_port(proc, seen), 30)
        await send(broker.bootstrap, topics["input"], [event("change.started", "CM-M", "s1")])
        await read_records(broker.bootstrap, topics["results"], 1)
        async with aiohttp.ClientSession() as http:
            bodies = []
            for path in ("/metrics", "/readyz", "/healthz"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    bodies.append(await resp.text())
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = "\n".join(bodies) + b"".join(seen).decode() + output.decode()
    for secret in (SK, AK, env["COC_WORKER_KAFKA_SASL_PASSWORD"]):
        assert secret not in text


async def _http_port(proc: asyncio.subprocess.Process, seen: list[bytes]) -> int:
    """Read the worker's log until it says which port its HTTP server took."""
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise AssertionError("the worker exited before starting: " + b"".join(seen).decode()[-2000:])
        seen.append(line)
        if line.startswith(b"{"):
            entry = json.loads(line)
            if entry.get("event") == "worker_started":
                return int(entry["http_port"])
