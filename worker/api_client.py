"""The COC API client: one signed HTTP attempt, classified into the worker's error tree.

The only module that speaks HTTP as a client, through ``pyreqwest`` (Python bindings of Rust's
``reqwest``/``hyper``): the connection pool, the HTTP/1.1 framing and the socket reads run in
the library's own native thread, outside the event loop, which keeps the loop's cost per call to
about a third of aiohttp's (measured in ``bench/README.md``). One shared client with a bounded
number of requests in flight, explicit connect/read/total timeouts, no redirects followed. Every
attempt is signed afresh (a new ``X-Sdk-Date``; a signature is never reused across retries), and
the client never re-sends a request it has written, so every attempt is exactly one request.
Results:

=========================================  ===========================================
success: 2xx and ``error_code`` GOM.00000000  returns ``ApiResponse``
connection refused / DNS / connect timeout   ``ApiTransientError(connect_failure=True)``
read timeout, dropped connection             ``ApiTransientError(ambiguous=True)``
408, 429 (+``Retry-After``), 500/502/503/504  ``ApiTransientError``
401, 403                                     ``ApiAuthError`` (systemic)
407 (a proxy's, never the API's)            ``ApiTransientError(connect_failure=True)``
2xx with an unreadable body                  ``ApiTransientError(ambiguous=True)``
other 3xx/4xx/5xx, 2xx with another code     ``ApiRejected``
=========================================  ===========================================

A 2xx without ``error_code`` (Table 6's default is the success code) is a success when its ``data``
names the ticket, and ambiguous, as an unreadable one, when it does not: a wrong route's ``{}``.

Three requests: the ``PUT`` of a change; a ``GET`` of the ticket, to confirm a change whose answer
was lost and as the auth gate's probe; and, for credentials that may change tickets but not read
them, a ``PUT {}`` to a ticket no event names (``probe_write``), which changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError
from pyreqwest import exceptions as http_errors
from pyreqwest.client import Client, ClientBuilder

from schemas.api import UpdateTicketResponse
from worker import signing
from worker.errors import ApiAuthError, ApiRejected, ApiTransientError, ConfigError
from worker.logs import REDACTED, get_logger, redact_cut, redact_text, register_secrets
from worker.mapping import request_path
from worker.metrics import Metrics
from worker.settings import HEADER_VALUE, WorkerSettings, url_credential_forms

log = get_logger(__name__)

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Server-side failures after the request was taken in (a backend error, a gateway that lost or
#: timed out on its backend): the change may have been made. 408, 429 and 503 say it was not.
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})
AUTH_STATUSES = frozenset({401, 403})
#: An HTTP forward proxy's refusal (``HTTP_PROXY`` with an ``http://`` endpoint; through an HTTPS
#: tunnel it is a connect error): the request never reached the API. It was ``rejected``, every
#: event dead-lettered while the proxy's password was being rotated.
PROXY_REFUSED = 407
#: Statuses that say nothing of the ticket (credentials refused, a failure to retry, a proxy's
#: refusal): a probe or a read raises on them, and takes any other answer for one.
_NOT_AN_ANSWER = AUTH_STATUSES | RETRYABLE_STATUSES | {PROXY_REFUSED}
_ERROR_TEXT_LIMIT = 500
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
#: X-Request-Id values: unique per attempt, not secret; the PRNG avoids a syscall per request.
_request_ids = random.Random()


@dataclass(frozen=True, slots=True)
class ApiResponse:
    http_status: int
    body: UpdateTicketResponse
    latency_s: float


@dataclass(frozen=True, slots=True)
class Credentials:
    ak: str | None = field(repr=False)
    sk: str | None = field(repr=False)
    token: str | None = field(repr=False)
    domain_id: str | None
    project_id: str | None

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Credentials:
        creds = cls(
            ak=settings.secret("api_ak"),
            sk=settings.secret("api_sk"),
            token=settings.secret("api_token"),
            domain_id=settings.api_domain_id,
            project_id=settings.api_project_id,
        )
        if not creds.token and not (creds.ak and creds.sk):
            raise ConfigError("set COC_WORKER_API_AK and COC_WORKER_API_SK, or COC_WORKER_API_TOKEN")
        for name in ("ak", "token"):  # sent as header values (the SK only signs)
            value = getattr(creds, name)
            if value is not None and not HEADER_VALUE.fullmatch(value):
                raise ConfigError(f"COC_WORKER_API_{name.upper()} must be visible ASCII without spaces")
        return creds


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    # Digits only (str.isdigit() also takes "²", which float() refuses); a fraction is accepted,
    # as the simulator sends one to keep tests fast.
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a year or zone out of range
        return None
    if when.tzinfo is None:  # "-0000": UTC, not the local time naive datetimes stand for
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


#: Where the HTTP client takes a proxy from, as reqwest (hyper-util's ``Matcher::from_env``) reads
#: them when the client is built: the first of each pair that is set, even empty, wins its pair;
#: the scheme's own pair first, and ALL_PROXY when its value is no proxy URL.
_PROXY_VARIABLES = {
    "https": (("HTTPS_PROXY", "https_proxy"), ("ALL_PROXY", "all_proxy")),
    "http": (("HTTP_PROXY", "http_proxy"), ("ALL_PROXY", "all_proxy")),
}
_NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
_PROXY_SCHEMES = frozenset({"http", "https", "socks4", "socks4a", "socks5", "socks5h"})


def _first_set(names: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    return next((name for name in names if name in environ), None)


def _is_proxy_url(value: str) -> bool:
    """What the client accepts as a proxy: a known scheme (none means http) and a host."""
    value = value.strip()
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "http", value
    authority = rest.split("/", 1)[0].rpartition("@")[2]
    return scheme.lower() in _PROXY_SCHEMES and bool(authority)


def no_proxy_exempts(host: str, no_proxy: str) -> bool:
    """Whether a ``NO_PROXY`` list exempts ``host``, by the client's rules: an address or a network
    (``10.0.0.0/8``) for an address; for a name, ``*`` or a domain, which covers its subdomains,
    with or without a leading dot. An entry with a port never matches."""
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in filter(None, (part.strip() for part in no_proxy.split(","))):
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            network = None
        if address is not None or network is not None:
            # An address is matched by address and network entries only ("*" is a domain entry).
            if address is not None and network is not None and address in network:
                return True
            continue
        domain, name = entry.lower(), host.lower()
        if (
            entry == "*"
            or name == domain.removeprefix(".")
            or name.endswith(domain if domain.startswith(".") else "." + domain)
        ):
            return True
    return False


def proxy_variable(scheme: str, host: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The name of the variable whose proxy the client sends calls to ``scheme://host`` through,
    or ``None`` when it connects directly. The name only: the value may hold the proxy's password.
    """
    if "REQUEST_METHOD" in environ:  # a CGI environment: the client ignores every proxy variable
        return None
    no_proxy = _first_set(_NO_PROXY_VARIABLES, environ)
    if no_proxy is not None and no_proxy_exempts(host, environ[no_proxy]):
        return None
    for pair in _PROXY_VARIABLES.get(scheme, ()):
        name = _first_set(pair, environ)
        if name is not None and _is_proxy_url(environ[name]):
            return name
    return None


def _build_client(settings: WorkerSettings) -> Client:
    """The shared HTTP client: bounded, timed out, TLS verified unless the settings say otherwise."""
    builder = (
        ClientBuilder()
        .max_connections(settings.api_request_limit)
        .connect_timeout(timedelta(seconds=settings.api_connect_timeout_s))
        .read_timeout(timedelta(seconds=settings.api_request_timeout_s))
        .timeout(timedelta(seconds=settings.api_connect_timeout_s + settings.api_request_timeout_s))
        # A redirected PUT would carry a signature made for another path: report the 3xx instead.
        .follow_redirects(False)
        .error_for_status(False)
        .user_agent("coc-change-worker")
    )
    if not settings.api_verify_tls:
        log.warning("api_tls_verification_disabled", setting="COC_WORKER_API_VERIFY_TLS")
        builder = builder.danger_accept_invalid_certs(True)
    elif settings.api_ca_file is not None:
        # A private CA (an internal gateway): trusted in addition to the system's roots.
        builder = builder.add_root_certificate_pem(_read_ca_file(settings.api_ca_file))
    try:
        return builder.build()
    except http_errors.BuilderError as exc:
        causes = _causes(exc)
        reason = (causes[-1].get("message") if causes else None) or type(exc).__name__
        if settings.api_ca_file is not None:  # the one input of ours the builder parses
            raise ConfigError(f"COC_WORKER_API_CA_FILE: not a valid PEM certificate ({reason})") from None
        raise ConfigError(f"the API client cannot start ({reason})") from None


def _read_ca_file(path: Path) -> bytes:
    """The CA bundle's bytes, refused with the setting's name when they hold no certificate: the
    builder skips what is not PEM without a word, and every call would fail as "cannot connect"."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"COC_WORKER_API_CA_FILE: cannot read it ({exc.strerror}: {path})") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"COC_WORKER_API_CA_FILE: no PEM certificate in {path}")
    return pem


#: How hyper reports a failure of the connect phase (DNS, TCP, TLS, proxy, connect timeout) in the
#: error's cause chain. pyreqwest's exception classes cannot tell "never sent" from "sent, then
#: lost": a connection dropped after the request was written is a ``ConnectError``, a read
#: timeout a ``ConnectTimeoutError``. Only this cause proves the request never left; anything else
#: is ambiguous, the safe reading should the text ever change.
_CONNECT_PHASE_CAUSE = "client error (Connect)"


def _causes(exc: http_errors.PyreqwestError) -> list[dict[str, Any]]:
    """pyreqwest's cause chain of an error, outermost first (``[{"message": ...}, ...]``)."""
    return list((getattr(exc, "details", None) or {}).get("causes") or [])


def _classify_transport_error(exc: http_errors.PyreqwestError) -> tuple[str, ApiTransientError]:
    """A failed attempt without an HTTP answer: (metrics code, the worker's error)."""
    causes = _causes(exc)
    timed_out = isinstance(exc, http_errors.RequestTimeoutError)
    if any(cause.get("message") == _CONNECT_PHASE_CAUSE for cause in causes):
        detail = "timed out connecting to the API" if timed_out else "cannot connect to the API"
        # The innermost cause tells a refused connection from a name not found or a TLS failure.
        innermost = str(causes[-1].get("message") or "") if causes else ""
        if innermost and innermost != _CONNECT_PHASE_CAUSE:
            detail += f" ({redact_cut(innermost, 200)})"
        return "connect_error", ApiTransientError(detail, connect_failure=True)
    if timed_out:
        return "timeout", ApiTransientError("the API did not answer in time", timed_out=True)
    if isinstance(exc, http_errors.TransportError):
        return "disconnected", ApiTransientError(
            "connection lost during the call: the request may have been applied", ambiguous=True
        )
    return "client_error", ApiTransientError(f"HTTP client error: {type(exc).__name__}", ambiguous=True)


def _cancelled_meanwhile(task: asyncio.Task[Any] | None, cancels: int) -> None:
    """Raise ``CancelledError`` when ``task`` was cancelled while it awaited pyreqwest (it had
    ``cancels`` cancellation requests before). pyreqwest drops a cancellation that comes as the
    request ends: its ``send`` hands the cancellation to the Rust future, which races it against the
    request, and the request's own answer or error comes back instead when both are ready (about
    half the time, ``tests/test_api_client.py``). A job cancelled by a revoke or a stop just as its
    PUT's connection dropped went on as if nothing had happened: it read the ticket and retried for
    its whole budget (100 s in a test that waited for it), and the revoke or stop that cancelled it
    waited for it in vain. Called on a transport error only: the cancellation then wins, and the
    caller treats the request as one that may still land. An answer received is kept (an applied
    change is recorded in milliseconds; thrown away, the next owner would have to read the ticket,
    which cannot show every change), and ``Lanes`` cancels a dropped job again if it goes on."""
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError


#: A request signature quoted back by the API or a proxy (a 400 that echoes the request's
#: headers): it is no secret key, but it authorises that one request for 15 minutes, so it stays
#: out of outcomes, dead letters and logs like one.
_ECHOED_SIGNATURE = re.compile(r"(Signature=)[0-9A-Fa-f]{16,}")


def _short(text: str | None) -> str | None:
    """The API's text, secrets scrubbed *before* it is cut (a cut secret no longer matches)."""
    if not text:
        return text
    return _ECHOED_SIGNATURE.sub(rf"\g<1>{REDACTED}", redact_text(text))[:_ERROR_TEXT_LIMIT]


_ERROR_CODE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _code(parsed: UpdateTicketResponse | None) -> str | None:
    """The answer's ``error_code`` when it looks like one; a proxy's or an echo's text does not
    go into outcomes and dead letters as a code."""
    code = parsed.error_code if parsed else None
    if code is None or _ERROR_CODE.fullmatch(code):
        return code
    return "unparseable"


def _proxy_secrets(url: str) -> list[str]:
    """A proxy URL's password as the redactor must know it: as written, decoded, and inside the
    ``Proxy-Authorization: Basic`` value the client sends (base64 of ``user:password``)."""
    try:
        parts = urlsplit(url.strip())
        password = parts.password
    except ValueError:
        return []
    if not password:
        return []
    user, secret = unquote(parts.username or ""), unquote(password)
    return [*url_credential_forms(password), base64.b64encode(f"{user}:{secret}".encode()).decode()]


class CocApiClient:
    """Calls ``PUT /v1/change/tickets/{ticket_id}`` (and a read-only GET used as a health probe)."""

    def __init__(self, settings: WorkerSettings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        base = urlsplit(settings.api_base_url)
        self._origin = f"{base.scheme}://{base.netloc}"
        #: An endpoint may carry a path prefix (an API gateway route): keep it, and sign it.
        self._prefix = base.path.rstrip("/")
        self._host = base.netloc
        self._metrics = metrics or Metrics()
        self._credentials = self._load_credentials()
        self._client: Client | None = None
        #: The variable naming the egress proxy the calls go through, if any (``proxy_variable``).
        self.proxy_variable: str | None = None

    async def start(self) -> None:
        self._client = _build_client(self._settings)
        # Read by the client as it was built: said once, since a proxy that refuses the tunnel
        # looks like an API that cannot be reached.
        origin = urlsplit(self._origin)
        self.proxy_variable = proxy_variable(origin.scheme, origin.hostname or "")
        if self.proxy_variable is not None:
            register_secrets(_proxy_secrets(os.environ.get(self.proxy_variable, "")))
            no_proxy = _first_set(_NO_PROXY_VARIABLES, os.environ)
            log.info(
                "api_through_proxy",
                variable=self.proxy_variable,
                no_proxy=os.environ[no_proxy] if no_proxy else None,
            )
        if self._credentials.token and origin.scheme == "http":
            # The token is the credential itself (a signature is not): in clear text on the wire.
            log.warning("api_token_over_plain_http", endpoint=self.base_url)
        try:  # built, not sent: what the client refuses would otherwise fail every event
            self._client.request("GET", self._origin + self._prefix + "/").build()
        except ValueError as exc:
            raise ConfigError(f"COC_WORKER_API_ENDPOINT: the HTTP client cannot use it ({exc})") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def base_url(self) -> str:
        """The API's URL, as configured (never with credentials: the settings refuse them)."""
        return self._origin + self._prefix

    def refresh_credentials(self) -> None:
        """Re-read secret files (a rotated Kubernetes secret) before probing after a 401."""
        self._credentials = self._load_credentials()

    def _load_credentials(self) -> Credentials:
        creds = Credentials.from_settings(self._settings)
        # Values the redactor may not have seen yet: registered before any answer can echo them.
        register_secrets(value for value in (creds.ak, creds.sk, creds.token) if value)
        return creds

    # --- requests -------------------------------------------------------------------------------
    def _headers(self, method: str, path: str, body: bytes, extra: dict[str, str]) -> dict[str, str]:
        # A fresh request id per attempt: with X-Sdk-Date (1 s resolution) alone, two attempts in
        # the same second would carry the same signature.
        headers = {
            "Content-Type": "application/json;charset=UTF-8",
            "X-Request-Id": f"{_request_ids.getrandbits(128):032x}",
            **extra,
        }
        creds = self._credentials
        if creds.domain_id:
            headers["X-Domain-Id"] = creds.domain_id
        if creds.project_id:
            headers["X-Project-Id"] = creds.project_id
        if creds.ak and creds.sk:
            return signing.sign(
                ak=creds.ak,
                sk=creds.sk,
                method=method,
                host=self._host,
                path=path,
                headers=headers,
                body=body,
            )
        assert creds.token is not None
        headers["X-Auth-Token"] = creds.token
        headers["Host"] = self._host
        return headers

    async def _send(
        self, method: str, path: str, body: bytes, extra_headers: dict[str, str]
    ) -> tuple[int, bytes, str | None, float]:
        """One request: (status, body, its Retry-After header, seconds taken)."""
        if self._client is None:
            raise RuntimeError("CocApiClient.start() was not called")
        path = self._prefix + path
        request = self._client.request(method, self._origin + path).headers(
            self._headers(method, path, body, extra_headers)
        )
        if body:
            request = request.body_bytes(body)
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        started = time.perf_counter()
        code = "error"
        try:
            response = await request.build().send()
            payload = (await response.bytes()).to_bytes()
            code = str(response.status)
            return response.status, payload, response.get_header("Retry-After"), time.perf_counter() - started
        except http_errors.PyreqwestError as exc:
            _cancelled_meanwhile(task, cancels)
            code, error = _classify_transport_error(exc)
            try:
                raise error from None
            finally:
                del error  # its traceback holds this frame: a local naming it would make a cycle
        finally:
            task = None  # a CancelledError raised here holds this frame, and the task holds it: no cycle
            self._metrics.count_api_request(code)
            self._metrics.api_latency_by_method[method].observe(time.perf_counter() - started)

    async def update_ticket(
        self, ticket_id: str, body: bytes, *, event_id: str, traceparent: str
    ) -> ApiResponse:
        """One attempt of ``PUT /v1/change/tickets/{ticket_id}``; raises the classified error."""
        status, payload, retry_after, latency = await self._send(
            "PUT", request_path(ticket_id), body, {"X-Event-Id": event_id, "traceparent": traceparent}
        )
        parsed = self._parse(payload)
        if 200 <= status < 300:
            if parsed is None:
                # Accepted, most likely, but unconfirmed (a proxy's page, a cut body): whether the
                # change is in place is read from the ticket before anything is sent again.
                raise ApiTransientError(
                    f"HTTP {status} with an unreadable body", http_status=status, ambiguous=True
                )
            if not parsed.succeeded:
                code = _code(parsed)
                raise ApiRejected(
                    f"HTTP {status} with error_code {code}",
                    http_status=status,
                    error_code=code,
                    error_msg=_short(parsed.error_msg),
                )
            if parsed.error_code is None and not parsed.names_ticket(ticket_id):
                # JSON that neither says success nor names the ticket ({} from a wrong route, a
                # gateway's own answer) was taken for the API's: the change reported applied, its
                # offset committed, and nothing made. Whether it is in place is read instead.
                raise ApiTransientError(
                    f"HTTP {status} without error_code or the ticket", http_status=status, ambiguous=True
                )
            return ApiResponse(status, parsed, latency)
        raise self._classify_failure(status, parsed, retry_after)

    async def probe(self, ticket_id: str) -> None:
        """A read-only signed GET: returns when the API is reachable and accepts our credentials.

        Raises ``ApiAuthError`` or ``ApiTransientError`` like ``update_ticket``; any other answer
        (even 404) proves reachability and valid credentials.
        """
        await self._get_ticket(ticket_id)

    async def probe_write(self, ticket_id: str) -> None:
        """A signed ``PUT`` that changes nothing (an empty object, to a ticket no event names):
        returns when the API accepts our credentials for changes, whatever it says of the ticket.
        For credentials that may change tickets but not read them, which ``probe`` cannot tell
        from refused ones. Raises like ``probe``."""
        status, payload, retry_after, _ = await self._send("PUT", request_path(ticket_id), b"{}", {})
        if status in _NOT_AN_ANSWER:
            raise self._classify_failure(status, self._parse(payload), retry_after)

    async def show_ticket(self, ticket_id: str) -> dict[str, Any] | None:
        """The ticket's detail (used to reconcile an ambiguous attempt); ``None`` if unreadable."""
        payload = await self._get_ticket(ticket_id)
        try:
            data = json.loads(payload)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def _get_ticket(self, ticket_id: str) -> bytes:
        """A signed GET of the ticket: its body, unless the answer is an auth or retryable failure."""
        status, payload, retry_after, _ = await self._send("GET", request_path(ticket_id), b"", {})
        if status in _NOT_AN_ANSWER:
            raise self._classify_failure(status, self._parse(payload), retry_after)
        return payload

    # --- classification -------------------------------------------------------------------------
    @staticmethod
    def _parse(payload: bytes) -> UpdateTicketResponse | None:
        try:
            return UpdateTicketResponse.model_validate_json(payload)
        except ValidationError:
            return None

    @staticmethod
    def _classify_failure(
        status: int, parsed: UpdateTicketResponse | None, retry_after_header: str | None
    ) -> ApiTransientError | ApiAuthError | ApiRejected:
        if status == PROXY_REFUSED:
            return ApiTransientError(
                "a proxy refused the request (HTTP 407: proxy authorization required)",
                http_status=status,
                connect_failure=True,
            )
        code = _code(parsed)
        message = _short(parsed.error_msg) if parsed else None
        if status in AUTH_STATUSES:
            return ApiAuthError(
                f"HTTP {status}: credentials refused ({code})", http_status=status, error_code=code
            )
        if status in RETRYABLE_STATUSES:
            retry_after = parse_retry_after(retry_after_header) if status in (429, 503) else None
            return ApiTransientError(
                f"HTTP {status}" + (f" ({code})" if code else ""),
                http_status=status,
                error_code=code,
                retry_after_s=retry_after,
                ambiguous=status in AMBIGUOUS_STATUSES,
                # A gateway that stopped waiting, as our own read timeout does: the backend may
                # still be applying it, so the ticket is read only after the settle wait.
                timed_out=status == 504,
            )
        return ApiRejected(
            f"HTTP {status}" + (f": {code} {message or ''}".rstrip() if code else ""),
            http_status=status,
            error_code=code,
            error_msg=message,
        )
