"""``coc-worker``'s own error handling: a bad input is a one-line message and an exit code."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
from pathlib import Path

import pytest
import trustme
from pki import encrypted_key

from worker.cli import _YOUNG_THRESHOLD, _freeze_heap_when_started, _settings_from, build_parser, main
from worker.errors import BrokerUnavailable, ConfigError, JobCrashed, KafkaClientStopped
from worker.logs import REDACTED, redact_text
from worker.settings import SECRET_FIELDS


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


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--error-ratio", "2"], "error_ratio: Input should be less than or equal to 1"),
        (["--seed-file", "SEED"], "seed.tickets.0.ticket_id: Field required"),
    ],
)
def test_simulator_settings_out_of_shape_are_a_message_not_a_traceback(
    args: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = tmp_path / "tickets.json"
    seed.write_text('{"tickets": [{"id": "CM1"}]}')
    assert main(["simulate", "--port", "0", *(str(seed) if a == "SEED" else a for a in args)]) == 2
    err = capsys.readouterr().err
    assert named in err
    assert "Traceback" not in err


def test_a_dedup_url_with_a_password_is_refused_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command line shows in `ps` and shell history; the environment does not."""
    assert main(["run", "--dedup-url", "redis://:pw-0123456789@redis:6379/0"]) == 2
    err = capsys.readouterr().err
    assert "COC_WORKER_DEDUP_URL" in err
    assert "pw-0123456789" not in err


def test_the_redis_password_is_no_flag_and_its_file_is_checked_as_the_environment_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--dedup-redis-password`` would show in ``ps`` and shell history: refused with where it goes,
    the value never repeated. Its file's path is no secret: a flag, under the same rules (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        main(["run", "--dedup-redis-password", "hunter2-redis-pw"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "set COC_WORKER_DEDUP_REDIS_PASSWORD in the environment" in err
    assert "COC_WORKER_DEDUP_REDIS_PASSWORD_FILE" in err
    assert "hunter2" not in err
    path = tmp_path / "redis-password"
    path.write_text("hunter2-redis-pw", encoding="utf-8")
    args = ["run", "--dedup-redis-password-file", str(path), "--dedup-url", f"sqlite:///{tmp_path}/d.sqlite3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "COC_WORKER_DEDUP_REDIS_PASSWORD_FILE is the Redis dedup store's password" in err
    assert "hunter2" not in err


def test_once_started_the_heap_is_frozen_and_cyclic_garbage_is_still_collected() -> None:
    """The worker raises the young generation's threshold once it has started (``cli``): the
    collector must still run by itself when cyclic garbage piles up, or memory would grow."""
    before = gc.get_threshold()
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collections.append(info["collected"])

    async def started_worker() -> None:
        started = asyncio.Event()
        started.set()
        await _freeze_heap_when_started(started)

    try:
        asyncio.run(started_worker())
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == _YOUNG_THRESHOLD > before[0]
        gc.callbacks.append(count)
        for _ in range(_YOUNG_THRESHOLD):  # two objects that keep each other alive, dropped
            a: list[object] = []
            a.append([a])
        assert collections, "no collection ran by itself"
        assert sum(collections) > 0
    finally:
        if count in gc.callbacks:
            gc.callbacks.remove(count)
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize("name", SECRET_FIELDS)
@pytest.mark.parametrize(
    "command",
    [["run"], ["send", "started"], ["ingest"], ["outcomes", "tail"], ["dlq", "list"], ["dlq", "replay"]],
)
def test_a_secret_given_as_a_flag_is_refused_without_repeating_it(
    name: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret on a command line shows in ``ps`` and shell history. ``--api-sk VALUE`` was taken
    as an abbreviation of ``--api-sk-file`` (an error about a missing file, the secret in the
    shell's history); on a command without the flag argparse's error printed the value."""
    value = "hunter2-" + name
    for flag in (["--" + name.replace("_", "-"), value], [f"--{name.replace('_', '-')}={value}"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, *flag])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"COC_WORKER_{name.upper()}_FILE" in err
        assert value not in err


def test_an_unknown_flags_value_is_not_repeated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--ingest-tokens", "hunter2-token", "--port=0", "--sk-secret=hunter3"])
    err = capsys.readouterr().err
    assert "--ingest-tokens --sk-secret (values not repeated)" in err
    assert "hunter2" not in err
    assert "hunter3" not in err


@pytest.mark.parametrize("command", [["run"], ["demo"]])
def test_an_unknown_flags_value_that_starts_with_a_dash_is_not_repeated(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret may start with "-": after a mistyped flag it was repeated as if it were one."""
    with pytest.raises(SystemExit):
        main([*command, "--kafka-sasl-passwrd", "-Hunter2-token", "--x=-Hunter3"])
    err = capsys.readouterr().err
    assert "--kafka-sasl-passwrd --x (values not repeated)" in err
    assert "Hunter" not in err


def test_flags_are_not_abbreviated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--max-in-fl", "8"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_run_help_says_where_the_secrets_go() -> None:
    """The help named none of the five variables, so a user reading it could not find where the SK goes."""
    text = build_parser().format_help() + subcommand_help("run")
    for name in SECRET_FIELDS:
        assert f"COC_WORKER_{name.upper()}" in text.replace("\n", " ")


def test_run_help_gives_each_settings_default_and_allowed_values() -> None:
    """Outside the Helm chart an operator had no place to find most defaults (the README names
    only the main ones: the unreachable threshold's 10 s, the lease's 30 s were nowhere)."""
    text = " ".join(subcommand_help("run").split())

    def help_of(flag: str) -> str:  # the last mention: the first is the usage line's
        return text.rsplit(flag, 1)[1].split(" --", 1)[0]

    assert "Default: 10.0." in help_of("--api-unreachable-threshold-s API_UNREACHABLE_THRESHOLD_S")
    assert "Default: 30.0." in help_of("--dedup-lease-s DEDUP_LEASE_S")
    assert "One of: PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL. Default: PLAINTEXT." in help_of(
        "--kafka-security-protocol KAFKA_SECURITY_PROTOCOL"
    )
    assert "Default: false." in help_of("--create-topics, --no-create-topics")


def subcommand_help(command: str) -> str:
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main([command, "--help"])
    return out.getvalue()


def test_schema_needs_a_directory(capsys: pytest.CaptureFixture[str]) -> None:
    """Without one it wrote into the installed package: site-packages, a read-only image's
    filesystem, or a checkout's tracked files."""
    with pytest.raises(SystemExit) as exited:
        main(["schema"])
    assert exited.value.code == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["outcomes", "tail"], ["dlq", "list"]])
def test_the_tools_take_a_client_certificate_and_name_one_that_does_not_load(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Behind a broker that requires client certificates the tools had no flag for one; one that
    does not load is a configuration error naming its variable, never the key's password."""
    worker = trustme.CA().issue_cert("coc-worker.clients.test")
    certfile, keyfile, password_file = tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "pw"
    certfile.write_bytes(worker.cert_chain_pems[0].bytes())
    keyfile.write_bytes(encrypted_key(worker, "the-right-one"))
    password_file.write_text("hunter2-key-password\n", encoding="utf-8")  # not the key's
    flags = ["--kafka-security-protocol", "SSL", "--kafka-bootstrap-servers", "127.0.0.1:1"]
    flags += ["--kafka-ssl-certfile", str(certfile), "--kafka-ssl-keyfile", str(keyfile)]
    assert main([*command, *flags, "--kafka-ssl-key-password-file", str(password_file)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "coc-worker: configuration error: COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE: does not open the"
        " encrypted key in COC_WORKER_KAFKA_SSL_KEYFILE (a wrong password, or a damaged key)\n"
    )
    absent = tmp_path / "absent.crt"
    assert main([*command, *flags[:4], "--kafka-ssl-certfile", str(absent)]) == 2
    assert f"COC_WORKER_KAFKA_SSL_CERTFILE={absent}: cannot read it" in capsys.readouterr().err


def flag_help(argv: list[str], flag: str) -> str:
    """The help of ``flag`` (its last mention: the first is the usage line's) in ``argv --help``."""
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main([*argv, "--help"])
    return " ".join(out.getvalue().split()).rsplit(flag, 1)[1].split(" --", 1)[0]


@pytest.mark.parametrize(
    "command", [["send"], ["validate"], ["outcomes", "tail"], ["dlq", "list"], ["dlq", "replay"]]
)
def test_the_tools_help_gives_the_log_level_they_run_at(command: list[str]) -> None:
    """The tools log at WARNING unless a level is set (their output is on stdout): their help said
    INFO, the worker's default."""
    assert "Default: WARNING." in flag_help(command, "--log-level LOG_LEVEL")
    for server in (["run"], ["ingest"]):  # these log at the setting's own default
        assert "Default: INFO." in flag_help(server, "--log-level LOG_LEVEL")


@pytest.mark.parametrize("command", [["run"], ["send"], ["dlq", "list"]])
def test_an_optional_settings_help_names_its_allowed_values(command: list[str]) -> None:
    """``--kafka-sasl-mechanism`` (optional: no default) named none of the three it takes."""
    text = flag_help(command, "--kafka-sasl-mechanism KAFKA_SASL_MECHANISM")
    assert "One of: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512." in text
    assert "Default" not in text


def test_a_dedup_url_naming_an_acl_user_without_a_password_is_taken_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``redis://user@host``, the password in COC_WORKER_DEDUP_REDIS_PASSWORD, is how the README
    names an ACL user; ``--dedup-url`` refused any ``@``."""
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD", "hunter2-redis-pw")
    url = "redis://coc-worker@redis:6379/0"
    assert _settings_from(build_parser().parse_args(["run", "--dedup-url", url])).dedup_url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://coc-worker:pw-0123456789@redis:6379/0",
        "rediss://:pw-0123456789@redis:6379/0",
        "redis://coc-worker:@redis:6379/0",  # an empty password is one too
        "redis://:pw-01234/56789@redis:6379/0",  # the unencoded "/" moves the "@" into the path
        "redis://:pw-01234?56789@redis:6379/0",
        "redis://:pw-01234#56789@redis:6379/0",
        "redis://:pw-01234@56789@redis:6379/0",
        "redis://pw-01234@56789@redis:6379/0",
        # a user part alone with no password given apart: a password written where the user goes
        # is likelier than a nopass ACL user (the settings take it so: ``secret_values``)
        "redis://pw-0123456789@redis:6379/0",
    ],
)
def test_a_dedup_url_that_may_hold_a_password_is_still_refused_on_the_command_line(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("COC_WORKER_DEDUP_REDIS_PASSWORD", "COC_WORKER_DEDUP_REDIS_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--dedup-url", url]) == 2
    err = capsys.readouterr().err
    assert "COC_WORKER_DEDUP_URL" in err
    assert "COC_WORKER_DEDUP_REDIS_PASSWORD" in err
    assert "56789" not in err


SK = "hunter2-sk-0123456789"


class _FailingWorker:
    """Stands in for ``worker.app.Worker``: its run ends on ``error`` (before ``started``: the
    heap of this process stays unfrozen)."""

    error: Exception

    def __init__(self, settings: object) -> None:
        self.started = asyncio.Event()

    def stop(self) -> None:
        pass

    async def run(self) -> None:
        raise self.error


@pytest.fixture
def failing_worker(monkeypatch: pytest.MonkeyPatch) -> type[_FailingWorker]:
    """``coc-worker run`` on ``_FailingWorker``, with no signal handlers: the event loop's would
    stay installed in this process after it closed (SIGTERM and Ctrl-C to a closed loop)."""
    monkeypatch.setenv("COC_WORKER_API_SK", SK)
    monkeypatch.setattr("worker.app.Worker", _FailingWorker)
    monkeypatch.setattr("worker.cli._stop_on_signals", lambda stop: None)
    return _FailingWorker


@pytest.mark.parametrize(
    ("error", "code", "kind"),
    [
        (KafkaClientStopped(f"the Kafka producer's sender ended (KafkaError {SK}): restart"), 1, None),
        (JobCrashed("a job ended without an outcome (KeyError) at coc.change-events/3 offset 7"), 1, None),
        (
            BrokerUnavailable("the broker: no answer within COC_WORKER_STARTUP_WAIT_S=120 s"),
            1,
            "broker_unavailable",
        ),
        (ConfigError("COC_WORKER_INPUT_TOPIC: the broker refuses to create it"), 2, None),
    ],
)
def test_an_error_that_ends_the_worker_is_logged_as_its_last_line_at_error_level(
    error: Exception,
    code: int,
    kind: str | None,
    failing_worker: type[_FailingWorker],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With JSON logs the last structured line of a worker that exits 1 (its Kafka clients stopped,
    a job crashed, the startup wait ran out) was ``worker_stopped`` at info, which reads as a clean
    stop: only a plain line on stderr said otherwise. It says so, redacted, and the plain line stays."""
    monkeypatch.setattr(failing_worker, "error", error, raising=False)
    assert main(["run", "--log-format", "json", "--dedup-url", "memory://"]) == code
    err = capsys.readouterr().err
    assert SK not in err
    *lines, plain = err.splitlines()
    assert plain.startswith("coc-worker: ")
    assert lines, "no log line before the plain one"
    last = json.loads(lines[-1])
    assert last["event"] == "worker_failed"
    assert last["level"] == "error"
    assert last["error"] == type(error).__name__
    assert last["exit_code"] == code
    assert last["detail"] == redact_text(str(error))
    assert last.get("kind") == kind


def test_a_bug_that_ends_the_worker_is_logged_too_and_keeps_its_traceback(
    failing_worker: type[_FailingWorker], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(failing_worker, "error", RuntimeError(f"unexpected {SK}"), raising=False)
    with pytest.raises(RuntimeError):
        main(["run", "--log-format", "json", "--dedup-url", "memory://"])
    (line,) = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert line["event"] == "worker_failed"
    assert (line["level"], line["error"], line["exit_code"]) == ("error", "RuntimeError", 1)
    assert line["detail"] == f"unexpected {REDACTED}"
