"""1,000 hostile messages through the running worker: each is one `invalid` outcome + one DLQ record."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import aiohttp
from conftest import SettingsFactory, running_worker
from helpers import event, read_json, read_records, send
from waiting import until

from schemas.outcomes import OutcomeEvent
from worker.sandbox import TansuBroker, produce
from worker.simulator import SimulatorServer

sys.path.insert(0, str(Path(__file__).parents[1]))
from hostile import hostile_corpus


async def test_hostile_corpus_through_the_worker(
    broker: TansuBroker, topics: dict[str, str], simulator: SimulatorServer, make_settings: SettingsFactory
) -> None:
    corpus = hostile_corpus(1000)
    assert len(corpus) >= 1000
    async with running_worker(make_settings()) as worker:
        await produce(broker.bootstrap, topics["input"], [(b"hostile", blob, None) for _, blob in corpus])
        outcomes = await read_json(broker.bootstrap, topics["results"], len(corpus), timeout_s=120)
        dead = await read_records(broker.bootstrap, topics["dlq"], len(corpus), timeout_s=60)
        # still healthy: a valid event afterwards is applied
        follow_up = event("change.started", "CM-AFTER", "s1")
        await send(broker.bootstrap, topics["input"], [follow_up])
        everything = await read_json(broker.bootstrap, topics["results"], len(corpus) + 1)
        await until(lambda: worker.ready, 10, 0.02, what="readiness")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{worker.http_port}/healthz") as resp,
        ):
            assert resp.status == 200
    assert len(outcomes) == len(corpus)
    for o in outcomes:
        OutcomeEvent.model_validate(o)
        assert list(o) == list(OutcomeEvent.model_fields)
    assert len(dead) == len(corpus)
    assert Counter(o["status"] for o in outcomes) == {"invalid": len(corpus)}
    assert all(o["reason"] and o["error_msg"] for o in outcomes if o["reason"] != "empty")
    # one DLQ record per outcome, pointing back at the same input message
    dlq_sources = sorted(
        (int(r.header("coc-dlq-source-partition") or -1), int(r.header("coc-dlq-source-offset") or -1))
        for r in dead
    )
    assert dlq_sources == sorted((o["source"]["partition"], o["source"]["offset"]) for o in outcomes)
    # the results topic has several partitions: the follow-up's outcome need not be read last
    after = [o for o in everything if o["event_id"] == follow_up["event_id"]]
    assert [o["status"] for o in after] == ["applied"]
    # nothing hostile ever reached the API: only the follow-up was requested
    assert [r["path"] for r in simulator.state.request_dicts()] == ["/v1/change/tickets/CM-AFTER"]
    assert json.dumps(outcomes).count("etc/passwd") == 0
