"""``coc-worker validate``: every error with file and JSON path; exit 0 only when all files are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.cli import main
from worker.tools.validate import IngressLimits, check_document

GOOD = {"event_id": "e1", "type": "change.started", "ticket_id": "CM1", "sub_ticket_id": "s1"}


def test_one_event_or_a_batch() -> None:
    assert check_document(json.dumps(GOOD).encode(), 1 << 20) == (1, [])
    batch = [GOOD, {**GOOD, "sub_ticket_id": None}, {**GOOD, "extra": 1, "type": "change.exploded"}]
    count, errors = check_document(json.dumps(batch).encode(), 1 << 20)
    assert count == 3
    assert [path for path, _ in errors] == ["$[1].sub_ticket_id", "$[2]"]
    assert errors[1][1].startswith("type must be one of: change.started")
    assert check_document(b"[]", 1 << 20) == (0, [("$", "an empty array holds no event")])
    assert check_document(b"{nope", 1 << 20)[1][0][1].startswith("bad_json:")
    size = len(json.dumps(GOOD, separators=(",", ":")))
    assert check_document(json.dumps(GOOD).encode(), 64) == (
        1,
        [("$", f"event is {size} bytes, the limit is 64")],
    )


def test_a_file_the_ingress_would_refuse_is_not_valid() -> None:
    """Before, a 501-event array or a 2 MiB body was 'ok', then answered 413 by the ingress."""
    batch = json.dumps([GOOD, {**GOOD, "event_id": "e2"}, {**GOOD, "event_id": "e3"}]).encode()
    assert check_document(batch, 1 << 20, IngressLimits(1 << 20, 3)) == (3, [])
    assert check_document(batch, 1 << 20, IngressLimits(1 << 20, 2)) == (
        3,
        [("$", "3 events; the ingress takes at most 2 per request")],
    )
    assert check_document(batch, 1 << 20, IngressLimits(100, 3)) == (
        3,
        [("$", f"{len(batch)} bytes; the ingress takes at most 100 per request")],
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name, content in {
        "good.json": json.dumps([GOOD, {**GOOD, "event_id": "e2", "type": "change.ended"}]),
        "bad.json": json.dumps({**GOOD, "ticket_id": "a/b", "result": {}}),
    }.items():
        (tmp_path / name).write_text(content)
        paths[name] = str(tmp_path / name)
    return paths


def test_command_exit_codes_and_lines(
    files: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["validate", files["good.json"]]) == 0
    assert capsys.readouterr().out == f"{files['good.json']}: ok (2 events)\n"
    assert main(["validate", files["good.json"], "--ingest-max-batch", "1"]) == 1
    assert (
        capsys.readouterr().out
        == f"{files['good.json']}: $: 2 events; the ingress takes at most 1 per request\n"
    )
    assert main(["validate", files["good.json"], files["bad.json"], "/nonexistent.json"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": ok (2 events)")
    assert f"{files['bad.json']}: $.ticket_id: String should match pattern '^[A-Za-z0-9_-]{{1,64}}$'" in lines
    assert (
        f"{files['bad.json']}: $.result: change.started takes no result (only change.succeeded, change.failed, change.cancelled take it)"
        in lines
    )
    assert lines[-1] == "/nonexistent.json: $: cannot read /nonexistent.json: No such file or directory"
