"""The one settings class: every knob of the worker, from ``COC_WORKER_*`` environment variables.

Built once at the entry point (CLI flags override the environment) and passed down; nothing else
reads the environment. Secrets are ``SecretStr`` (their repr is ``**********``) and may come from
files (``COC_WORKER_API_SK_FILE=/var/run/secrets/...``), which are re-read when credentials are
refreshed so a rotated Kubernetes secret is picked up without a restart.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.asyncapi import DEFAULT_TOPICS
from worker.errors import ConfigError
from worker.logs import register_secrets

ENV_PREFIX = "COC_WORKER_"

#: The cloud's published COC endpoints (the official SDK's ``CocRegion`` table).
COC_REGION_ENDPOINTS: dict[str, str] = {
    "cn-north-4": "https://coc.myhuaweicloud.com",
    "ap-southeast-3": "https://coc-intl.myhuaweicloud.com",
    "eu-west-101": "https://coc-eu-west-101-open-api.myhuaweicloud.eu",
}


def env_var(field: str) -> str:
    """A setting's environment variable: ``max_in_flight`` is ``COC_WORKER_MAX_IN_FLIGHT``."""
    return f"{ENV_PREFIX}{field.upper()}"


#: Secret settings that may also be given as ``<NAME>_FILE`` (a path whose content is the value).
SECRET_FIELDS = (
    "api_ak",
    "api_sk",
    "api_token",
    "kafka_sasl_password",
    "kafka_ssl_key_password",
    "ingest_tokens",
    "dedup_redis_password",
)

#: Finite: "inf" parses as a float, and a store's TTL in ms or a token bucket's burst cannot be infinite.
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: After ``revoke_grace_s``, how long a revoke waits for the jobs it cancelled to end (worker/app.py).
REVOKE_CANCEL_WAIT_S = 5.0
#: A commit not answered by then is given up (a later one commits the same offsets or more).
COMMIT_TIMEOUT_S = 10.0
#: The rejoin, beyond the revoke's waits and commit, before the group gives up on us.
_REJOIN_MARGIN_S = 10.0

#: Secrets meant to be strong (not the AK, an access key id sent in every signed request). The
#: Redis password is, as one inside the dedup URL already was: the same password either way. So is
#: the Kafka client key's: it is never sent anywhere, but every secret read is scrubbed from all
#: output, and a short one ("true", "123456") would be scrubbed out of JSON keys, values and offsets.
_STRONG_SECRETS = frozenset(SECRET_FIELDS) - {"api_ak"}
MIN_SECRET_CHARS = 8
_TOKEN_SEPARATORS = re.compile(r"[,\s]+")


def url_credential_forms(text: str) -> list[str]:
    """A credential of a URL as written in it (percent-encoded) and as sent (decoded): the
    redactor must know both."""
    return [text, unquote(text)]


def split_tokens(text: str) -> list[str]:
    """``ingest_tokens`` holds several, separated by commas or whitespace (one per line in a file)."""
    return [token for token in _TOKEN_SEPARATORS.split(text) if token]


#: What the claim's lease must hold beyond the longest a request may take to land.
LEASE_MARGIN_S = 2.0
#: What the bounds below between seconds settings allow for binary floating point: the chart checks
#: the same bounds in exact decimals, and 2 x (0.1 + 1.3) + 2 is 4.800000000000001 here, so a
#: lease of 4.8 s that the chart rendered would stop the worker at start.
_BOUND_SLACK_S = 1e-6
_REDIS_URL_HINT = (
    "must be redis://[[user]:password@]host[:port][/db]; a password holding / # ? @ : [ ] or"
    " characters outside ASCII must be percent-encoded (%2F %23 %3F %40 %3A %5B %5D, UTF-8 bytes)"
)
_ENDPOINT_HINT = "must be an http(s) URL such as https://coc.myhuaweicloud.com"


def _split(url: str, hint: str) -> SplitResult:
    """``urlsplit``, whose errors quote the URL (brackets that hold no IPv6 address, characters
    that NFKC-normalise to ``@ : / ?``, a CJK input method's full-width ones): a password in it
    would be printed with the configuration error. Only ``hint`` is said instead."""
    try:
        return urlsplit(url)
    except ValueError:
        raise ValueError(hint) from None


#: The options a Redis dedup URL may carry: the worker's key prefix, and the redis-py connection
#: options it passes on (the database, TLS files and checks). Anything else is refused rather than
#: dropped: a ``?password=`` would otherwise be ignored at the login and shown in clear.
REDIS_URL_OPTIONS = frozenset(
    {"prefix", "db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
#: Kafka's own rule for a topic name (the broker refuses anything else, at the first write to it).
TOPIC_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
TopicName = Annotated[str, Field(pattern=TOPIC_NAME_PATTERN)]


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


#: A request header value the API client can send: visible ASCII, no spaces.
HEADER_VALUE = re.compile(r"[\x21-\x7e]+")
#: An endpoint's host: a name or an IPv4 address, or an IPv6 address (``urlsplit`` drops its brackets).
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
#: An endpoint's path prefix: characters the HTTP client sends as they are signed.
_ENDPOINT_PATH = re.compile(r"[A-Za-z0-9._~/-]*")


#: Records the ``memory://`` dedup store keeps unless ``?max_entries=N`` says otherwise.
MEMORY_MAX_ENTRIES = 100_000


def memory_max_entries(url: str) -> int:
    """The size of a ``memory://?max_entries=N`` dedup store; ``ValueError`` for anything else.

    0 kept nothing (every claim of a live event was NEW: no deduplication at all), a negative size
    failed every event, a word failed at start with a traceback.
    """
    options = parse_qs(urlsplit(url).query, keep_blank_values=True)
    if set(options) - {"max_entries"}:
        raise ValueError("memory:// takes one option, ?max_entries=N")
    entries = options.get("max_entries", [str(MEMORY_MAX_ENTRIES)])[-1]
    if not entries.isascii() or not entries.isdigit() or int(entries) < 1:
        raise ValueError("memory://?max_entries= must be a whole number of at least 1")
    return int(entries)


def is_redis_url(url: str) -> bool:
    """Whether a dedup URL names the Redis store (``redis://``, ``rediss://``), whose Redis the rate
    limit then shares."""
    return urlsplit(url).scheme in ("redis", "rediss")


class WorkerSettings(BaseSettings):
    """Settings of ``coc-worker`` (environment ``COC_WORKER_<FIELD>``, e.g. ``COC_WORKER_MAX_IN_FLIGHT``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False, validate_default=True
    )

    # --- Kafka ---------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    # The contract's topic names (schemas/asyncapi.py documents the same channels).
    input_topic: TopicName = DEFAULT_TOPICS["input"]
    results_topic: TopicName = DEFAULT_TOPICS["results"]
    dlq_topic: TopicName = DEFAULT_TOPICS["dlq"]
    group_id: str = Field("coc-change-worker", min_length=1)
    kafka_client_id: str = "coc-change-worker"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = Field(
        None,
        description="PEM client certificate (chain) for TLS client authentication (mTLS); may hold"
        " the key too.",
    )
    kafka_ssl_keyfile: Path | None = Field(
        None, description="PEM private key of that certificate, when not in the certificate's file."
    )
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_key_password_file: Path | None = None
    kafka_ssl_verify: bool = Field(True, description="Verify the broker's TLS certificate and hostname.")
    kafka_session_timeout_ms: int = Field(10_000, ge=1_000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)
    kafka_max_poll_interval_ms: int = Field(300_000, ge=10_000)
    kafka_fetch_max_wait_ms: int = Field(20, ge=0, description="Lower is lower latency, more fetches.")
    kafka_enable_idempotence: bool = Field(False, description="Needs a broker with InitProducerId.")
    create_topics: bool = Field(False, description="Create the three topics at start if missing.")
    topic_partitions: int = Field(12, ge=1, description="Partitions for topics made by --create-topics.")
    topic_replication_factor: int = Field(1, ge=1)

    # --- COC API -------------------------------------------------------------------------------
    api_endpoint: str | None = Field(None, description="Base URL; overrides api_region.")
    api_region: str | None = Field(None, description="A COC region, e.g. cn-north-4.")
    api_ak: SecretStr | None = None
    api_ak_file: Path | None = None
    api_sk: SecretStr | None = None
    api_sk_file: Path | None = None
    api_token: SecretStr | None = Field(None, description="Static X-Auth-Token instead of AK/SK.")
    api_token_file: Path | None = None
    api_domain_id: str | None = None
    api_project_id: str | None = None
    api_verify_tls: bool = True
    api_ca_file: Path | None = Field(None, description="PEM CA bundle trusted in addition to the system CAs.")
    api_connect_timeout_s: PositiveSeconds = 3.0
    api_request_timeout_s: PositiveSeconds = 10.0
    api_max_connections: int | None = Field(
        None,
        ge=1,
        description="API requests in flight at once, the HTTP client's limit (default max_in_flight).",
    )
    api_unreachable_threshold_s: PositiveSeconds = Field(
        10.0,
        description="Connection failures for this long with no success pause the worker; so do"
        " server errors, 429s and timeouts past an event's retry budget with no working answer"
        " for this long.",
    )
    api_rate_limit_per_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Client-side cap on API calls per second: with a Redis dedup store one limit"
        " for every pod of the consumer group, else per process.",
    )

    # --- Retry policy --------------------------------------------------------------------------
    retry_max_attempts: int = Field(
        20,
        ge=1,
        description="Attempts per event, the first included. Enough that retry_max_elapsed_s bounds"
        " an event's retries: at 8, full-jitter backoff spent ~13 s, and an API answering 503 or 429"
        " for 30-60 s failed every event it touched.",
    )
    retry_max_elapsed_s: PositiveSeconds = 120.0
    retry_base_delay_s: PositiveSeconds = 0.2
    retry_max_delay_s: PositiveSeconds = 20.0
    retry_after_max_s: PositiveSeconds = Field(60.0, description="Cap on a server's Retry-After.")
    probe_max_delay_s: PositiveSeconds = Field(30.0, description="Cap on the backoff while paused.")

    # --- Dedup ---------------------------------------------------------------------------------
    dedup_url: str = Field(
        "sqlite:///coc-worker-dedup.sqlite3", description="memory://, sqlite:///, redis:// or rediss://"
    )
    dedup_redis_password: SecretStr | None = Field(
        None,
        description="The Redis dedup store's password apart from dedup_url (a Secret key or a file"
        " holding only the password); an ACL user is named in the URL, redis://user@host.",
    )
    dedup_redis_password_file: Path | None = None
    dedup_ttl_s: PositiveSeconds = Field(7 * 24 * 3600.0, description="How long an applied event is kept.")
    dedup_redis_min_replicas: int = Field(
        0,
        ge=0,
        description="With a Redis dedup store: replicas that must acknowledge each claim and record"
        " (WAIT, 1 s) before the worker acts on it; otherwise the store counts as away. Redis"
        " replicates asynchronously: with 0, a failover may lose the last claims and records, and"
        " an event whose record was lost may be applied again.",
    )
    dedup_forgotten_window_s: float = Field(
        600.0,
        ge=0,
        allow_inf_nan=False,
        description="With a Redis dedup store: for this long after the store was created (its first"
        " claim, on Redis' clock) every new event has its ticket read before it is sent, one GET more"
        " per event. Such a store cannot tell an event never seen from one it forgot: a Redis without"
        " persistence that restarted empty lost every applied record, and an event redelivered within"
        " the window (its offset not yet committed) is not sent twice. Also the first minutes after"
        " the first deployment, or an upgrade from a release without the key. 0: off.",
    )
    dedup_lease_s: PositiveSeconds = Field(
        30.0,
        description="Claim lease; renewed before each send when it would not outlast the request (not"
        " while a job backs off or waits out a pause: a taker then reads the ticket before it sends)."
        " A crashed worker's claims wait this long.",
    )

    # --- Pipeline ------------------------------------------------------------------------------
    max_in_flight: int = Field(
        256,
        ge=1,
        description="Events processed at once (each of a different ticket); also the API call limit"
        " unless api_max_connections sets another.",
    )
    max_buffered: int | None = Field(
        None,
        ge=1,
        description="Messages taken from Kafka and not yet finished (default 4 x max_in_flight): later"
        " events of busy tickets wait here while other tickets' events use the free slots.",
    )
    max_buffered_bytes: int = Field(
        64 * 1_048_576,
        ge=256,
        description="Bytes (keys and values) of the messages taken from Kafka and not yet finished:"
        " fetching pauses at this many as at max_buffered messages, so a run of large records cannot"
        " hold max_buffered of them in memory. The fetch that reaches it may go past it (by up to one"
        " fetch of each assigned partition), and an empty buffer takes a fetch whatever its size.",
    )
    max_uncommitted: int = Field(
        10_000,
        ge=1,
        description="Messages of one partition taken behind its oldest unfinished one before that"
        " partition stops being fetched (the others go on): bounds what a stuck message holds in"
        " memory and what a crash reads again.",
    )
    max_event_bytes: int = Field(1_048_576, ge=256)
    commit_interval_s: PositiveSeconds = 1.0
    shutdown_grace_s: PositiveSeconds = 25.0
    startup_wait_s: float = Field(
        120.0,
        ge=0,
        allow_inf_nan=False,
        description="How long a starting worker waits for its broker and dedup store to answer"
        " (alive, not ready, retrying with backoff) before it exits 1; 0 exits at once.",
    )
    revoke_grace_s: PositiveSeconds = 10.0
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=200)

    # --- Operations ----------------------------------------------------------------------------
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535, description="0 picks a free port.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- HTTP ingress for monitoring systems (coc-worker ingest, or mounted in the worker) -----------
    ingest_enabled: bool = Field(False, description="Serve POST /v1/events and /v1/alertmanager here too.")
    ingest_tokens: SecretStr | None = Field(None, description="Comma-separated bearer tokens accepted.")
    ingest_tokens_file: Path | None = None
    ingest_max_body_bytes: int = Field(1_048_576, ge=1024)
    ingest_max_batch: int = Field(500, ge=1)
    ingest_allow_anonymous: bool = Field(
        False,
        description="Serve the ingress without tokens: anyone who reaches its port may post events, "
        "which the worker sends to the API with its own credentials.",
    )
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        """``debug`` as ``DEBUG``: lower case is how most tools spell a level."""
        return value.upper() if isinstance(value, str) else value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _hosts(cls, value: str) -> str:
        hosts = [h.strip() for h in value.split(",") if h.strip()]
        if not hosts or any(not _valid_host_port(h) for h in hosts):
            raise ValueError(
                "must be host:port[,host:port...], ports 1-65535, with no scheme and no credentials"
                " (SASL's go in COC_WORKER_KAFKA_SASL_USERNAME and COC_WORKER_KAFKA_SASL_PASSWORD)"
            )
        return ",".join(hosts)

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = _split(value, _ENDPOINT_HINT)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(_ENDPOINT_HINT)
        # What the HTTP client would refuse per request (every event failed as an internal error)
        # or rewrite after signing (every call refused as unauthenticated), refused here instead.
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0 or not _HOST.fullmatch(parts.hostname):
            raise ValueError("has a host or port the HTTP client cannot use")
        if parts.username is not None or parts.query or parts.fragment:
            raise ValueError("must hold no user, query or fragment: only scheme, host, port and path")
        if not _ENDPOINT_PATH.fullmatch(parts.path) or {".", ".."} & set(parts.path.split("/")):
            # the client would send another path than is signed (dot segments resolved, others
            # percent-encoded): every call refused as unauthenticated
            raise ValueError(
                "its path may hold letters, digits, '/', '-', '_', '~' and '.', and no '.' or '..' segment"
            )
        return value.rstrip("/")

    @field_validator("api_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and value not in COC_REGION_ENDPOINTS:
            raise ValueError("unknown region; known: " + ", ".join(sorted(COC_REGION_ENDPOINTS)))
        return value

    @field_validator("api_domain_id", "api_project_id")
    @classmethod
    def _header_safe(cls, value: str | None) -> str | None:
        """Sent as request headers: surrounding whitespace (a trailing newline from ``echo``) is
        dropped; anything else outside visible ASCII would make every request fail."""
        if value is None:
            return None
        value = value.strip()
        if not HEADER_VALUE.fullmatch(value):
            raise ValueError("must be visible ASCII without spaces (it is sent as a request header)")
        return value

    @field_validator("dedup_url")
    @classmethod
    def _dedup(cls, value: str) -> str:
        parts = _split(value, _REDIS_URL_HINT)
        if parts.scheme not in ("memory", "sqlite", "redis", "rediss"):
            raise ValueError("must start with memory://, sqlite:///, redis:// or rediss://")
        if parts.scheme == "memory":
            memory_max_entries(value)
        if is_redis_url(value):
            # A password with an unencoded / # ? or @ splits the URL in the wrong place: the rest of
            # it would be read as the host or the port, and printed in an error. Nothing is echoed.
            try:
                parts.port  # noqa: B018 (parses the port)
            except ValueError:
                raise ValueError(_REDIS_URL_HINT) from None
            if not parts.hostname or "@" in parts.path + parts.query + parts.fragment:
                raise ValueError(_REDIS_URL_HINT)
            values = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            options = set(values)
            if options - REDIS_URL_OPTIONS:  # not echoed: a misplaced password would be one
                raise ValueError(
                    f"a Redis URL takes only the options {', '.join(sorted(REDIS_URL_OPTIONS))}"
                    " (a password goes before the host)"
                )
            if parts.scheme == "redis" and any(name.startswith("ssl_") for name in options):
                raise ValueError("the ssl_* options need a TLS connection: rediss://")
            if parts.password and len(unquote(parts.password)) < MIN_SECRET_CHARS:
                # as for every other secret: a short one is guessable, and the log redactor cannot
                # tell it apart from ordinary text (its length only, never the value)
                raise ValueError(
                    f"the Redis password is {len(unquote(parts.password))} characters; at least"
                    f" {MIN_SECRET_CHARS} are needed"
                )
            if values.get("prefix") == "":
                # every key would be a bare event_id, among whatever else the database holds
                raise ValueError("?prefix= must not be empty (the default is coc:dedup:)")
            if not values.get("db", "0").isdigit():  # redis-py raised at start, naming no setting
                raise ValueError("?db= must be a whole number")
            if values.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
                raise ValueError("?ssl_cert_reqs= must be none, optional or required")
        return value

    @field_validator(*SECRET_FIELDS, *(f"{name}_file" for name in SECRET_FIELDS), mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """An empty variable (compose's ``${TOKEN:-}``) is one not set: its ``_FILE`` twin may be."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSettings:
        for name in SECRET_FIELDS:
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                env = env_var(name)
                raise ValueError(f"set {env} or {env}_FILE, not both")
            if getattr(self, name) is not None:  # from the environment: checked now, files when read
                try:
                    self.secret(name)
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
        self._check_redis_password()
        topics = {self.input_topic, self.results_topic, self.dlq_topic}
        if topics & {".", ".."}:
            raise ValueError("a topic cannot be named '.' or '..'")
        if len(topics) < 3:
            raise ValueError(
                "COC_WORKER_INPUT_TOPIC, COC_WORKER_RESULTS_TOPIC and COC_WORKER_DLQ_TOPIC must be three different topics"
            )
        if self.kafka_security_protocol.startswith("SASL") and self.kafka_sasl_mechanism is None:
            raise ValueError("COC_WORKER_KAFKA_SASL_MECHANISM is required with a SASL security protocol")
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            # whatever the protocol (unlike the files, read with TLS only): a key alone is never shown
            raise ValueError(
                "COC_WORKER_KAFKA_SSL_KEYFILE without COC_WORKER_KAFKA_SSL_CERTFILE: a client key goes"
                " with its certificate (whose file may hold the key too)"
            )
        if self.dedup_lease_s < self.api_abandon_s + LEASE_MARGIN_S - _BOUND_SLACK_S:
            raise ValueError(
                "COC_WORKER_DEDUP_LEASE_S must be at least 2 x (COC_WORKER_API_CONNECT_TIMEOUT_S + COC_WORKER_API_REQUEST_TIMEOUT_S)"
                f" + {LEASE_MARGIN_S:g} s: a request may still reach the API that long after it was"
                " sent, no other worker may take the event over until then, and a send soon after"
                " the claim needs no renewal"
            )
        if (
            self.retry_max_elapsed_s
            < self.api_connect_timeout_s + 2 * self.api_request_timeout_s - _BOUND_SLACK_S
        ):
            raise ValueError(
                "COC_WORKER_RETRY_MAX_ELAPSED_S must be at least COC_WORKER_API_CONNECT_TIMEOUT_S + 2 x"
                " COC_WORKER_API_REQUEST_TIMEOUT_S: a timed-out call takes up to both timeouts, and the next"
                " attempt waits a request timeout for the API to settle; a shorter budget fails the"
                " event at its first timeout, with no retry and no look at the ticket"
            )
        if self.retry_after_max_s > self.retry_max_elapsed_s:
            raise ValueError(
                "COC_WORKER_RETRY_AFTER_MAX_S must be at most COC_WORKER_RETRY_MAX_ELAPSED_S: a Retry-After the worker would"
                " honour could never fit the budget, and the event would fail at its first 429"
            )
        if self.kafka_heartbeat_interval_ms * 3 > self.kafka_session_timeout_ms:
            raise ValueError(
                "COC_WORKER_KAFKA_HEARTBEAT_INTERVAL_MS must be at most a third of COC_WORKER_KAFKA_SESSION_TIMEOUT_MS"
            )
        if self.max_buffered is not None and self.max_buffered < self.max_in_flight:
            raise ValueError("COC_WORKER_MAX_BUFFERED must be at least COC_WORKER_MAX_IN_FLIGHT")
        return self

    def _check_redis_password(self) -> None:
        """The password setting is for a Redis store, and the only password: with one in the URL
        too, which one the worker logs in with would be a guess (redis-py takes the URL's)."""
        variable = self._redis_password_variable
        if variable is None:
            return
        if not is_redis_url(self.dedup_url):
            raise ValueError(
                f"{variable} is the Redis dedup store's password, and {env_var('dedup_url')} names"
                " no Redis (redis:// or rediss://)"
            )
        if urlsplit(self.dedup_url).password:
            raise ValueError(
                f"{variable} and a password in {env_var('dedup_url')}: give the password in one"
                " place (a user name in the URL, with the password from the setting, is fine)"
            )

    @property
    def _redis_password_variable(self) -> str | None:
        """The variable that gives the Redis password apart from the URL, if one does."""
        return self.secret_source("dedup_redis_password")

    # --- derived -------------------------------------------------------------------------------
    @property
    def buffer_limit(self) -> int:
        """Messages taken from Kafka and not yet finished: ``max_buffered``, else 4 x ``max_in_flight``."""
        return self.max_buffered if self.max_buffered is not None else 4 * self.max_in_flight

    @property
    def api_request_limit(self) -> int:
        """API requests in flight at once: ``api_max_connections``, else ``max_in_flight`` (every
        running event may be calling; a lower client limit would queue calls inside the client)."""
        return self.api_max_connections if self.api_max_connections is not None else self.max_in_flight

    @property
    def api_base_url(self) -> str:
        """The endpoint to call: the explicit one, else the region's (one of them is required)."""
        if self.api_endpoint:
            return self.api_endpoint
        if self.api_region:
            return COC_REGION_ENDPOINTS[self.api_region]
        raise ConfigError("set COC_WORKER_API_ENDPOINT or COC_WORKER_API_REGION")

    @property
    def api_abandon_s(self) -> float:
        """How long a request may still reach the API after it was sent, its caller cancelled or not
        (the HTTP client does not abort it): the connect and the request timeouts, twice over."""
        return 2 * (self.api_connect_timeout_s + self.api_request_timeout_s)

    @property
    def kafka_rebalance_timeout_ms(self) -> int:
        """How long the group waits for this member to rejoin a rebalance: the revoke's worst case
        (its grace, the cancelled jobs' wait, its commit, which may first wait for a periodic one
        holding the commit lock: two commit timeouts) and a margin. aiokafka's default, the
        session timeout (10 s), was shorter than the grace alone: a revoke that waited for a slow
        job got this member dropped from the group, its commit refused and another rebalance."""
        worst_s = self.revoke_grace_s + REVOKE_CANCEL_WAIT_S + 2 * COMMIT_TIMEOUT_S + _REJOIN_MARGIN_S
        return max(self.kafka_session_timeout_ms, round(worst_s * 1000))

    def secret_source(self, name: str) -> str | None:
        """The variable a secret setting comes from (``<NAME>_FILE`` or ``<NAME>``; never both,
        the settings refuse that), or None when it is not set: what an error about it names."""
        if getattr(self, f"{name}_file") is not None:
            return env_var(name) + "_FILE"
        return env_var(name) if getattr(self, name) is not None else None

    def secret(self, name: str) -> str | None:
        """Current value of a secret setting, re-reading its ``_FILE`` when one is configured."""
        path: Path | None = getattr(self, f"{name}_file")
        if path is not None:
            try:
                found = path.read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read {env_var(name)}_FILE: {exc.strerror}") from exc
            except UnicodeDecodeError:
                raise ConfigError(f"{env_var(name)}_FILE is not UTF-8 text") from None
        else:
            value: SecretStr | None = getattr(self, name)
            # stripped like a file's content: a Secret made with `echo` ends with a newline
            found = (value.get_secret_value().strip() or None) if value is not None else None
            if found is not None and not found.isascii():
                try:  # bytes that are not UTF-8 come from the environment as lone surrogates
                    found.encode("utf-8")
                except UnicodeEncodeError:  # the codec's error would quote a byte of the secret
                    raise ConfigError(f"{env_var(name)} is not UTF-8 text") from None
        if found is not None and name in _STRONG_SECRETS:
            parts = split_tokens(found) if name == "ingest_tokens" else [found]
            short = [part for part in parts if len(part) < MIN_SECRET_CHARS]
            if short:
                source = self.secret_source(name)
                raise ConfigError(
                    f"{source}: a value of {len(short[0])} characters; at least"
                    f" {MIN_SECRET_CHARS} are needed (a short secret is guessable, and cannot be"
                    " told apart from ordinary text in logs)"
                )
        if found is not None:
            # Every value read is scrubbed from all output, also one re-read after its file was
            # rotated (a Kafka client built after a reconnect, a token reloaded after a 401).
            register_secrets(split_tokens(found) if name == "ingest_tokens" else [found])
        return found

    def __repr_args__(self) -> Any:
        """As pydantic's, with the password of ``dedup_url`` (a Redis URL may carry one) masked."""
        for name, value in super().__repr_args__():
            if name == "dedup_url" and isinstance(value, str):
                value = without_password(value, user_is_name=self._redis_password_variable is not None)
            yield name, value

    @property
    def dedup_url_shown(self) -> str:
        """The dedup store's URL for logs and errors: no password, no options."""
        user_is_name = self._redis_password_variable is not None
        return without_password(self.dedup_url.split("?", 1)[0], user_is_name=user_is_name)

    @property
    def ingest_auth_configured(self) -> bool:
        """Whether the ingress asks for tokens: once either variable is given, even empty (an
        empty one counts as not set for its value, but must not open the ingress to anyone:
        compose's ``${TOKENS:-}`` with ``TOKENS`` unset let every request in)."""
        return bool({"ingest_tokens", "ingest_tokens_file"} & self.model_fields_set)

    def secret_values(self) -> list[str]:
        """Every secret currently configured; the log redactor scrubs these from all output."""
        values = []
        for name in SECRET_FIELDS:
            try:
                value = self.secret(name)
            except ConfigError:
                continue
            if value and len(value) >= 4:
                values.append(value)
        url = urlsplit(self.dedup_url)
        password = url.password
        if password:
            values += url_credential_forms(password)
        elif (
            password is None
            and url.username
            and len(url.username) >= MIN_SECRET_CHARS
            and self._redis_password_variable is None  # else an ACL user's name, shown
        ):
            # a password written where the user goes (``without_password`` masks it too)
            values += url_credential_forms(url.username)
        return list(dict.fromkeys(values))


def _valid_host_port(entry: str) -> bool:
    """``host:port``; no scheme and no ``user:password@``, which would be taken for a host name
    (and, being a setting's value, shown in the start-up line)."""
    host, _, port = entry.rpartition(":")
    plain = not any(c in host for c in "@/ ")
    return bool(host) and plain and port.isdigit() and 1 <= int(port) <= 65535


def without_password(url: str, *, user_is_name: bool = False) -> str:
    """``url`` with its password, if any, shown as ``***`` (a Redis URL may carry one). A user
    without a password is masked too: ``redis://S3cret@host`` is a password written where the user
    goes (for ``redis://:S3cret@host``) more often than a ``nopass`` ACL user. Not when
    ``user_is_name``: the password comes from its own setting, and the URL names the ACL user."""
    parts = urlsplit(url)
    if "@" not in parts.netloc or (user_is_name and parts.password is None):
        return url
    host = parts.netloc.rpartition("@")[2]
    shown = "***" if parts.password is None else f"{parts.username or ''}:***"
    return parts._replace(netloc=f"{shown}@{host}").geturl()


#: What Kubernetes sets in every pod for each Service of its namespace (service links, unless the
#: pod says ``enableServiceLinks: false``): a Service named ``coc-worker...`` yields
#: ``COC_WORKER..._SERVICE_HOST``, ``..._PORT``, ``..._PORT_8080_TCP_ADDR`` and the like.
_IP = r"\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]*:[0-9A-Fa-f:]+"  # IPv4, or IPv6 (a colon at least)
_URL = r"(?:tcp|udp|sctp)://(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:]+\]):\d+"
#: Each form of name with the shape of its value; every family has its ``<BASE>_SERVICE_HOST``.
_SERVICE_LINK_FORMS = tuple(
    (re.compile(name), re.compile(value))
    for name, value in (
        (r"(.+)_SERVICE_HOST", _IP),
        (r"(.+)_SERVICE_PORT(?:_[A-Z0-9_]+)?", r"\d+"),
        (r"(.+)_PORT(?:_\d+_(?:TCP|UDP|SCTP))?", _URL),
        (r"(.+)_PORT_\d+_(?:TCP|UDP|SCTP)_PROTO", r"tcp|udp|sctp"),
        (r"(.+)_PORT_\d+_(?:TCP|UDP|SCTP)_PORT", r"\d+"),
        (r"(.+)_PORT_\d+_(?:TCP|UDP|SCTP)_ADDR", _IP),
    )
)


def service_link(name: str, value: str, environ: Mapping[str, str]) -> str | None:
    """The Service whose Kubernetes service-link variable ``name=value`` is, if it is one: its
    form, a value of that form's shape, and its family's ``<BASE>_SERVICE_HOST`` set too (a typo
    such as ``COC_WORKER_HTP_PORT=9000`` is none of these)."""
    upper = {key.upper() for key in environ}
    for form, shape in _SERVICE_LINK_FORMS:
        match = form.fullmatch(name.upper())
        if match and shape.fullmatch(value) and f"{match[1]}_SERVICE_HOST" in upper:
            return match[1].lower().replace("_", "-")
    return None


def _known_variables() -> list[str]:
    return [env_var(name) for name in WorkerSettings.model_fields]


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``COC_WORKER_*`` variables that name no setting, each with the closest name if one is near.

    pydantic-settings ignores them, so a typo (``COC_WORKER_DEDUP_URI``) would leave the setting
    at its default: for the dedup URL, a local store per replica, and events applied twice.
    Kubernetes' service-link variables are not typos: a Service named ``coc-worker`` in the
    namespace would otherwise stop every pod of it from starting."""
    known = _known_variables()
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if (
            upper.startswith(ENV_PREFIX)
            and upper not in known
            and not service_link(name, environ[name], environ)
        ):
            near = difflib.get_close_matches(upper, known, n=1)
            found.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return found


def settings_from_service_links(environ: Mapping[str, str]) -> list[str]:
    """Settings whose value a Kubernetes service link set (a Service named ``coc-worker-http``
    sets ``COC_WORKER_HTTP_PORT=tcp://...``), each saying which Service."""
    known = _known_variables()
    return [
        f"{name} is {environ[name]}: Kubernetes sets that for a Service named {service} (a service"
        " link); set enableServiceLinks: false in the pod spec or rename the Service"
        for name in sorted(environ)
        if name.upper() in known and (service := service_link(name, environ[name], environ))
    ]


def load_settings(**overrides: Any) -> WorkerSettings:
    """Build settings from the environment plus explicit overrides (CLI flags win).

    Raises ``ConfigError`` naming each bad setting by its environment variable.
    """
    unknown = unknown_variables(os.environ)
    if unknown:
        raise ConfigError("unknown setting(s): " + "; ".join(unknown))
    linked = settings_from_service_links(os.environ)
    if linked:
        raise ConfigError("; ".join(linked))
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return WorkerSettings(**clean)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            # A check across settings names its variables in its own words.
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                field = ".".join(str(p) for p in err["loc"])
                message = f"{env_var(field)}: {message}"
            problems.append(message)
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
