"""``coc-worker``'s own error handling: a bad input is a one-line message and an exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.cli import main


def test_a_missing_file_is_a_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--port", "0", "--seed-file", "/nonexistent/tickets.json"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "coc-worker: No such file or directory: /nonexistent/tickets.json"


def test_a_seed_file_that_is_not_json_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = tmp_path / "tickets.json"
    seed.write_text("{not json")
    assert main(["simulate", "--port", "0", "--seed-file", str(seed)]) == 2
    assert "--seed-file" in capsys.readouterr().err


def test_a_dedup_url_with_a_password_is_refused_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command line shows in `ps` and shell history; the environment does not."""
    assert main(["run", "--dedup-url", "redis://:pw-0123456789@redis:6379/0"]) == 2
    err = capsys.readouterr().err
    assert "COC_WORKER_DEDUP_URL" in err
    assert "pw-0123456789" not in err
