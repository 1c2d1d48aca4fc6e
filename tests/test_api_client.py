"""The API client over real HTTP: every answer classified into the error tree, signed afresh, measured.

Most cases run against the COC API simulator; the few statuses it cannot produce (403, 404 from
the gateway, 408, 501, odd 2xx bodies, ``Retry-After`` on a 503) come from a tiny stub server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from egress_proxy import clear_proxy_env, serving_proxy
from multidict import CIMultiDict
from pyreqwest import exceptions as http_errors
from services import service_missing
from structlog.testing import capture_logs

from schemas.api import SUCCESS_CODE
from worker import api_client as api_client_module
from worker import signing
from worker.api_client import (
    ApiResponse,
    CocApiClient,
    Credentials,
    _classify_transport_error,
    parse_retry_after,
)
from worker.errors import ApiAuthError, ApiRejected, ApiTransientError, CocWorkerError, ConfigError
from worker.http_site import TcpSite
from worker.logs import REDACTED, redact_text, register_secrets
from worker.metrics import Metrics
from worker.settings import WorkerSettings
from worker.simulator import SimulatorConfig, SimulatorServer
from worker.simulator.tickets import ILLEGAL_TRANSITION, TICKET_NOT_FOUND

AK = "AK-CLIENT-TEST-01"
SK = "sk-client-test-secret-0001"
TOKEN = "token-client-test-secret-0001"
SEED: dict[str, Any] = {"tickets": [{"ticket_id": "CM1", "sub_tickets": ["s-1", "s-2"]}]}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def change(action: str, sub: str = "s-1") -> bytes:
    return json.dumps({"history_info": {"action": action}, "sub_tickets": [{"ticket_id": sub}]}).encode()


START = change("change_start_change_success")
END = change("change_end_change_success")


def settings(url: str, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {"api_endpoint": url, "api_ak": AK, "api_sk": SK}
    values.update(overrides)
    return WorkerSettings(**values)


@contextlib.asynccontextmanager
async def running(config: WorkerSettings, metrics: Metrics | None = None) -> AsyncIterator[CocApiClient]:
    client = CocApiClient(config, metrics)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def put(client: CocApiClient, body: bytes = START, event_id: str = "ev-1") -> ApiResponse:
    return await client.update_ticket("CM1", body, event_id=event_id, traceparent=TRACEPARENT)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorConfig(credentials={AK: SK}, tokens={TOKEN}, seed=SEED)) as server:
        yield server


# --------------------------------------------------------------------------- a stub for the rest


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Stub:
    """Answers every request with ``status``/``body``/``headers`` and records what it received."""

    url: str = ""
    status: int = 200
    body: bytes = json.dumps({"provider_code": "049", "error_code": SUCCESS_CODE, "data": {}}).encode()
    headers: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def reply(self, status: int, payload: Any = None, raw: bytes | None = None, **headers: str) -> None:
        self.status = status
        self.body = raw if raw is not None else json.dumps(payload).encode()
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(Seen(request.method, request.rel_url.raw_path, CIMultiDict(request.headers), body))
        return web.Response(
            status=self.status, body=self.body, headers=self.headers, content_type="application/json"
        )


@contextlib.asynccontextmanager
async def serving(stub: Stub, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Stub]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stub.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = TcpSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        stub.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        yield stub
    finally:
        await runner.cleanup()


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    async with serving(Stub()) as server:
        yield server


def gom(code: str, msg: str | None = "refused") -> dict[str, Any]:
    return {"provider_code": "049", "error_code": code, "error_msg": msg}


# --------------------------------------------------------------------------- success and refusals


async def test_success_is_an_api_response(sim: SimulatorServer) -> None:
    async with running(settings(sim.url)) as client:
        response = await put(client, event_id="ev-ok")
    assert isinstance(response, ApiResponse)
    assert response.http_status == 200
    assert response.body.succeeded
    assert response.body.data is not None
    assert response.body.data["ticket_info"]["ticket_id"] == "CM1"
    assert response.latency_s > 0
    [applied] = sim.state.applied_log
    assert (applied["event_id"], applied["traceparent"], applied["sub_ticket_id"]) == (
        "ev-ok",
        TRACEPARENT,
        "s-1",
    )


async def test_illegal_transition_is_rejected_with_the_gom_code(sim: SimulatorServer) -> None:
    async with running(settings(sim.url)) as client:
        with pytest.raises(ApiRejected) as refused:
            await put(client, END)
    exc = refused.value
    assert (exc.http_status, exc.error_code) == (400, ILLEGAL_TRANSITION)
    assert exc.error_msg is not None
    assert "needs implementing" in exc.error_msg
    assert ILLEGAL_TRANSITION in exc.detail
    assert sim.state.applied_log == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_injected_5xx_is_transient(sim: SimulatorServer, status: int) -> None:
    sim.state.set_faults(error_ratio=1.0, error_statuses=[status])
    async with running(settings(sim.url)) as client:
        with pytest.raises(ApiTransientError) as failed:
            await put(client)
    exc = failed.value
    assert (exc.http_status, exc.error_code) == (status, f"GOM.00009{status}")
    # 500/502/504: the server or its gateway took the request in; the change may have been made
    assert (exc.retry_after_s, exc.ambiguous, exc.connect_failure) == (None, status != 503, False)


@pytest.mark.parametrize(("retry_after_s", "expected"), [(0.2, 0.2), (2, 2.0)])
async def test_throttle_is_transient_with_retry_after(
    sim: SimulatorServer, retry_after_s: float, expected: float
) -> None:
    sim.state.set_faults(throttle_ratio=1.0, retry_after_s=retry_after_s)
    async with running(settings(sim.url)) as client:
        with pytest.raises(ApiTransientError) as throttled:
            await put(client)
    exc = throttled.value
    assert (exc.http_status, exc.error_code, exc.retry_after_s) == (429, "APIGW.0308", expected)
    assert not exc.ambiguous
    assert sim.state.applied_log == []


async def test_wrong_secret_key_is_systemic(sim: SimulatorServer) -> None:
    async with running(settings(sim.url, api_sk="sk-not-the-right-one")) as client:
        with pytest.raises(ApiAuthError) as refused:
            await put(client)
    assert (refused.value.http_status, refused.value.error_code) == (401, "APIGW.0301")
    assert refused.value.kind == "api_auth"
    assert sim.state.applied_log == []


@pytest.mark.parametrize("auth", ["aksk", "token"])
async def test_revoked_credentials_are_systemic(sim: SimulatorServer, auth: str) -> None:
    config = settings(sim.url) if auth == "aksk" else WorkerSettings(api_endpoint=sim.url, api_token=TOKEN)
    sim.state.revoke()
    async with running(config) as client:
        with pytest.raises(ApiAuthError) as refused:
            await put(client)
    assert refused.value.http_status == 401


def _stub_cases() -> list[Any]:
    long_msg = "x" * 2000
    return [
        pytest.param(
            (403, {"error_code": "APIGW.0302", "error_msg": "forbidden"}, None, {}),
            ApiAuthError,
            {"http_status": 403, "error_code": "APIGW.0302"},
            id="403-auth",
        ),
        pytest.param(
            (404, gom(TICKET_NOT_FOUND, "no such ticket"), None, {}),
            ApiRejected,
            {"http_status": 404, "error_code": TICKET_NOT_FOUND, "error_msg": "no such ticket"},
            id="404-rejected",
        ),
        pytest.param(
            (400, None, b"<html>bad request</html>", {}),
            ApiRejected,
            {"http_status": 400, "error_code": None, "error_msg": None, "detail": "HTTP 400"},
            id="400-html",
        ),
        pytest.param(
            (501, gom("GOM.00009501", "not implemented"), None, {}),
            ApiRejected,
            {"http_status": 501, "error_code": "GOM.00009501"},
            id="501-rejected",
        ),
        pytest.param(
            (200, gom("GOM.00001234", long_msg), None, {}),
            ApiRejected,
            {"http_status": 200, "error_code": "GOM.00001234", "error_msg": "x" * 500},
            id="200-error-code",
        ),
        pytest.param(
            (200, None, b"<html>proxy page</html>", {}),
            ApiTransientError,  # accepted most likely, but unconfirmed: the ticket is read first
            {"http_status": 200, "error_code": None, "ambiguous": True},
            id="200-unreadable",
        ),
        pytest.param(
            # A forward proxy's refusal (HTTP_PROXY with an http:// endpoint): it was ApiRejected,
            # every event dead-lettered while the proxy's password was being rotated.
            (407, None, b"<html>proxy auth</html>", {"Proxy-Authenticate": 'Basic realm="egress"'}),
            ApiTransientError,
            {"http_status": 407, "error_code": None, "ambiguous": False, "connect_failure": True},
            id="407-proxy-never-sent",
        ),
        pytest.param(
            (408, None, b"", {}),
            ApiTransientError,
            {"http_status": 408, "error_code": None, "ambiguous": False, "connect_failure": False},
            id="408-transient",
        ),
        pytest.param(
            (502, None, b"<html>bad gateway</html>", {}),
            ApiTransientError,
            {"http_status": 502, "error_code": None, "retry_after_s": None, "ambiguous": True},
            id="502-html",
        ),
        pytest.param(
            (503, gom("GOM.00009503"), None, {"Retry-After": "7"}),
            ApiTransientError,
            {"http_status": 503, "error_code": "GOM.00009503", "retry_after_s": 7.0, "ambiguous": False},
            id="503-retry-after",
        ),
        pytest.param(
            (500, gom("GOM.00009500"), None, {"Retry-After": "7"}),
            ApiTransientError,
            {"http_status": 500, "retry_after_s": None, "ambiguous": True},
            id="500-retry-after-ignored",
        ),
        pytest.param(
            (429, {"error_code": "APIGW.0308"}, None, {}),
            ApiTransientError,
            {"http_status": 429, "retry_after_s": None},
            id="429-without-retry-after",
        ),
        pytest.param(
            (429, {"error_code": "APIGW.0308"}, None, {"Retry-After": "soon"}),
            ApiTransientError,
            {"http_status": 429, "retry_after_s": None},
            id="429-unreadable-retry-after",
        ),
    ]


@pytest.mark.parametrize(("answer", "error", "fields"), _stub_cases())
async def test_statuses_the_simulator_cannot_produce(
    stub: Stub, answer: tuple[int, Any, bytes | None, dict[str, str]], error: type, fields: dict[str, Any]
) -> None:
    status, payload, raw, headers = answer
    stub.reply(status, payload, raw, **headers)
    async with running(settings(stub.url)) as client:
        with pytest.raises(CocWorkerError) as caught:
            await put(client)
    assert type(caught.value) is error
    assert {name: getattr(caught.value, name) for name in fields} == fields
    assert len(stub.seen) == 1


async def test_an_echoed_secret_is_scrubbed_before_the_text_is_cut_and_a_code_must_look_like_one(
    stub: Stub,
) -> None:
    """A proxy echoing a long token: the text was cut to 500 characters first, so the redactor no
    longer recognised the token and ~460 of its characters went into the outcome and the dead
    letter. And error_code went out as the answer gave it."""
    token = "iam-token-" + "Q" * 1200
    echoed = "your request carried X-Auth-Token " + token + " which is not valid here"
    stub.reply(400, {"error_code": "BAD:" + token[:40], "error_msg": echoed}, None)
    async with running(settings(stub.url, api_ak=None, api_sk=None, api_token=token)) as client:
        with pytest.raises(ApiRejected) as refused:
            await put(client)
    assert refused.value.error_msg is not None
    assert "QQQQ" not in refused.value.error_msg
    assert REDACTED in refused.value.error_msg
    assert refused.value.error_code == "unparseable"
    assert "QQQQ" not in str(refused.value)


async def test_an_echoed_request_signature_is_scrubbed(stub: Stub) -> None:
    """A 400 quoting the request's Authorization header: its signature authorises that request
    for 15 minutes and went into the outcome, the dead letter and the log as the API wrote it."""
    signature = "0123456789abcdef" * 4
    echoed = (
        f"bad request; Authorization: SDK-HMAC-SHA256 Access={AK}, SignedHeaders=host, Signature={signature}"
    )
    stub.reply(400, {"error_code": "COC.400", "error_msg": echoed}, None)
    async with running(settings(stub.url)) as client:
        with pytest.raises(ApiRejected) as refused:
            await put(client)
    assert refused.value.error_msg is not None
    assert refused.value.error_msg.endswith("Signature=" + REDACTED)
    assert signature not in str(refused.value)


def test_the_redactor_knows_encoded_forms_and_replaces_longer_secrets_first() -> None:
    register_secrets(["p@ss/w0rd+x"])
    assert redact_text("url: redis://:p%40ss%2Fw0rd%2Bx@h") == "url: redis://:" + REDACTED + "@h"
    assert redact_text("lower: p%40ss%2fw0rd%2bx") == "lower: " + REDACTED
    assert redact_text('json: "p@ss\\/w0rd+x"') == 'json: "' + REDACTED + '"'
    # Twelve secrets, each the start of the next: in any other order than longest first, a shorter
    # one is replaced inside a longer one and leaves the rest of it readable.
    nested = ["nested-secret-" + "x" * n for n in range(12)]
    register_secrets(nested)
    assert redact_text("auth " + nested[-1] + "!") == "auth " + REDACTED + "!"


async def test_retry_after_as_an_http_date(stub: Stub) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    stub.reply(429, {"error_code": "APIGW.0308"}, None, Retry_After=format_datetime(when, usegmt=True))
    async with running(settings(stub.url)) as client:
        with pytest.raises(ApiTransientError) as throttled:
            await put(client)
    assert throttled.value.retry_after_s is not None
    assert 28.0 <= throttled.value.retry_after_s <= 30.0


# --------------------------------------------------------------------------- the network


async def test_connection_refused_is_a_connect_failure() -> None:
    async with running(settings(f"http://127.0.0.1:{closed_port()}")) as client:
        with pytest.raises(ApiTransientError) as failed:
            await put(client)
    exc = failed.value
    assert (exc.connect_failure, exc.ambiguous, exc.http_status) == (True, False, None)
    # the innermost cause: a refused connection reads apart from a name not found or a TLS failure
    assert exc.detail.startswith("cannot connect to the API (")
    assert "refused" in exc.detail.lower()


async def test_a_hung_request_times_out_ambiguously(sim: SimulatorServer) -> None:
    """The request timeout (0.2 s here) ends a request the API never answers. The client's total
    timeout is connect + request timeout: a 30 s connect timeout puts it far from the bound below,
    which then tells the two apart while leaving a loaded machine 100 times the request timeout."""
    sim.state.set_faults(hang_ratio=1.0)
    config = settings(sim.url, api_request_timeout_s=0.2, api_connect_timeout_s=30.0, dedup_lease_s=120.0)
    started = time.monotonic()
    async with running(config) as client:
        with pytest.raises(ApiTransientError) as failed:
            await put(client)
    assert 0.19 <= time.monotonic() - started < 20.0
    exc = failed.value
    assert (exc.ambiguous, exc.connect_failure, exc.http_status) == (True, False, None)
    assert "in time" in exc.detail


async def test_a_dropped_connection_is_ambiguous_and_not_resent(sim: SimulatorServer) -> None:
    sim.state.set_faults(drop_ratio=1.0)
    async with running(settings(sim.url)) as client:
        with pytest.raises(ApiTransientError) as failed:
            await put(client)
    assert (failed.value.ambiguous, failed.value.connect_failure) == (True, False)
    assert [(r.method, r.fault) for r in sim.state.requests] == [("PUT", "drop")]


async def test_drop_after_apply_is_ambiguous_and_sent_exactly_once(sim: SimulatorServer) -> None:
    sim.state.set_faults(drop_after_apply_ratio=1.0)
    async with running(settings(sim.url)) as client:
        with pytest.raises(ApiTransientError) as failed:
            await put(client, event_id="ev-amb")
    assert failed.value.ambiguous
    # aiohttp's hidden re-send of an idempotent PUT would show as a second request here.
    assert [(r.method, r.error_code, r.fault) for r in sim.state.requests] == [
        ("PUT", SUCCESS_CODE, "drop_after_apply")
    ]
    assert [e["event_id"] for e in sim.state.applied_log] == ["ev-amb"]


@dataclass
class DropsThenCancels(Stub):
    """Closes each connection unanswered, then cancels ``caller`` once the HTTP client's own thread
    has had time to meet the closed connection: the loop thread is held meanwhile, as on a loaded
    machine, so the request's error is ready when the cancellation reaches its await."""

    caller: asyncio.Task[Any] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.close()  # the socket is closed on the loop's next step

        def held_then_cancelled() -> None:
            time.sleep(0.05)  # not a wait for anything: the loop held while the client's thread reads
            assert self.caller is not None
            self.caller.cancel()

        asyncio.get_running_loop().call_soon(held_then_cancelled)
        return web.Response()


async def test_a_request_cancelled_as_its_connection_drops_ends_cancelled() -> None:
    """pyreqwest hands a cancellation to its Rust future, which ends with the request's own outcome
    when that is ready in the same poll: the cancellation was lost. A job cancelled by a revoke or a
    stop just as its PUT's connection dropped went on as if nothing had happened (it read the ticket
    and retried for its whole budget) while the revoke or stop waited for it. About half of these
    tries ended with the dropped connection's error instead; each must end cancelled."""
    async with serving(DropsThenCancels()) as stub, running(settings(stub.url)) as client:
        ends = []
        for _ in range(20):
            stub.caller = asyncio.create_task(put(client))
            [end] = await asyncio.gather(stub.caller, return_exceptions=True)
            ends.append(type(end).__name__)
    assert ends == ["CancelledError"] * 20  # the stub cancels only a request that reached it


def _causes(*messages: str) -> dict[str, Any]:
    return {"causes": [{"message": m} for m in messages]}


_SENDING = "error sending request for url (http://127.0.0.1:1/v1/change/tickets/CM1)"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # As pyreqwest 0.15 reports them (recorded from the network tests above): its exception
        # class says "connect" for a request that was written and then lost, so only hyper's
        # Connect cause may make a failure safe to send again.
        (
            http_errors.ConnectError(
                "x", _causes(_SENDING, "client error (Connect)", "tcp connect error", "Connection refused")
            ),
            ("connect_error", True, False),
        ),
        (
            http_errors.ConnectTimeoutError(
                "x", _causes(_SENDING, "client error (Connect)", "operation timed out")
            ),
            ("connect_error", True, False),
        ),
        (
            http_errors.ConnectError(
                "x",
                _causes(_SENDING, "client error (SendRequest)", "connection closed before message completed"),
            ),
            ("disconnected", False, True),
        ),
        (
            http_errors.ConnectTimeoutError("x", _causes(_SENDING, "operation timed out")),
            ("timeout", False, True),
        ),
        (http_errors.ReadError("x", _causes(_SENDING, "connection reset")), ("disconnected", False, True)),
        (http_errors.ConnectError("x", _causes()), ("disconnected", False, True)),
        (http_errors.RequestPanicError("x", _causes()), ("client_error", False, True)),
    ],
)
def test_transport_errors_are_never_sent_only_when_hyper_says_connect(
    error: http_errors.PyreqwestError, expected: tuple[str, bool, bool]
) -> None:
    code, exc = _classify_transport_error(error)
    assert (code, exc.connect_failure, exc.ambiguous) == expected


async def test_calls_before_start_are_a_programming_error() -> None:
    client = CocApiClient(settings("http://127.0.0.1:1"))
    with pytest.raises(RuntimeError, match="start"):
        await put(client)


# --------------------------------------------------------------------------- authentication


async def test_every_attempt_is_signed_afresh(stub: Stub) -> None:
    async with running(settings(stub.url, api_domain_id="dom-1", api_project_id="proj-1")) as client:
        await put(client)
        await put(client)
    first, second = stub.seen
    assert first.headers["Authorization"] != second.headers["Authorization"]
    assert first.headers["X-Request-Id"] != second.headers["X-Request-Id"]
    for seen in stub.seen:
        assert seen.headers["Authorization"].startswith(f"SDK-HMAC-SHA256 Access={AK}, ")
        assert (seen.headers["X-Domain-Id"], seen.headers["X-Project-Id"]) == ("dom-1", "proj-1")
        assert "X-Auth-Token" not in seen.headers
        reason = signing.verify(
            secret_for={AK: SK},
            method=seen.method,
            path=seen.path,
            query=[],
            headers=seen.headers,
            body=seen.body,
            now=datetime.now(UTC),
        )
        assert reason is None


async def test_the_simulator_accepts_consecutive_signed_attempts(sim: SimulatorServer) -> None:
    async with running(settings(sim.url)) as client:
        await put(client, START)
        await put(client, END)
    assert [r.status for r in sim.state.requests] == [200, 200]
    assert sim.state.tickets["CM1"].sub_tickets["s-1"].state == "ended"


async def test_token_auth(sim: SimulatorServer, stub: Stub) -> None:
    async with running(WorkerSettings(api_endpoint=sim.url, api_token=TOKEN)) as client:
        assert (await put(client)).http_status == 200
    async with running(WorkerSettings(api_endpoint=stub.url, api_token=TOKEN)) as client:
        await put(client)
    [seen] = stub.seen
    assert seen.headers["X-Auth-Token"] == TOKEN
    assert "Authorization" not in seen.headers


@pytest.mark.parametrize(
    ("credentials", "variable"),
    [
        ({"api_ak": "AK WITH SPACE", "api_sk": SK}, "COC_WORKER_API_AK"),
        ({"api_token": "tok\u00e9n-0001"}, "COC_WORKER_API_TOKEN"),
    ],
)
def test_credentials_that_cannot_be_sent_refuse_to_build_a_client(
    credentials: dict[str, str], variable: str
) -> None:
    """Caught at start, not as a failed outcome for every event."""
    with pytest.raises(ConfigError, match=variable):
        CocApiClient(WorkerSettings(api_endpoint="http://127.0.0.1:1", **credentials))


def test_missing_credentials_refuse_to_build_a_client() -> None:
    with pytest.raises(ConfigError, match="COC_WORKER_API_AK"):
        CocApiClient(WorkerSettings(api_endpoint="http://127.0.0.1:1"))


async def test_credentials_are_re_read_from_their_files(sim: SimulatorServer, tmp_path: Path) -> None:
    sk_file = tmp_path / "sk"
    sk_file.write_text("sk-old-and-wrong\n")
    async with running(settings(sim.url, api_sk=None, api_sk_file=sk_file)) as client:
        with pytest.raises(ApiAuthError):
            await put(client)
        sk_file.write_text(SK + "\n")
        client.refresh_credentials()
        assert (await put(client)).http_status == 200


def test_a_rotated_secret_is_redacted_once_it_is_read(tmp_path: Path) -> None:
    """The redactor learns the secrets at start; one rotated later (a Kubernetes Secret) is a new
    value, registered when the client re-reads it, before any answer could echo it."""
    token_file = tmp_path / "token"
    token_file.write_text("token-before-rotation-0001")
    client = CocApiClient(WorkerSettings(api_endpoint="http://127.0.0.1:1", api_token_file=token_file))
    token_file.write_text("token-after-rotation-0002")
    client.refresh_credentials()
    assert redact_text("the API said: bad X-Auth-Token token-after-rotation-0002") == (
        "the API said: bad X-Auth-Token " + REDACTED
    )


def test_credentials_do_not_show_their_secrets() -> None:
    creds = Credentials.from_settings(
        WorkerSettings(
            api_endpoint="http://127.0.0.1:1", api_ak="AK-SHOWN-NOWHERE", api_sk="SK-SHOWN-NOWHERE"
        )
    )
    assert "SHOWN-NOWHERE" not in repr(creds)


# --------------------------------------------------------------------------- probe and detail


async def test_probe_raises_on_401_and_passes_on_an_unknown_ticket(sim: SimulatorServer) -> None:
    async with running(settings(sim.url)) as client:
        await client.probe("CM1")
        await client.probe("CM-UNKNOWN")
        sim.state.revoke()
        with pytest.raises(ApiAuthError):
            await client.probe("CM1")
        sim.state.revoke(False)
        sim.state.set_faults(error_ratio=1.0, error_statuses=[503])
        with pytest.raises(ApiTransientError):
            await client.probe("CM1")
    assert [(r.method, r.status) for r in sim.state.requests] == [
        ("GET", 200),
        ("GET", 400),  # no such ticket: the API answers, and accepts our credentials
        ("GET", 401),
        ("GET", 503),
    ]


async def test_probe_of_an_unreachable_api_is_a_connect_failure() -> None:
    async with running(settings(f"http://127.0.0.1:{closed_port()}")) as client:
        with pytest.raises(ApiTransientError) as failed:
            await client.probe("CM1")
    assert failed.value.connect_failure


async def test_show_ticket_returns_the_detail(sim: SimulatorServer, stub: Stub) -> None:
    async with running(settings(sim.url)) as client:
        await put(client)
        detail = await client.show_ticket("CM1")
        assert detail is not None
        assert detail["error_code"] == SUCCESS_CODE
        states = {sub["ticket_id"]: sub["state"] for sub in detail["data"]["sub_tickets"]}
        assert states == {"s-1": "implementing", "s-2": "pending"}
        missing = await client.show_ticket("CM-UNKNOWN")
        assert missing is not None
        assert missing["error_code"] == TICKET_NOT_FOUND
        sim.state.revoke()
        with pytest.raises(ApiAuthError):
            await client.show_ticket("CM1")
    stub.reply(200, None, b"not json")
    async with running(settings(stub.url)) as client:
        assert await client.show_ticket("CM1") is None
        stub.reply(200, ["a", "list"])
        assert await client.show_ticket("CM1") is None


# --------------------------------------------------------------------------- metrics and secrets


async def test_requests_are_counted_by_code_and_timed(sim: SimulatorServer) -> None:
    metrics = Metrics()
    async with running(settings(sim.url), metrics) as client:
        await put(client, START)
        for body in (START, START):
            with pytest.raises(ApiRejected):
                await put(client, body)
        sim.state.set_faults(error_ratio=1.0, error_statuses=[503])
        with pytest.raises(ApiTransientError):
            await put(client)
    async with running(settings(f"http://127.0.0.1:{closed_port()}"), metrics) as client:
        with pytest.raises(ApiTransientError):
            await put(client)

    def count(code: str) -> float | None:
        return metrics.registry.get_sample_value("coc_worker_api_requests_total", {"code": code})

    assert (count("200"), count("400"), count("503"), count("connect_error")) == (1.0, 2.0, 1.0, 1.0)
    assert metrics.registry.get_sample_value("coc_worker_api_request_seconds_count", {"method": "PUT"}) == 5.0
    assert metrics.registry.get_sample_value("coc_worker_api_request_seconds_count", {"method": "GET"}) == 0.0
    latency_sum = metrics.registry.get_sample_value("coc_worker_api_request_seconds_sum", {"method": "PUT"})
    assert latency_sum is not None
    assert latency_sum > 0


async def test_no_secret_in_errors_or_metrics(sim: SimulatorServer, stub: Stub) -> None:
    metrics = Metrics()
    wrong_sk = "sk-wrong-secret-value-0002"
    errors: list[BaseException] = []

    async def collect(config: WorkerSettings, body: bytes = START) -> None:
        async with running(config, metrics) as client:
            try:
                await put(client, body)
            except CocWorkerError as exc:
                errors.append(exc)

    await collect(settings(sim.url, api_sk=wrong_sk))
    await collect(WorkerSettings(api_endpoint=sim.url, api_token="token-wrong-secret-0003"))
    await collect(settings(sim.url), END)
    stub.reply(403, {"error_code": "APIGW.0302", "error_msg": "forbidden"})
    await collect(WorkerSettings(api_endpoint=stub.url, api_token=TOKEN))
    stub.reply(503, gom("GOM.00009503"), None, Retry_After="1")
    await collect(settings(stub.url))
    sim.state.set_faults(drop_ratio=1.0)
    await collect(settings(sim.url))
    await collect(settings(f"http://127.0.0.1:{closed_port()}"))
    try:
        CocApiClient(WorkerSettings(api_endpoint=sim.url))
    except ConfigError as exc:
        errors.append(exc)

    assert [type(e).__name__ for e in errors] == [
        "ApiAuthError",
        "ApiAuthError",
        "ApiRejected",
        "ApiAuthError",
        "ApiTransientError",
        "ApiTransientError",
        "ApiTransientError",
        "ConfigError",
    ]
    secrets = (SK, TOKEN, wrong_sk, "token-wrong-secret-0003")
    for error in errors:
        texts = [str(error), repr(error), *(repr(v) for v in vars(error).values())]
        assert error.__cause__ is None
        for secret in secrets:
            assert not any(secret in text for text in texts), (type(error).__name__, secret)
    rendered = metrics.render().decode()
    assert "coc_worker_api_requests_total" in rendered
    for secret in (*secrets, AK):
        assert secret not in rendered


# --------------------------------------------------------------------------- Retry-After parsing


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("120", 120.0),
        ("0.5", 0.5),
        ("-1", None),
        ("1e3", None),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        ("\u00b2", None),  # isdigit() but not a number float() reads
        ("Thu, 01 Jan 1970 00:01:40 GMT", 60.0),
        ("Thu, 01 Jan 1970 00:01:40 -0000", 60.0),
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),  # already past
        ("Thu, 41 Jan 1970 00:00:10 GMT", None),
        ("Mon, 01 Jan 2020 00:00:00 +99999999999999999999", None),  # was an OverflowError
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=40.0) == expected


def test_parse_retry_after_reads_minus_zero_as_utc_in_any_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    try:
        assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 -0000", now=40.0) == 60.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_parse_retry_after_uses_the_clock_by_default() -> None:
    when = datetime.now(UTC) + timedelta(seconds=100)
    parsed = parse_retry_after(format_datetime(when, usegmt=True))
    assert parsed is not None
    assert 98.0 <= parsed <= 100.0


# --------------------------------------------------------------------------- TLS


async def test_disabling_tls_verification_logs_a_warning() -> None:
    with capture_logs() as logs:
        async with running(settings("https://coc.example.com", api_verify_tls=False)):
            pass
    assert [(e["event"], e["log_level"]) for e in logs] == [("api_tls_verification_disabled", "warning")]
    with capture_logs() as logs:
        async with running(settings("https://coc.example.com")):
            pass
    assert logs == []


@dataclass(frozen=True)
class PrivateCa:
    """A private CA and a server certificate it signed for 127.0.0.1 (an internal API gateway)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCa:
    openssl = shutil.which("openssl")
    if openssl is None:
        service_missing("openssl (to make a test certificate)")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    made = PrivateCa(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server-key.pem")
    ca_key, csr = tmp_path / "ca-key.pem", tmp_path / "server.csr"
    steps = [
        ["req", "-x509", *ec, "-days", "1", "-subj", "/CN=test CA", "-keyout", ca_key, "-out", made.ca_cert],
        ["req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", made.server_key, "-out", csr],
        # A leaf (CA:FALSE) with the address as its name: verifiers refuse a CA certificate as a
        # server's own certificate.
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            made.ca_cert,
            "-CAkey",
            ca_key,
            "-days",
            "1",
            "-out",
            made.server_cert,
            "-extfile",
            "/dev/stdin",
        ],
    ]
    for step in steps:
        subprocess.run(
            [openssl, *map(str, step)],
            input=b"subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
            check=True,
            capture_output=True,
        )
    return made


async def test_tls_is_verified_against_the_configured_ca(private_ca: PrivateCa) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(private_ca.server_cert, private_ca.server_key)
    async with serving(Stub(), server_context) as stub:
        async with running(settings(stub.url)) as client:
            with pytest.raises(ApiTransientError) as untrusted:
                await put(client)
        assert untrusted.value.connect_failure
        assert stub.seen == []
        async with running(settings(stub.url, api_ca_file=private_ca.ca_cert)) as client:
            assert (await put(client)).http_status == 200
        with capture_logs():
            async with running(settings(stub.url, api_verify_tls=False)) as client:
                assert (await put(client)).http_status == 200
        assert len(stub.seen) == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "COC_WORKER_API_CA_FILE: cannot read it (No such file or directory"),
        (b"a gateway's CA, pasted as text\n", "COC_WORKER_API_CA_FILE: no PEM certificate in"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            "COC_WORKER_API_CA_FILE: not a valid PEM certificate (invalid peer certificate: BadEncoding)",
        ),
    ],
)
async def test_a_ca_file_the_client_cannot_use_is_a_configuration_error(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    """A broken PEM raised the HTTP client's own error (a traceback at start, no setting named), a
    file without a certificate was skipped without a word and every call failed to connect."""
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    client = CocApiClient(settings("https://127.0.0.1:1", api_ca_file=path))
    with pytest.raises(ConfigError) as refused:
        await client.start()
    assert str(refused.value).startswith(expected)


async def test_an_http_client_that_cannot_start_without_a_ca_file_names_no_ca_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any builder error was reported as a bad COC_WORKER_API_CA_FILE, set or not (on an image
    without the system's CA certificates the builder refuses to start)."""
    causes = [{"message": "builder error"}, {"message": "No CA certificates were loaded from the system"}]

    class Builder:
        def __getattr__(self, name: str) -> Any:
            if name == "build":
                raise http_errors.BuilderError("builder error", {"causes": causes})
            return lambda *args, **kwargs: self

    monkeypatch.setattr(api_client_module, "ClientBuilder", Builder)
    with pytest.raises(ConfigError) as refused:
        await CocApiClient(settings("https://127.0.0.1:1")).start()
    assert (
        str(refused.value) == "the API client cannot start (No CA certificates were loaded from the system)"
    )


# --------------------------------------------------------------------------- an egress proxy

PROXY_USER = "coc-worker"
PROXY_PASSWORD = "egress-proxy-password-0001"


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return clear_proxy_env(monkeypatch)


@pytest.mark.parametrize(
    ("scheme", "env", "expected"),
    [
        ("https", {"HTTPS_PROXY": "http://p:3128", "https_proxy": "http://q:3128"}, "HTTPS_PROXY"),
        ("https", {"https_proxy": "http://q:3128", "ALL_PROXY": "http://r:3128"}, "https_proxy"),
        ("https", {"HTTP_PROXY": "http://p:3128", "all_proxy": "http://r:3128"}, "all_proxy"),
        ("https", {"HTTP_PROXY": "http://p:3128", "HTTPS_PROXY": ""}, None),
        # Set but empty, the upper case still wins its pair: the lower case is not read.
        ("https", {"HTTPS_PROXY": "", "https_proxy": "http://q:3128"}, None),
        ("https", {"HTTPS_PROXY": "", "all_proxy": "http://r:3128"}, "all_proxy"),
        ("https", {"HTTPS_PROXY": "q:3128"}, "HTTPS_PROXY"),  # no scheme: http
        ("https", {"HTTPS_PROXY": "socks5h://q:1080"}, "HTTPS_PROXY"),
        ("https", {"HTTPS_PROXY": "ftp://q:21", "ALL_PROXY": "http://r:3128"}, "ALL_PROXY"),
        ("https", {"HTTPS_PROXY": "http://p:3128", "REQUEST_METHOD": "GET"}, None),
        ("https", {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": ".example.com"}, None),
        ("https", {"HTTPS_PROXY": "http://p:3128", "no_proxy": "api.example.com"}, None),
        ("https", {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "", "no_proxy": "*"}, "HTTPS_PROXY"),
        (
            "https",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "ample.com,api.example.com:443"},
            "HTTPS_PROXY",
        ),
        ("http", {"HTTPS_PROXY": "http://p:3128", "http_proxy": "http://q:3128"}, "http_proxy"),
        ("http", {}, None),
    ],
)
def test_the_proxy_variable_is_the_one_the_http_client_reads(
    scheme: str, env: dict[str, str], expected: str | None
) -> None:
    assert api_client_module.proxy_variable(scheme, "api.example.com", env) == expected


@pytest.mark.parametrize(
    ("host", "no_proxy", "exempt"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "10.0.0.0/8, 127.0.0.0/8", True),
        ("127.0.0.1", "*", False),  # "*" is a name entry: an address is matched by addresses only
        ("::1", "::1", True),
        ("api.example.com", "*", True),
        ("api.example.com", "example.com", True),
        ("api.example.com", ".EXAMPLE.com", True),
        ("example.com", ".example.com", True),
        ("api.example.com", "ample.com", False),
        ("api.example.com", "api.example.com:443", False),
        ("api.example.com", " , other.org ,", False),
    ],
)
def test_no_proxy_rules(host: str, no_proxy: str, exempt: bool) -> None:
    assert api_client_module.no_proxy_exempts(host, no_proxy) is exempt


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HTTP_PROXY": "{proxy}"}, "HTTP_PROXY"),
        ({"HTTP_PROXY": "", "http_proxy": "{proxy}"}, None),
        ({"HTTP_PROXY": "", "ALL_PROXY": "{proxy}"}, "ALL_PROXY"),
        ({"HTTP_PROXY": "ftp://127.0.0.1:1", "all_proxy": "{proxy}"}, "all_proxy"),
        ({"http_proxy": "{address}"}, "http_proxy"),
        ({"HTTP_PROXY": "{proxy}", "NO_PROXY": "127.0.0.0/8"}, None),
        ({"HTTP_PROXY": "{proxy}", "NO_PROXY": "*"}, "HTTP_PROXY"),
        ({"HTTP_PROXY": "{proxy}", "NO_PROXY": "", "no_proxy": "127.0.0.1"}, "HTTP_PROXY"),
        ({"HTTP_PROXY": "{proxy}", "NO_PROXY": "127.0.0.1:{port}"}, "HTTP_PROXY"),
        ({"HTTP_PROXY": "{proxy}", "REQUEST_METHOD": "GET"}, None),
    ],
)
async def test_the_proxy_variable_named_is_the_proxy_the_client_uses(
    env: dict[str, str], expected: str | None, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """The variable the worker names (its log, its pause) is checked against the HTTP client's own
    choice: a call through the proxy is refused there (407), a direct one reaches the API."""
    async with serving(Stub()) as stub, serving_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        port = stub.url.rpartition(":")[2]
        values = {"proxy": proxy.url, "address": proxy.url.removeprefix("http://"), "port": port}
        for name, value in env.items():
            no_proxy_env.setenv(name, value.format(**values))
        async with running(settings(stub.url)) as client:
            assert client.proxy_variable == expected
            outcome = await asyncio.gather(put(client), return_exceptions=True)
        through_proxy = expected is not None
        if through_proxy:
            [refused] = outcome
            assert isinstance(refused, ApiTransientError)
            assert refused.http_status == 407
        else:
            assert [r.http_status for r in outcome if isinstance(r, ApiResponse)] == [200]
        assert proxy.refused == (1 if through_proxy else 0)
        assert len(stub.seen) == (0 if through_proxy else 1)


async def test_calls_go_through_the_egress_proxy_of_https_proxy(
    private_ca: PrivateCa, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """The README's promise: HTTPS_PROXY (with the proxy's credentials in it) carries the API's
    calls through a CONNECT tunnel, TLS verified end to end; the password is never logged."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(private_ca.server_cert, private_ca.server_key)
    async with serving(Stub(), server_context) as stub, serving_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        no_proxy_env.setenv(
            "HTTPS_PROXY", proxy.url.replace("http://", f"http://{PROXY_USER}:{PROXY_PASSWORD}@")
        )
        with capture_logs() as logs:
            async with running(settings(stub.url, api_ca_file=private_ca.ca_cert)) as client:
                assert (await put(client)).http_status == 200
        assert proxy.tunnels == [stub.url.removeprefix("https://")]
        assert [s.headers["X-Event-Id"] for s in stub.seen] == ["ev-1"]
        assert [(e["event"], e["variable"], e["no_proxy"]) for e in logs] == [
            ("api_through_proxy", "HTTPS_PROXY", None)
        ]
        assert PROXY_PASSWORD not in repr(logs)


async def test_no_proxy_exempts_the_api_from_the_proxy(no_proxy_env: pytest.MonkeyPatch) -> None:
    async with serving(Stub()) as stub, serving_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        no_proxy_env.setenv("HTTP_PROXY", proxy.url)
        no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
        with capture_logs() as logs:
            async with running(settings(stub.url)) as client:
                assert (await put(client)).http_status == 200
        assert proxy.tunnels == []
        assert proxy.refused == 0
        assert len(stub.seen) == 1
        assert client.proxy_variable is None  # nothing said of a proxy the calls do not use
        assert [e for e in logs if e["event"] == "api_through_proxy"] == []


async def test_a_proxy_that_refuses_the_tunnel_is_a_connect_failure_with_its_reason(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """A wrong proxy password: never sent to the API, so a connect failure (the worker pauses as
    unreachable, the event's budget untouched), with the proxy's own reason and without the
    password in the error."""
    wrong = "not-the-proxy-password-0002"
    async with serving(Stub()) as stub, serving_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        no_proxy_env.setenv("HTTPS_PROXY", proxy.url.replace("http://", f"http://{PROXY_USER}:{wrong}@"))
        async with running(settings(stub.url.replace("http://", "https://"))) as client:
            assert client.proxy_variable == "HTTPS_PROXY"
            with pytest.raises(ApiTransientError) as refused:
                await put(client)
        assert refused.value.connect_failure
        assert "proxy authorization required" in str(refused.value)
        assert wrong not in str(refused.value)
        assert PROXY_USER not in str(refused.value)
        assert proxy.refused == 1
        assert proxy.tunnels == []
        assert stub.seen == []


async def test_a_success_answer_without_an_error_code_is_a_success_when_it_names_the_ticket() -> None:
    """Table 6 gives ``error_code`` the default value GOM.00000000: a 200 without it was reported
    ``rejected`` (with a dead letter) for a change the API had made. Its ``data`` names the ticket,
    as Table 7 (``data.ticket_id``) or the example response (``data.ticket_info``) does."""
    async with serving(Stub()) as stub:
        stub.reply(200, {"provider_code": "049", "data": {"ticket_id": "CM1"}})
        async with running(settings(stub.url)) as client:
            assert (await put(client)).http_status == 200
            stub.reply(200, {"data": {"ticket_info": {"ticket_id": "CM1", "sub_tickets": []}}})
            assert (await put(client)).http_status == 200
            stub.reply(200, {"error_code": "GOM.00001001", "error_msg": "refused"})
            with pytest.raises(ApiRejected):
                await put(client)


@pytest.mark.parametrize(
    "answer",
    [{}, {"status": "ok"}, {"error_code": None}, {"data": {"ticket_id": "CM2"}}, {"data": [1]}],
)
async def test_a_2xx_that_neither_says_success_nor_names_the_ticket_is_ambiguous(answer: object) -> None:
    """A wrong route or a gateway answering 200 with JSON of its own: it was taken for the API's
    success, the event reported applied and its offset committed with nothing changed. Now the
    ticket is read before anything else, as after an unreadable 2xx."""
    async with serving(Stub()) as stub:
        stub.reply(200, answer)
        async with running(settings(stub.url)) as client:
            with pytest.raises(ApiTransientError) as exc:
                await put(client)
    assert exc.value.ambiguous
    assert exc.value.http_status == 200


async def test_an_answer_is_judged_by_its_error_code_alone() -> None:
    """A ``data`` that is not an object, a numeric ``provider_code`` or ``error_msg``: the answer
    was "unreadable" before, so a success became an ambiguous attempt (read the ticket, send
    again) and a refusal lost its reason."""
    async with serving(Stub()) as stub:
        stub.reply(200, {"provider_code": 4.0, "error_code": "GOM.00000000", "data": []})
        async with running(settings(stub.url)) as client:
            assert (await put(client)).http_status == 200
            stub.reply(400, {"error_code": "GOM.00001005", "error_msg": {"why": "illegal"}})
            with pytest.raises(ApiRejected) as refused:
                await put(client)
    assert refused.value.error_code == "GOM.00001005"
    assert refused.value.error_msg == '{"why":"illegal"}'


async def test_a_gateway_timeout_is_read_as_our_own_timeout() -> None:
    """A 504 is a gateway that stopped waiting while the backend may still be applying the change:
    the ticket is read only after the settle wait, as after our own read timeout. Before, it was
    read at once, could find the change not there yet, and sent it again."""
    async with serving(Stub()) as stub, running(settings(stub.url)) as client:
        for status, timed_out in ((504, True), (502, False), (500, False)):
            stub.reply(status, {"error_code": "APIGW.0202"})
            with pytest.raises(ApiTransientError) as lost:
                await put(client)
            assert (lost.value.ambiguous, lost.value.timed_out) == (True, timed_out)


async def test_the_proxy_password_is_scrubbed_in_every_form_the_client_sends_it(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """The proxy URL's password was never registered with the redactor: kept out of the logs only
    because no message happened to quote it. It is scrubbed now as written (percent-encoded),
    decoded, and as the ``Proxy-Authorization: Basic`` value the client sends."""
    decoded = "proxy-pass@word:0003"
    no_proxy_env.setenv("HTTPS_PROXY", "http://egress:proxy-pass%40word%3A0003@127.0.0.1:9")
    async with running(settings("https://coc.example.test")):
        pass
    basic = base64.b64encode(f"egress:{decoded}".encode()).decode()
    for form in ("proxy-pass%40word%3A0003", decoded, basic):
        assert redact_text(f"said {form} here") == f"said {REDACTED} here", form


@pytest.mark.parametrize(
    ("endpoint", "credentials", "warned"),
    [
        ("http://127.0.0.1:9", {"api_token": TOKEN}, True),
        ("https://127.0.0.1:9", {"api_token": TOKEN}, False),
        ("http://127.0.0.1:9", {"api_ak": AK, "api_sk": SK}, False),  # a signature, not the secret
    ],
)
async def test_a_token_sent_over_plain_http_is_warned_of(
    endpoint: str, credentials: dict[str, str], warned: bool
) -> None:
    config = WorkerSettings(api_endpoint=endpoint, **credentials)
    with capture_logs() as logs:
        async with running(config):
            pass
    said = [e for e in logs if e["event"] == "api_token_over_plain_http"]
    assert len(said) == warned
    assert TOKEN not in repr(logs)
