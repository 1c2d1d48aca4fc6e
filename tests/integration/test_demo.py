"""``make demo``: the quick start's first command, run in-process against its own broker and simulator."""

from __future__ import annotations

from typing import Any

import pytest

import worker.demo as demo


async def test_the_demo_runs_its_scenario_and_burst(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left in the user's shell, these pointed the demo's worker at SASL, or stopped it.
    monkeypatch.setenv("COC_WORKER_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("COC_WORKER_NOT_A_SETTING", "x")
    assert await demo.run_demo() == 0
    out = capsys.readouterr().out
    assert out.count(" applied    1 ") == 8  # status and calls columns
    assert "argo-cd (retry)  change.succeeded" in out
    assert " duplicate " in out
    assert "bad_json" in out
    assert "Dead-letter topic: 1 record(s)" in out
    assert "Burst: 900 events on 300 tickets" in out
    assert "Demo finished" in out


async def test_a_demo_whose_worker_cannot_finish_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It printed a partial table and "Demo finished", and exited 0."""
    own = demo.demo_settings

    def wrong_key(**values: Any) -> Any:  # the simulator refuses every call: the worker pauses
        return own(**{**values, "api_sk": "not-the-demo-sk-0123"})

    monkeypatch.setattr(demo, "demo_settings", wrong_key)
    monkeypatch.setattr(demo, "OUTCOMES_TIMEOUT_S", 3.0)
    assert await demo.run_demo() == 1
    captured = capsys.readouterr()
    assert "Demo incomplete: 1 of 10 outcomes within 3 s" in captured.err
    assert "Demo finished" not in captured.out
