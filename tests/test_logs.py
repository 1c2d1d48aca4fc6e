"""The log redactor: a secret never reaches a log line, whatever form or path it takes there."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from worker.health import HealthServer
from worker.logs import _Repeats, configure, get_logger, register_secrets
from worker.metrics import Metrics
from worker.settings import WorkerSettings


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure("INFO", "json", out)
    yield out
    configure()


def test_a_secret_in_a_nested_field_a_repr_or_an_exception_is_redacted(log_output: io.StringIO) -> None:
    """Only the top-level string fields were checked: a secret inside a dict or a list, or in a
    repr with its quotes or non-ASCII characters escaped, came out as it was."""
    quotes, accented = "Tok'en\"Secret-1", "Geheim-Tök3n-2"
    register_secrets([quotes, accented])
    log = get_logger("test")
    log.warning("nested", field={"k": quotes}, items=[accented], data=accented.encode())
    try:
        {}[quotes]
    except KeyError:
        log.exception("failed")
    output = log_output.getvalue()
    assert [json.loads(line)["event"] for line in output.splitlines()] == ["nested", "failed"]
    for fragment in ("Secret-1", "k3n-2", "\\xc3\\xb6k3n"):
        assert fragment not in output


@pytest.mark.parametrize("renderer", ["json", "console"])
def test_a_secret_with_an_apostrophe_inside_a_repr_that_escapes_it_is_redacted(renderer: str) -> None:
    """Python writes ``'`` as ``\\'`` in a repr of text that also holds a ``"`` (a KeyError's
    message, a list of strings), and the console's repr of a field escapes that again: a password
    with an apostrophe came out in both."""
    secret = "Pass'word-Secret-3"
    register_secrets([secret])
    out = io.StringIO()
    configure("INFO", renderer, out)
    try:
        log = get_logger("test")
        try:
            raise KeyError(f'credentials "{secret}" refused')
        except KeyError:
            log.exception("probe_crashed")
        log.warning("fetch_failed", detail=str([f'user "{secret}"']))
        logging.getLogger("aiokafka").warning("conn %r", f'pw="{secret}"')
    finally:
        configure()
    output = out.getvalue()
    assert output.count("probe_crashed") == 1
    assert "word-Secret-3" not in output


async def test_a_request_the_http_server_cannot_parse_is_logged_without_its_text(
    log_output: io.StringIO,
) -> None:
    """aiohttp logs a malformed request with the raw header line: a bearer token the redactor has
    not been told of (another service's, or one just rotated into the tokens file) was written out
    in clear."""
    server = HealthServer(
        WorkerSettings(api_endpoint="http://127.0.0.1:1", api_ak="a", api_sk="sk-0123456789", http_port=0),
        Metrics().registry,
        lambda: {},
    )
    await server.start()
    try:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer unregistered-token-1\x01\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # the server answers 400 and closes
        writer.close()
    finally:
        await server.stop()
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    output = log_output.getvalue()
    assert "unregistered-token-1" not in output
    assert "BadHttpMessage" in output or "InvalidHeader" in output  # the failure is still logged


def test_a_library_log_line_carries_a_timestamp(log_output: io.StringIO) -> None:
    """aiokafka's and aiohttp's lines (heartbeats failed, connections lost) had no time, so they
    could not be placed beside the worker's own."""
    logging.getLogger("aiokafka.consumer.group_coordinator").warning("Heartbeat failed for group %s", "g")
    get_logger("test").warning("ours")
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["Heartbeat failed for group g", "ours"]
    stamps = [datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")) for line in lines]
    assert all(abs(datetime.now(UTC) - stamp) < timedelta(minutes=1) for stamp in stamps)


def test_a_library_line_repeated_is_shown_once_per_window_then_counted(log_output: io.StringIO) -> None:
    """With the broker away aiokafka wrote 60-75 errors a second (1,875 lines in 30 s), burying the
    worker's own lines about the outage. Lines of one template about different partitions or
    nodes are different lines; the window runs on a clock that does not step back."""
    [repeats] = [f for f in logging.getLogger().handlers[0].filters if isinstance(f, _Repeats)]
    now = [1000.0]
    repeats._clock = lambda: now[0]
    library = logging.getLogger("aiokafka.conn")
    for _ in range(50):
        library.error("Unable connect to node with id %s: %s", 111, "refused")
    library.error("Unable connect to node with id %s: %s", 112, "refused")  # another node: shown
    library.warning("Heartbeat failed for group %s", "g")  # another line: shown
    now[0] += 11  # past the 10 s window
    library.error("Unable connect to node with id %s: %s", 111, "refused")
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    assert [(line["event"], line.get("not_shown")) for line in lines] == [
        ("Unable connect to node with id 111: refused", None),
        ("Unable connect to node with id 112: refused", None),
        ("Heartbeat failed for group g", None),
        ("Unable connect to node with id 111: refused", 49),
    ]
