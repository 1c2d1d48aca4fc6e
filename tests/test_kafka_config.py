"""Kafka client settings: TLS verification on by default, off only when asked, with a warning; a
client certificate (mTLS) shown to a real TLS server that requires one."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiokafka.errors import KafkaConnectionError
from pki import encrypted_key
from structlog.testing import capture_logs

from worker import kafka_config
from worker.consumer import Consumer
from worker.errors import BrokerUnavailable, ConfigError
from worker.kafka_config import broker_answers, connection_kwargs
from worker.publisher import Publisher
from worker.settings import COMMIT_TIMEOUT_S, REVOKE_CANCEL_WAIT_S, WorkerSettings, load_settings
from worker.tools.kafka_io import EventProducer, TopicReader


def test_plaintext_has_no_tls_or_sasl() -> None:
    kwargs = connection_kwargs(load_settings(kafka_bootstrap_servers="a:9092,b:9092"))
    assert kwargs["bootstrap_servers"] == ["a:9092", "b:9092"]
    assert kwargs["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in kwargs
    assert "sasl_plain_password" not in kwargs


def test_tls_verifies_certificates_by_default() -> None:
    kwargs = connection_kwargs(
        load_settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="worker",
            kafka_sasl_password="s3cret-password",
        )
    )
    context: ssl.SSLContext = kwargs["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "worker"
    assert kwargs["sasl_plain_password"] == "s3cret-password"


def test_turning_verification_off_is_explicit_and_logged() -> None:
    with capture_logs() as logs:
        kwargs = connection_kwargs(load_settings(kafka_security_protocol="SSL", kafka_ssl_verify=False))
    context: ssl.SSLContext = kwargs["ssl_context"]
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    assert [entry["event"] for entry in logs] == ["kafka_tls_verification_disabled"]
    assert logs[0]["log_level"] == "warning"


def test_sasl_without_its_password_is_a_configuration_error() -> None:
    settings = load_settings(
        kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u"
    )
    with pytest.raises(ConfigError, match="COC_WORKER_KAFKA_SASL_PASSWORD"):
        connection_kwargs(settings)


@pytest.mark.parametrize("servers", ["broker:99999", "broker:0", "broker:x", ":9092"])
def test_a_bootstrap_port_out_of_range_is_refused(servers: str) -> None:
    with pytest.raises(ConfigError, match="COC_WORKER_KAFKA_BOOTSTRAP_SERVERS"):
        load_settings(kafka_bootstrap_servers=servers)


@pytest.mark.parametrize("grace_s", [10.0, 60.0])
async def test_the_group_waits_out_a_revoke_before_dropping_the_member(grace_s: float) -> None:
    """aiokafka's rebalance timeout defaults to the session timeout (10 s), shorter than a revoke
    that waits ``revoke_grace_s`` (10 s by default) for a slow job, then 5 s for the jobs it
    cancelled, then commits: the group dropped the member, its commit was refused, and its rejoin
    started another rebalance."""
    settings = load_settings(revoke_grace_s=grace_s)
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]  # built, never started
    try:
        rebalance_timeout_ms = consumer._consumer._rebalance_timeout_ms
        request_timeout_ms = consumer._consumer._client._request_timeout_ms
    finally:
        await consumer._consumer.stop()
    # the revoke's commit may wait for a periodic one holding the lock: two commit timeouts
    revoke_worst_ms = (settings.revoke_grace_s + REVOKE_CANCEL_WAIT_S + 2 * COMMIT_TIMEOUT_S) * 1000
    assert rebalance_timeout_ms > revoke_worst_ms + settings.kafka_heartbeat_interval_ms
    # a JoinGroup waits up to the rebalance timeout for the slowest member: not timed out before
    assert request_timeout_ms >= rebalance_timeout_ms + 5_000
    assert settings.kafka_rebalance_timeout_ms >= settings.kafka_session_timeout_ms


async def test_a_client_that_cannot_start_names_the_setting_and_the_address() -> None:
    """The worker exited with "producer cannot connect: KafkaConnectionError": no address, no
    setting to check."""
    settings = load_settings(
        kafka_bootstrap_servers="127.0.0.1:1",
        api_endpoint="http://127.0.0.1:1",
        api_ak="a",
        api_sk="sk-0123456789",
    )
    publisher = Publisher(settings)
    consumer = Consumer(settings, handler=None)  # type: ignore[arg-type]
    for client, start in (("producer", publisher.start), ("consumer", consumer.start)):
        with pytest.raises(BrokerUnavailable) as failed:
            await start()
        text = str(failed.value)
        assert text.startswith(f"{client} cannot connect to COC_WORKER_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1: ")
        assert "KafkaConnectionError" in text
    await publisher.stop()
    await consumer.stop()


async def test_an_unanswered_probe_says_why() -> None:
    """The pause said "broker unreachable: KafkaError", less than aiokafka's own line beside it."""

    async def refused() -> None:
        raise KafkaConnectionError("Connection at 127.0.0.1:19192 closed")

    async def silent() -> None:
        await asyncio.Event().wait()  # a broker that never answers

    with pytest.raises(BrokerUnavailable, match=r"broker unreachable: KafkaConnectionError: .*19192 closed"):
        await broker_answers(refused(), 1.0)
    with pytest.raises(BrokerUnavailable, match=r"broker unreachable: no answer within 0\.05 s"):
        await broker_answers(silent(), 0.05)


@pytest.mark.parametrize(
    ("event_bytes", "limit"), [(256, 1_048_576), (1_048_576, 1_114_112), (4 << 20, (4 << 20) + 65_536)]
)
async def test_every_client_takes_the_largest_record_the_worker_may_meet(
    event_bytes: int, limit: int
) -> None:
    """An event at the size limit with its key and headers: the outcome producer, the consumer's
    fetch and the tools' clients each wrote this limit out by hand (four copies); the tools' now
    build from the same helpers (``producer_kwargs``, ``record_limit_bytes``)."""
    settings = load_settings(kafka_bootstrap_servers="127.0.0.1:1", max_event_bytes=event_bytes)
    publisher, consumer = Publisher(settings), Consumer(settings, None)  # type: ignore[arg-type]
    try:
        assert publisher._producer._max_request_size == limit
        assert consumer._consumer._max_partition_fetch_bytes == limit
    finally:
        await publisher.stop()
        await consumer.stop()


class _RefusingAdmin:
    """An admin client whose broker answers CreateTopics with ``code`` for every topic."""

    code = 0

    def __init__(self, **kwargs: object) -> None:
        return None

    async def start(self) -> None:
        return None

    async def list_topics(self) -> list[str]:
        return []

    async def create_topics(self, topics: list[object]) -> object:
        class Response:
            topic_errors = [(t.name, _RefusingAdmin.code, None) for t in topics]  # type: ignore[attr-defined]

        return Response()

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("code", "error", "says"),
    [
        (38, ConfigError, "INVALID_REPLICATION_FACTOR"),
        (29, ConfigError, "TOPIC_AUTHORIZATION_FAILED"),
        (41, BrokerUnavailable, "Kafka error 41"),  # NOT_CONTROLLER: the broker is busy, try again
    ],
)
async def test_a_topic_the_broker_refuses_to_create_is_a_configuration_error(
    code: int, error: type[Exception], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused for its settings or the ACLs, the start tried again for the whole startup wait as
    if the broker were away (review): waiting will not change that answer."""
    monkeypatch.setattr(kafka_config, "AIOKafkaAdminClient", _RefusingAdmin)
    monkeypatch.setattr(_RefusingAdmin, "code", code)
    with pytest.raises(error, match=says):
        await kafka_config.ensure_topics(load_settings(topic_replication_factor=3))


# --- client certificates (mTLS) ------------------------------------------------------------------------
KEY_PASSWORD = "k3y-Pass-never-shown"


@dataclass(frozen=True)
class Pki:
    """A CA, a broker's certificate and the worker's, as PEM files (trustme: real certificates)."""

    ca: trustme.CA
    broker: trustme.LeafCert
    cafile: Path
    certfile: Path
    keyfile: Path
    #: the certificate and its key in one file (a keyfile is then not needed)
    combined: Path
    #: the key, encrypted with KEY_PASSWORD
    encrypted_keyfile: Path
    #: another certificate, not of the worker's key
    broker_certfile: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    broker = ca.issue_cert("127.0.0.1", "localhost")
    worker = ca.issue_cert("coc-worker.clients.test", common_name="coc-worker")
    root = tmp_path_factory.mktemp("pki")
    encrypted = encrypted_key(worker, KEY_PASSWORD)
    files = {
        "cafile": ca.cert_pem.bytes(),
        "certfile": b"".join(blob.bytes() for blob in worker.cert_chain_pems),
        "keyfile": worker.private_key_pem.bytes(),
        "combined": worker.private_key_and_cert_chain_pem.bytes(),
        "encrypted_keyfile": encrypted,
        "broker_certfile": broker.cert_chain_pems[0].bytes(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(data)
    return Pki(ca=ca, broker=broker, **paths)


@dataclass
class TlsServer:
    port: int
    #: the common name of each client certificate the server accepted, in order
    clients: list[str]


@contextlib.asynccontextmanager
async def broker_requiring_client_certificates(pki: Pki) -> AsyncIterator[TlsServer]:
    """A TLS server on loopback that, as a broker with ``ssl.client.auth=required``, completes the
    handshake only with a client certificate signed by the CA. It notes whom it accepted and greets
    them with one line."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.broker.configure_cert(context)
    pki.ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    clients: list[str] = []

    async def greet(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # called only once the handshake verified the client's certificate
        subject = dict(name for rdn in writer.get_extra_info("peercert")["subject"] for name in rdn)
        clients.append(subject["commonName"])
        writer.write(b"accepted\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=context)
    async with server:
        yield TlsServer(server.sockets[0].getsockname()[1], clients)


async def greeting(port: int, context: ssl.SSLContext) -> bytes:
    """Connect as the Kafka clients would, with their context: the server's first line, or nothing
    when it hung up (in TLS 1.3 a refused client certificate is known only after the client's own
    side of the handshake, from the server's alert)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return await reader.readline()
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def tls_settings(pki: Pki, **overrides: Any) -> WorkerSettings:
    return load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(pki.cafile), **overrides)


def context_of(settings: WorkerSettings) -> ssl.SSLContext:
    context: ssl.SSLContext = connection_kwargs(settings)["ssl_context"]
    return context


@pytest.mark.parametrize("verify", [True, False])
async def test_a_broker_that_requires_a_client_certificate_accepts_the_configured_one(
    pki: Pki, verify: bool
) -> None:
    """Strimzi's ``tls`` users and MSK's TLS client authentication: the broker closes every
    connection that shows no certificate of its clients' CA (the worker had no way to show one)."""
    with_files = tls_settings(
        pki, kafka_ssl_certfile=str(pki.certfile), kafka_ssl_keyfile=str(pki.keyfile), kafka_ssl_verify=verify
    )
    in_one_file = tls_settings(pki, kafka_ssl_certfile=str(pki.combined), kafka_ssl_verify=verify)
    async with broker_requiring_client_certificates(pki) as broker:
        assert await greeting(broker.port, context_of(with_files)) == b"accepted\n"
        assert await greeting(broker.port, context_of(in_one_file)) == b"accepted\n"
        # the same CA and verification, without the certificate: refused
        assert await greeting(broker.port, context_of(tls_settings(pki, kafka_ssl_verify=verify))) == b""
    assert broker.clients == ["coc-worker", "coc-worker"]


async def test_an_encrypted_key_is_opened_with_its_password_from_the_environment_or_a_file(
    pki: Pki, tmp_path: Path
) -> None:
    password_file = tmp_path / "key-password"
    password_file.write_text(KEY_PASSWORD + "\n", encoding="utf-8")  # a Secret made with `echo`
    files = {"kafka_ssl_certfile": str(pki.certfile), "kafka_ssl_keyfile": str(pki.encrypted_keyfile)}
    async with broker_requiring_client_certificates(pki) as broker:
        for password in (
            {"kafka_ssl_key_password": KEY_PASSWORD},
            {"kafka_ssl_key_password_file": password_file},
        ):
            context = context_of(tls_settings(pki, **files, **password))
            assert await greeting(broker.port, context) == b"accepted\n"
    assert broker.clients == ["coc-worker", "coc-worker"]


def test_a_wrong_key_password_is_a_configuration_error_that_never_shows_it(pki: Pki, tmp_path: Path) -> None:
    wrong = "wr0ng-" + KEY_PASSWORD
    password_file = tmp_path / "key-password"
    password_file.write_text(wrong, encoding="utf-8")
    files = {"kafka_ssl_certfile": str(pki.certfile), "kafka_ssl_keyfile": str(pki.encrypted_keyfile)}
    for source, password in (
        ("COC_WORKER_KAFKA_SSL_KEY_PASSWORD", {"kafka_ssl_key_password": wrong}),
        ("COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE", {"kafka_ssl_key_password_file": password_file}),
    ):
        with pytest.raises(ConfigError) as refused:
            connection_kwargs(tls_settings(pki, **files, **password))
        assert str(refused.value) == (
            f"{source}: does not open the encrypted key in COC_WORKER_KAFKA_SSL_KEYFILE (a wrong"
            " password, or a damaged key)"
        )


@pytest.mark.parametrize("key_in", ["keyfile", "certfile"])
def test_an_encrypted_key_without_a_password_is_refused_without_asking_the_terminal(
    pki: Pki, key_in: str, tmp_path: Path
) -> None:
    """Without a password callback OpenSSL asks for the pass phrase on the terminal: a worker
    started from one would wait there, before any log line."""
    if key_in == "keyfile":
        files = {"kafka_ssl_certfile": str(pki.certfile), "kafka_ssl_keyfile": str(pki.encrypted_keyfile)}
    else:
        combined = tmp_path / "combined.pem"
        combined.write_bytes(pki.encrypted_keyfile.read_bytes() + pki.certfile.read_bytes())
        files = {"kafka_ssl_certfile": str(combined)}
    with pytest.raises(ConfigError) as refused:
        connection_kwargs(tls_settings(pki, **files))
    assert str(refused.value) == (
        f"COC_WORKER_KAFKA_SSL_{key_in.upper()}: the key is encrypted, and no password is given (set"
        " COC_WORKER_KAFKA_SSL_KEY_PASSWORD or COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE)"
    )


def test_a_key_of_another_certificate_is_refused(pki: Pki) -> None:
    settings = tls_settings(
        pki, kafka_ssl_certfile=str(pki.broker_certfile), kafka_ssl_keyfile=str(pki.keyfile)
    )
    with pytest.raises(ConfigError) as refused:
        connection_kwargs(settings)
    assert str(refused.value) == (
        "COC_WORKER_KAFKA_SSL_KEYFILE: the key is not the certificate's in COC_WORKER_KAFKA_SSL_CERTFILE"
    )


def test_a_key_of_another_type_is_refused_as_not_the_certificates(pki: Pki, tmp_path: Path) -> None:
    """An RSA key for the worker's ECDSA certificate: OpenSSL says NO_CERTIFICATE_ASSIGNED, not
    KEY_VALUES_MISMATCH. It read as "cannot load", or, encrypted and opened with the right
    password, as a wrong password."""
    rsa = pki.ca.issue_cert("other.clients.test", key_type=trustme.KeyType.RSA)
    plain, encrypted = tmp_path / "rsa.key", tmp_path / "rsa-encrypted.key"
    plain.write_bytes(rsa.private_key_pem.bytes())
    encrypted.write_bytes(encrypted_key(rsa, KEY_PASSWORD))
    for keyfile, password in ((plain, {}), (encrypted, {"kafka_ssl_key_password": KEY_PASSWORD})):
        settings = tls_settings(
            pki, kafka_ssl_certfile=str(pki.certfile), kafka_ssl_keyfile=str(keyfile), **password
        )
        with pytest.raises(ConfigError) as refused:
            connection_kwargs(settings)
        assert str(refused.value) == (
            "COC_WORKER_KAFKA_SSL_KEYFILE: the key is not the certificate's in COC_WORKER_KAFKA_SSL_CERTFILE"
        )


def test_a_client_certificate_file_that_cannot_be_read_is_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    cases = [
        ({"kafka_ssl_certfile": str(missing)}, f"COC_WORKER_KAFKA_SSL_CERTFILE={missing}: cannot read it"),
        (
            {"kafka_ssl_certfile": str(pki.certfile), "kafka_ssl_keyfile": str(missing)},
            f"COC_WORKER_KAFKA_SSL_KEYFILE={missing}: cannot read it",
        ),
        (
            {"kafka_ssl_certfile": str(pki.certfile), "kafka_ssl_key_password_file": str(missing)},
            "cannot read COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE",
        ),
        (  # a certificate without its key, which is in a file of its own
            {"kafka_ssl_certfile": str(pki.certfile)},
            f"COC_WORKER_KAFKA_SSL_CERTFILE={pki.certfile}: no PEM private key in it (a key in a file of"
            " its own goes in COC_WORKER_KAFKA_SSL_KEYFILE)",
        ),
        (  # the two files swapped
            {"kafka_ssl_certfile": str(pki.keyfile), "kafka_ssl_keyfile": str(pki.certfile)},
            f"COC_WORKER_KAFKA_SSL_CERTFILE={pki.keyfile}: no PEM certificate that can be read in it",
        ),
        (  # empty: a Secret's key before its first sync (it was a ValueError and a traceback)
            {"kafka_ssl_certfile": str(empty), "kafka_ssl_keyfile": str(pki.keyfile)},
            f"COC_WORKER_KAFKA_SSL_CERTFILE={empty}: no PEM certificate that can be read in it",
        ),
    ]
    for files, says in cases:
        with pytest.raises(ConfigError, match=re.escape(says)):
            connection_kwargs(tls_settings(pki, **files))


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_without_tls_the_client_certificate_is_not_read(protocol: str, tmp_path: Path) -> None:
    """As the CA file: set for a TLS listener, unused (and not read) with the other protocols."""
    missing = str(tmp_path / "absent.pem")
    settings = load_settings(
        kafka_security_protocol=protocol,
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_sasl_password="s3cret-password",
        kafka_ssl_cafile=missing,
        kafka_ssl_certfile=missing,
        kafka_ssl_keyfile=missing,
        kafka_ssl_key_password_file=missing,
    )
    with capture_logs() as logs:
        assert "ssl_context" not in connection_kwargs(settings)
    # said, as a broker that wants a client certificate would only close every connection
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("kafka_tls_settings_ignored", "warning")
    ]
    assert logs[0]["settings"] == [
        "COC_WORKER_KAFKA_SSL_CAFILE",
        "COC_WORKER_KAFKA_SSL_CERTFILE",
        "COC_WORKER_KAFKA_SSL_KEYFILE",
        "COC_WORKER_KAFKA_SSL_KEY_PASSWORD",
    ]


def test_plaintext_without_tls_settings_says_nothing() -> None:
    with capture_logs() as logs:
        connection_kwargs(load_settings(kafka_security_protocol="PLAINTEXT"))
    assert logs == []


async def test_every_kafka_client_of_the_worker_and_its_tools_shows_the_certificate(tmp_path: Path) -> None:
    """Each client is built from ``connection_kwargs`` (producer, consumer, admin, the tools'): a
    certificate that does not load stops each one, named, before any connection."""
    missing = tmp_path / "absent.pem"
    settings = load_settings(kafka_security_protocol="SSL", kafka_ssl_certfile=str(missing))
    says = re.escape(f"COC_WORKER_KAFKA_SSL_CERTFILE={missing}: cannot read it")
    with pytest.raises(ConfigError, match=says):
        Publisher(settings)
    with pytest.raises(ConfigError, match=says):
        Consumer(settings, handler=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=says):
        await kafka_config.ensure_topics(settings)
    with pytest.raises(ConfigError, match=says):
        await EventProducer(settings).start()
    with pytest.raises(ConfigError, match=says):
        await TopicReader(settings, settings.results_topic).start()
