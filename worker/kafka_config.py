"""Connection arguments shared by every Kafka client of the worker (consumer, producer, admin, tools).

TLS verification is on unless ``COC_WORKER_KAFKA_SSL_VERIFY=false``, which logs a warning. A client
certificate (``COC_WORKER_KAFKA_SSL_CERTFILE``, mTLS) is loaded here too, so a file that cannot be
used stops the start with the setting named instead of failing every handshake.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from worker.errors import BrokerUnavailable, ConfigError
from worker.logs import get_logger, redact_cut
from worker.settings import WorkerSettings, env_var

log = get_logger(__name__)

#: CreateTopics answers that say the request itself is wrong (settings, ACLs), not that the broker
#: is busy: a start stops at once on them instead of trying again for COC_WORKER_STARTUP_WAIT_S.
_REFUSED_TOPIC_ERRORS: frozenset[type[KafkaError]] = frozenset(
    {
        errors.TopicAuthorizationFailedError,
        errors.ClusterAuthorizationFailedError,
        errors.InvalidPartitionsError,
        errors.InvalidReplicationFactorError,
        errors.InvalidReplicationAssignmentError,
        errors.InvalidConfigurationError,
        errors.PolicyViolationError,
    }
)


T = TypeVar("T")


def kafka_error_text(exc: BaseException) -> str:
    """A Kafka client's error in its own words, which name what it tried ("Unable to bootstrap
    from [('127.0.0.1', 1, ...)]"; the class name alone read like a topic or permission
    problem), once with its class name, redacted and short."""
    text, name = str(exc), type(exc).__name__
    return redact_cut(text if text.startswith(name) else f"{name}: {text}" if text else name, 300)


def cannot_connect(client: str, servers: str, exc: BaseException) -> str:
    """Why a Kafka client could not start, naming the setting to check and what it holds (bootstrap
    servers never carry credentials: the settings refuse them)."""
    return (
        f"{client} cannot connect to {env_var('kafka_bootstrap_servers')}={servers}: {kafka_error_text(exc)}"
    )


async def broker_answers(request: Awaitable[T], timeout_s: float) -> T:
    """Await a probe of the broker, bounded; no answer is ``BrokerUnavailable``.

    The probe must be a request: a metadata request (``fetch_all_metadata``, a consumer's
    ``topics()``) proves the broker answers now, a topic's ``partitions_for`` only once, as it
    answers from the client's cache as soon as the topic has been seen, broker or not."""
    try:
        return await asyncio.wait_for(request, timeout_s)
    except TimeoutError:
        raise BrokerUnavailable(f"broker unreachable: no answer within {timeout_s:g} s") from None
    except KafkaError as exc:
        raise BrokerUnavailable(f"broker unreachable: {kafka_error_text(exc)}") from exc


#: Room above the event size limit for a record's key, headers (a dead letter's ``coc-dlq-*``)
#: and framing.
_RECORD_HEADROOM_BYTES = 64 * 1024


def record_limit_bytes(settings: WorkerSettings) -> int:
    """The largest record the worker and its tools read or write: an event at its size limit with
    its key and headers, never under Kafka's own default limit (1 MiB)."""
    return max(settings.max_event_bytes + _RECORD_HEADROOM_BYTES, 1_048_576)


def producer_kwargs(settings: WorkerSettings) -> dict[str, Any]:
    """What every producer of the worker and its tools shares: a write counts once every in-sync
    replica has it (outcomes, dead letters and sent events are never lost with a leader), a short
    linger to batch what concurrent jobs write, and room for the largest record."""
    return {
        **connection_kwargs(settings),
        "acks": "all",
        "linger_ms": 2,
        "enable_idempotence": settings.kafka_enable_idempotence,
        "max_request_size": record_limit_bytes(settings),
    }


def connection_kwargs(settings: WorkerSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        try:
            context = create_ssl_context(
                cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
            )
        except (OSError, ssl.SSLError) as exc:  # missing, unreadable or not a certificate
            raise ConfigError(f"COC_WORKER_KAFKA_SSL_CAFILE: cannot load it ({exc})") from None
        load_client_certificate(context, settings)
        if not settings.kafka_ssl_verify:
            log.warning("kafka_tls_verification_disabled", setting="COC_WORKER_KAFKA_SSL_VERIFY")
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        kwargs["ssl_context"] = context
    else:
        ignored = [
            env_var(name)
            for name in (
                "kafka_ssl_cafile",
                "kafka_ssl_certfile",
                "kafka_ssl_keyfile",
                "kafka_ssl_key_password",
            )
            if getattr(settings, name) is not None or getattr(settings, name + "_file", None) is not None
        ]
        if ignored:  # a broker that wants a client certificate would only close every connection
            log.warning(
                "kafka_tls_settings_ignored",
                settings=ignored,
                detail=f"COC_WORKER_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} uses no TLS",
            )
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.secret("kafka_sasl_password")
        if not (settings.kafka_sasl_username and kwargs["sasl_plain_password"]):  # PLAIN and SCRAM both
            raise ConfigError(
                f"SASL {settings.kafka_sasl_mechanism} needs COC_WORKER_KAFKA_SASL_USERNAME and"
                " COC_WORKER_KAFKA_SASL_PASSWORD (or its _FILE)"
            )
    return kwargs


class _KeyNeedsPassword(Exception):
    """Raised from the key-password callback when none is configured: without a callback, OpenSSL
    would ask for the pass phrase on the terminal, and a worker started from one would hang."""


def _no_password() -> str:
    raise _KeyNeedsPassword


#: How an encrypted PEM key begins (PKCS#8), or says so in its header (the older OpenSSL form).
_ENCRYPTED_KEY_MARKS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _read_pem(variable: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # named here: OpenSSL's error would not say which of the files
        raise ConfigError(f"{variable}={path}: cannot read it ({exc.strerror})") from None


def load_client_certificate(context: ssl.SSLContext, settings: WorkerSettings) -> None:
    """Add the client certificate and its key (``COC_WORKER_KAFKA_SSL_CERTFILE``, ``_KEYFILE``,
    ``_KEY_PASSWORD``) to ``context``, for brokers that authenticate clients by certificate.

    Whatever keeps them from loading is a ``ConfigError`` naming the variables and what to check: a
    broker would only close each connection, read as "broker unreachable" until the start gave up.
    No message holds the password, nor anything read from the files."""
    certfile, keyfile = settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile
    if certfile is None:
        return
    password = settings.secret("kafka_ssl_key_password")  # its _FILE unreadable: a ConfigError
    cert_var = env_var("kafka_ssl_certfile")
    key_var = env_var("kafka_ssl_keyfile") if keyfile is not None else cert_var
    password_var = settings.secret_source("kafka_ssl_key_password")
    cert_pem = _read_pem(cert_var, certfile)
    key_pem = _read_pem(key_var, keyfile) if keyfile is not None else cert_pem
    try:  # parsed apart first, so that a damaged certificate is not taken for a wrong password
        # (as ASCII: text around the PEM blocks, such as an export's "friendlyName", may be any)
        cadata = cert_pem.decode("ascii", "ignore")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cadata)
    except (ssl.SSLError, ValueError):  # ValueError: an empty file (a Secret not yet synced)
        raise ConfigError(
            f"{cert_var}={certfile}: no PEM certificate that can be read in it (PKCS#12 and DER are not)"
        ) from None
    if b"PRIVATE KEY-----" not in key_pem:
        elsewhere = (
            f" (a key in a file of its own goes in {env_var('kafka_ssl_keyfile')})" if keyfile is None else ""
        )
        raise ConfigError(f"{key_var}={keyfile or certfile}: no PEM private key in it{elsewhere}")
    try:
        context.load_cert_chain(certfile, keyfile, password if password is not None else _no_password)
    except _KeyNeedsPassword:
        needed = env_var("kafka_ssl_key_password")
        raise ConfigError(
            f"{key_var}: the key is encrypted, and no password is given (set {needed} or {needed}_FILE)"
        ) from None
    except ssl.SSLError as exc:
        # A key of the certificate's type but another pair: KEY_VALUES_MISMATCH; of another type
        # (an EC key for an RSA certificate): NO_CERTIFICATE_ASSIGNED. Said before the password is
        # suspected, which a right password to a wrong key would otherwise be.
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            raise ConfigError(f"{key_var}: the key is not the certificate's in {cert_var}") from None
        if password is not None and any(mark in key_pem for mark in _ENCRYPTED_KEY_MARKS):
            raise ConfigError(
                f"{password_var}: does not open the encrypted key in {key_var} (a wrong password,"
                " or a damaged key)"
            ) from None
        files = cert_var if keyfile is None else f"{cert_var} and {key_var}"
        raise ConfigError(f"{files}: cannot load the client certificate and key ({exc})") from None
    except ValueError:  # longer than OpenSSL takes (1 KiB); Python's message does not quote it
        raise ConfigError(f"{password_var}: longer than a key's password can be (1024 bytes)") from None


async def ensure_topics(settings: WorkerSettings, topics: list[str] | None = None) -> list[str]:
    """Create the worker's topics when missing (only with ``--create-topics``); returns those created."""
    names = topics or [settings.input_topic, settings.results_topic, settings.dlq_topic]
    admin = AIOKafkaAdminClient(**connection_kwargs(settings))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = [n for n in names if n not in existing]
        if wanted:
            response = await admin.create_topics(
                [NewTopic(n, settings.topic_partitions, settings.topic_replication_factor) for n in wanted]
            )
            for topic, code, *_ in getattr(response, "topic_errors", []):
                if code in (0, errors.TopicAlreadyExistsError.errno):
                    continue
                error = errors.for_code(code)
                refused = f"cannot create topic {topic}: {error.message} (Kafka error {code})"
                if error in _REFUSED_TOPIC_ERRORS:  # waiting will not change the answer
                    raise ConfigError(
                        f"{refused}; check COC_WORKER_TOPIC_PARTITIONS, _TOPIC_REPLICATION_FACTOR and"
                        " the ACLs, or create the topics yourself"
                    )
                raise BrokerUnavailable(refused)
        return wanted
    except KafkaError as exc:
        raise BrokerUnavailable(
            cannot_connect("admin client", settings.kafka_bootstrap_servers, exc)
        ) from exc
    finally:
        await admin.close()
