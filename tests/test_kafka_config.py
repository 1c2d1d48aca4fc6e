"""Kafka client settings: TLS verification on by default, off only when asked, with a warning."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aiokafka.errors import KafkaConnectionError
from structlog.testing import capture_logs

from worker import kafka_config
from worker.consumer import Consumer
from worker.errors import BrokerUnavailable, ConfigError
from worker.kafka_config import broker_answers, connection_kwargs
from worker.publisher import Publisher
from worker.settings import COMMIT_TIMEOUT_S, REVOKE_CANCEL_WAIT_S, load_settings


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
