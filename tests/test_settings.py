"""Settings: documented defaults, environment, overrides, validation, secrets and their files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.errors import ConfigError
from worker.logs import REDACTED, redact_text
from worker.redis_config import dedup_target
from worker.settings import (
    COC_REGION_ENDPOINTS,
    ENV_PREFIX,
    SECRET_FIELDS,
    WorkerSettings,
    load_settings,
    without_password,
)

SECRET = "s3cr3t-VALUE-never-shown"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts from an environment without any ``COC_WORKER_*`` variable."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


#: What a secret needs set beside it to be taken at all: the Redis password, a Redis dedup store.
_SECRET_NEEDS = {"dedup_redis_password": {"COC_WORKER_DEDUP_URL": "redis://redis:6379/0"}}


def secret_context(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Set what the secret ``name`` needs beside it (``_SECRET_NEEDS``)."""
    for variable, value in _SECRET_NEEDS.get(name, {}).items():
        monkeypatch.setenv(variable, value)


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    return str(info.value)


# --- defaults ------------------------------------------------------------------------------------


def test_documented_defaults() -> None:
    settings = load_settings()
    assert settings.input_topic == "coc.change-events"
    assert settings.results_topic == "coc.change-outcomes"
    assert settings.dlq_topic == "coc.change-events.dlq"
    assert settings.group_id == "coc-change-worker"
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert settings.api_endpoint is None
    assert settings.api_region is None
    assert all(getattr(settings, name) is None for name in SECRET_FIELDS)
    assert settings.max_in_flight == 256
    assert settings.max_event_bytes == 1_048_576
    assert settings.log_level == "INFO"


def test_each_load_gets_its_own_worker_id() -> None:
    first, second = load_settings().worker_id, load_settings().worker_id
    assert first
    assert first != second


# --- environment and overrides -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "field", "value", "expected"),
    [
        ("COC_WORKER_INPUT_TOPIC", "input_topic", "in", "in"),
        ("COC_WORKER_RESULTS_TOPIC", "results_topic", "out", "out"),
        ("COC_WORKER_DLQ_TOPIC", "dlq_topic", "dead", "dead"),
        ("COC_WORKER_GROUP_ID", "group_id", "g1", "g1"),
        ("COC_WORKER_MAX_IN_FLIGHT", "max_in_flight", "8", 8),
        ("COC_WORKER_API_REQUEST_TIMEOUT_S", "api_request_timeout_s", "2.5", 2.5),
        ("COC_WORKER_KAFKA_SSL_VERIFY", "kafka_ssl_verify", "false", False),
        (
            "COC_WORKER_KAFKA_SSL_CERTFILE",
            "kafka_ssl_certfile",
            "/etc/coc-worker/kafka-client/client.crt",
            Path("/etc/coc-worker/kafka-client/client.crt"),
        ),
        (
            "COC_WORKER_KAFKA_BOOTSTRAP_SERVERS",
            "kafka_bootstrap_servers",
            " a:9092 , b:9093 ",
            "a:9092,b:9093",
        ),
        ("COC_WORKER_API_ENDPOINT", "api_endpoint", "https://coc.example.com/", "https://coc.example.com"),
        ("COC_WORKER_LOG_LEVEL", "log_level", "DEBUG", "DEBUG"),
        ("coc_worker_group_id", "group_id", "lower", "lower"),
    ],
)
def test_environment_is_read(
    monkeypatch: pytest.MonkeyPatch, env: str, field: str, value: str, expected: object
) -> None:
    monkeypatch.setenv(env, value)
    assert getattr(load_settings(), field) == expected


@pytest.mark.parametrize(
    "servers",
    ["user:pw-" + SECRET + "@kafka:9092", "kafka:9092,SASL_SSL://kafka-2:9093", "kafka 1:9092"],
)
def test_bootstrap_servers_with_credentials_or_a_scheme_are_refused_without_showing_them(
    servers: str,
) -> None:
    """``user:password@host:9092`` passed as a host name (only the port was checked), and the
    start-up line then printed the password."""
    with pytest.raises(ConfigError, match="no scheme and no credentials") as refused:
        load_settings(kafka_bootstrap_servers=servers)
    assert SECRET not in str(refused.value)


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COC_WORKER_INPUT_TOPIC", "from-env")
    monkeypatch.setenv("COC_WORKER_MAX_IN_FLIGHT", "4")
    settings = load_settings(input_topic="from-cli", max_in_flight=16)
    assert settings.input_topic == "from-cli"
    assert settings.max_in_flight == 16


def test_unset_overrides_leave_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COC_WORKER_INPUT_TOPIC", "from-env")
    assert load_settings(input_topic=None).input_topic == "from-env"


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("COC_WORKER_INPUT_TOPIC", ""),
        ("COC_WORKER_MAX_IN_FLIGHT", "0"),
        ("COC_WORKER_MAX_IN_FLIGHT", "many"),
        ("COC_WORKER_API_REQUEST_TIMEOUT_S", "0"),
        ("COC_WORKER_RETRY_MAX_ATTEMPTS", "-1"),
        ("COC_WORKER_KAFKA_SSL_VERIFY", "maybe"),
        ("COC_WORKER_KAFKA_BOOTSTRAP_SERVERS", "localhost"),
        ("COC_WORKER_KAFKA_BOOTSTRAP_SERVERS", " , "),
        ("COC_WORKER_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("COC_WORKER_API_ENDPOINT", "ftp://coc.example.com"),
        ("COC_WORKER_API_ENDPOINT", "coc.example.com"),
        ("COC_WORKER_API_REGION", "mars-1"),
        ("COC_WORKER_DEDUP_URL", "postgres://db/x"),
        ("COC_WORKER_HTTP_PORT", "70000"),
        ("COC_WORKER_LOG_LEVEL", "TRACE"),
        ("COC_WORKER_MAX_EVENT_BYTES", "10"),
    ],
)
def test_invalid_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    message = config_error()
    assert f"{env}:" in message


def test_invalid_override_names_the_variable() -> None:
    assert "COC_WORKER_GROUP_ID:" in config_error(group_id="")


def test_unknown_override_rejected() -> None:
    assert "COC_WORKER_INPUT_TOPIK" in config_error(input_topik="x")


def test_every_problem_is_reported() -> None:
    message = config_error(input_topic="", max_in_flight=0)
    assert "COC_WORKER_INPUT_TOPIC" in message
    assert "COC_WORKER_MAX_IN_FLIGHT" in message


def test_sasl_protocol_needs_a_mechanism() -> None:
    assert "invalid settings: COC_WORKER_KAFKA_SASL_MECHANISM is required" in config_error(
        kafka_security_protocol="SASL_SSL"
    )
    settings = load_settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512")
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"


def test_buffer_is_four_slots_deep_unless_set_and_never_below_max_in_flight() -> None:
    assert load_settings(max_in_flight=64).buffer_limit == 256
    assert load_settings(max_in_flight=64, max_buffered=64).buffer_limit == 64


def test_api_request_limit_follows_max_in_flight_unless_set() -> None:
    # A lower client limit would queue every call above it inside the HTTP client (at 20 ms API
    # latency, 100 of 256 running events calling at once cost ~10% of the throughput).
    assert load_settings(max_in_flight=64).api_request_limit == 64
    assert load_settings(max_in_flight=64, api_max_connections=16).api_request_limit == 16
    assert "COC_WORKER_MAX_BUFFERED must be at least COC_WORKER_MAX_IN_FLIGHT" in config_error(
        max_in_flight=64, max_buffered=63
    )


def test_heartbeat_at_most_a_third_of_the_session() -> None:
    assert "COC_WORKER_KAFKA_HEARTBEAT_INTERVAL_MS" in config_error(
        kafka_session_timeout_ms=6_000, kafka_heartbeat_interval_ms=2_001
    )
    assert load_settings(kafka_session_timeout_ms=6_000, kafka_heartbeat_interval_ms=2_000)


# --- endpoint ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("region", "endpoint"), list(COC_REGION_ENDPOINTS.items()))
def test_region_gives_its_endpoint(monkeypatch: pytest.MonkeyPatch, region: str, endpoint: str) -> None:
    monkeypatch.setenv("COC_WORKER_API_REGION", region)
    assert load_settings().api_base_url == endpoint


def test_known_regions() -> None:
    assert COC_REGION_ENDPOINTS["cn-north-4"] == "https://coc.myhuaweicloud.com"
    assert COC_REGION_ENDPOINTS["ap-southeast-3"] == "https://coc-intl.myhuaweicloud.com"


def test_explicit_endpoint_wins_over_region() -> None:
    settings = load_settings(api_region="cn-north-4", api_endpoint="http://127.0.0.1:8443/")
    assert settings.api_base_url == "http://127.0.0.1:8443"


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://coc.example.com:99999",  # the client refused it per request: every event failed
        "https://coc.example.com:0",
        "https://exa mple.com",
        "https://gw.example.com/coc/./api",  # the client sent /coc/api, signed was /coc/./api: 401s
        "https://gw.example.com/coc/../api",
        "https://gw.example.com/coc\\api",
        "https://gw.example.com/c%6Fc",
        "https://user:pw-x@gw.example.com",
        "https://gw.example.com/coc?x=1",
    ],
)
def test_an_endpoint_the_http_client_would_refuse_or_rewrite_is_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(api_endpoint=endpoint)
    assert "pw-x" not in str(refused.value)


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:8443", "https://[::1]:8443/coc", "https://gw_1.internal/coc/v2.1/"]
)
def test_usual_endpoints_pass(endpoint: str) -> None:
    assert load_settings(api_endpoint=endpoint).api_endpoint == endpoint.rstrip("/")


def test_no_endpoint_and_no_region() -> None:
    settings = load_settings()
    with pytest.raises(ConfigError, match="COC_WORKER_API_ENDPOINT or COC_WORKER_API_REGION"):
        _ = settings.api_base_url


# --- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SECRET_FIELDS)
def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    secret_context(monkeypatch, name)
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", SECRET)
    assert load_settings().secret(name) == SECRET
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", SECRET + "\n")  # a Secret made with `echo`
    assert load_settings().secret(name) == SECRET


@pytest.mark.parametrize("name", SECRET_FIELDS)
def test_a_secret_variable_that_is_not_utf8_is_named_and_never_quoted(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates; the codec's error ("can't encode
    character '\\udcff' in position 8") came out as the settings error: a byte of the secret and
    where it sits, the variable not named."""
    secret_context(monkeypatch, name)
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", "abcdefgh\udcffijklmnop")
    message = config_error()
    assert f"{ENV_PREFIX}{name.upper()} is not UTF-8 text" in message
    assert "udcff" not in message
    assert "position" not in message


@pytest.mark.parametrize("name", ["api_domain_id", "api_project_id"])
def test_ids_sent_as_headers_must_be_header_safe(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", "0a1b2c3d4e5f\n")
    assert getattr(load_settings(), name) == "0a1b2c3d4e5f"
    for bad in ("0a1b 2c3d", "0a1b\r\nX-Injected: 1", "ünïcode"):
        monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", bad)
        with pytest.raises(ConfigError, match=f"{ENV_PREFIX}{name.upper()}: .*visible ASCII"):
            load_settings()


@pytest.mark.parametrize("name", SECRET_FIELDS)
def test_secret_file_is_read_and_re_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    secret_context(monkeypatch, name)
    path = tmp_path / f"{name}.secret"
    path.write_text(SECRET + "\n", encoding="utf-8")
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}_FILE", str(path))
    settings = load_settings()
    assert settings.secret(name) == SECRET

    path.write_text("rotated-" + SECRET, encoding="utf-8")
    assert settings.secret(name) == "rotated-" + SECRET

    path.write_text("", encoding="utf-8")
    assert settings.secret(name) is None


@pytest.mark.parametrize("name", SECRET_FIELDS)
def test_a_secret_re_read_from_its_rotated_file_is_scrubbed_from_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    """Only the values read at start were known to the log redactor: a SASL password re-read
    after its file was rotated (each Kafka client built later reads it again) was not."""
    secret_context(monkeypatch, name)
    path = tmp_path / f"{name}.secret"
    path.write_text(SECRET, encoding="utf-8")
    settings = load_settings(**{f"{name}_file": str(path)})
    rotated = f"rotated-{name}-{os.urandom(8).hex()}"  # known to no earlier test
    assert redact_text(f"text with {rotated}") == f"text with {rotated}"  # not read yet: unknown
    path.write_text(rotated, encoding="utf-8")
    assert settings.secret(name) == rotated
    assert redact_text(f"text with {rotated}") == f"text with {REDACTED}"


def test_an_empty_redis_key_prefix_is_refused() -> None:
    """Every dedup key would be a bare event_id, among whatever else the database holds."""
    assert "?prefix= must not be empty" in config_error(dedup_url="redis://redis:6379/0?prefix=")


def test_a_short_redis_password_is_refused_without_being_shown() -> None:
    """As every other secret: under 8 characters a password is guessable, and the redactor (which
    leaves values under 4 alone) could not scrub it."""
    message = config_error(dedup_url="redis://:pw12@redis:6379/0")
    assert "the Redis password is 4 characters; at least 8 are needed" in message
    assert "pw12" not in message
    assert load_settings(dedup_url="redis://:pw123456@redis:6379/0").secret_values() == ["pw123456"]
    assert load_settings(dedup_url="redis://acl-user:@redis:6379/0").secret_values() == []  # none at all


def test_missing_secret_file_names_the_variable(tmp_path: Path) -> None:
    settings = load_settings(api_sk_file=tmp_path / "absent")
    with pytest.raises(ConfigError, match="COC_WORKER_API_SK_FILE"):
        settings.secret("api_sk")
    assert settings.secret_values() == []


@pytest.mark.parametrize("name", SECRET_FIELDS)
def test_value_and_file_together_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET, encoding="utf-8")
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", SECRET)
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}_FILE", str(path))
    message = config_error()
    assert f"{ENV_PREFIX}{name.upper()} or {ENV_PREFIX}{name.upper()}_FILE" in message
    assert SECRET not in message


def test_secret_values_lists_every_secret(tmp_path: Path) -> None:
    path = tmp_path / "sk"
    path.write_text("file-" + SECRET, encoding="utf-8")
    settings = load_settings(api_ak="AK-" + SECRET, api_sk_file=path, api_token="token-" + SECRET)
    assert sorted(settings.secret_values()) == sorted(["AK-" + SECRET, "file-" + SECRET, "token-" + SECRET])


@pytest.mark.parametrize(
    "overrides",
    [{"api_token": "tok"}, {"kafka_sasl_password": "pw12345"}, {"ingest_tokens": "long-enough-token,short"}],
)
def test_short_secrets_are_refused(overrides: dict[str, str], tmp_path: Path) -> None:
    """Before, a secret under 4 characters was accepted and never scrubbed from any output."""
    with pytest.raises(ConfigError, match="at least 8 are needed"):
        load_settings(**overrides)
    [(name, value)] = overrides.items()
    path = tmp_path / name
    path.write_text(value + "\n", encoding="utf-8")
    settings = load_settings(**{f"{name}_file": str(path)})  # a file is read when used: refused then
    with pytest.raises(ConfigError, match="at least 8 are needed"):
        settings.secret(name)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw/rest-of-it@redis:6379/0",
        "redis://:p#ss-word@redis:6379/0",
        "redis://:p?ss-word@redis:6379/0",
        # Python's own URL parser quotes these in its errors: brackets that hold no IPv6 address,
        # and characters that NFKC-normalise to @ : / ? (a CJK input method's full-width ones).
        "redis://:Xy7[rest-of-it]Pq9@redis:6379/0",
        "redis://:rest-of-it\uff20redis:6379/0",
        "redis://:ss-word\uff1arest-of-it@redis:6379/0",
    ],
)
def test_a_redis_password_that_breaks_the_url_is_refused_without_showing_it(url: str) -> None:
    """Before, the URL parsed with part of the password as the host or port: nothing was masked or
    registered, and redis-py's error printed it ('Port could not be cast to integer value as ...')."""
    with pytest.raises(ConfigError) as refused:
        load_settings(dedup_url=url)
    assert "percent-encoded" in str(refused.value)
    assert "rest-of-it" not in str(refused.value)
    assert "ss-word" not in str(refused.value)
    encoded = load_settings(dedup_url="redis://:pw%2Frest-of-it@redis:6379/0")
    assert encoded.secret_values() == ["pw%2Frest-of-it", "pw/rest-of-it"]  # as written, as sent


@pytest.mark.parametrize(
    "endpoint", ["https://ak:x[rest-of-it]@coc.example.com", "https://ak:rest-of-it\uff20coc.example.com"]
)
def test_an_endpoint_python_cannot_parse_is_refused_without_showing_it(endpoint: str) -> None:
    """``urlsplit``'s own error quoted the URL, credentials and all."""
    with pytest.raises(ConfigError, match="must be an http") as refused:
        load_settings(api_endpoint=endpoint)
    assert "rest-of-it" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["memory://?max_entries=0", "memory://?max_entries=-1", "memory://?max_entries=abc", "memory://?size=9"],
)
def test_a_memory_store_size_that_breaks_deduplication_is_refused(url: str) -> None:
    """0 kept no record (two owners' claims of a live event were both NEW), -1 failed every event,
    a word failed at start with a traceback; an unknown option was ignored."""
    with pytest.raises(ConfigError, match="memory://"):
        load_settings(dedup_url=url)
    assert load_settings(dedup_url="memory://?max_entries=1").dedup_url == "memory://?max_entries=1"
    assert load_settings(dedup_url="memory://").dedup_url == "memory://"


def test_secrets_never_shown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "sk"
    path.write_text("file-" + SECRET, encoding="utf-8")
    monkeypatch.setenv("COC_WORKER_API_AK", "ak-" + SECRET)
    monkeypatch.setenv("COC_WORKER_API_SK_FILE", str(path))
    monkeypatch.setenv("COC_WORKER_KAFKA_SSL_KEY_PASSWORD", "key-" + SECRET)
    settings = load_settings(
        api_token="token-" + SECRET, kafka_sasl_password="pw-" + SECRET, kafka_ssl_certfile="client.pem"
    )
    assert settings.secret("api_token") == "token-" + SECRET
    assert settings.secret("kafka_ssl_key_password") == "key-" + SECRET
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump())):
        assert SECRET not in text


def test_a_password_in_the_dedup_url_is_not_shown() -> None:
    settings = load_settings(dedup_url="redis://worker:pw-" + SECRET + "@redis.internal:6379/0")
    assert settings.secret_values() == ["pw-" + SECRET]  # the redactor scrubs it from all output
    for text in (repr(settings), str(settings)):
        assert SECRET not in text
        assert "redis://worker:***@redis.internal:6379/0" in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://pw-" + SECRET + "@redis.internal:6379/0", "redis://***@redis.internal:6379/0"),
        ("redis://:pw-" + SECRET + "@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
        ("redis://redis.internal:6379/0", "redis://redis.internal:6379/0"),
    ],
    ids=["password-where-the-user-goes", "password", "none"],
)
def test_a_password_written_where_the_user_goes_is_not_shown(url: str, shown: str) -> None:
    """``redis://S3cret@host`` (the colon forgotten) passed the secret as a user name, and the
    start-up line and the settings' repr printed it in clear."""
    settings = load_settings(dedup_url=url)
    assert without_password(url) == shown
    if "@" in url:  # the log redactor knows it too
        assert "pw-" + SECRET in settings.secret_values()
    for text in (repr(settings), str(settings)):
        assert SECRET not in text
        assert shown in text


# --- the Redis password apart from the URL ------------------------------------------------------
REDIS_PASSWORD = "redis-pw-" + SECRET


def test_the_redis_password_setting_is_a_secret_like_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Secret holding only the password (Bitnami's ``redis-password``) could reach the worker
    only spliced into a URL by hand; now it has a variable of its own, kept as the others are."""
    monkeypatch.setenv("COC_WORKER_DEDUP_URL", "redis://redis-master:6379/0")
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD", REDIS_PASSWORD + "\n")  # a Secret made with `echo`
    settings = load_settings()
    assert "dedup_redis_password" in SECRET_FIELDS
    assert settings.secret("dedup_redis_password") == REDIS_PASSWORD
    assert settings.secret_values() == [REDIS_PASSWORD]  # the redactor scrubs it from all output
    assert redact_text(f"AUTH {REDIS_PASSWORD}") == f"AUTH {REDACTED}"
    for text in (repr(settings), str(settings), settings.model_dump_json(), settings.dedup_url_shown):
        assert SECRET not in text
    # as short as the worker refuses any other secret (and as it refused it inside the URL)
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD", "pw12345")
    message = config_error()
    assert "COC_WORKER_DEDUP_REDIS_PASSWORD: a value of 7 characters; at least 8 are needed" in message
    assert "pw12345" not in message
    # empty counts as not set (compose's ${REDIS_PASSWORD:-}), whatever the store
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD", "")
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD_FILE", "")
    monkeypatch.setenv("COC_WORKER_DEDUP_URL", "sqlite:///d.sqlite3")
    assert load_settings().secret("dedup_redis_password") is None


def test_the_redis_password_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Vault agent or a CSI driver delivers the password as a file; the clients get what it holds."""
    path = tmp_path / "redis-password"
    path.write_text(REDIS_PASSWORD + "\n", encoding="utf-8")
    monkeypatch.setenv("COC_WORKER_DEDUP_URL", "rediss://redis:6380/0")
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD_FILE", str(path))
    settings = load_settings()
    target = dedup_target(settings)
    assert (target.url, target.password) == ("rediss://redis:6380/0", REDIS_PASSWORD)
    assert SECRET not in repr(target)
    assert REDIS_PASSWORD in settings.secret_values()
    path.write_text("Zq9x7w\n", encoding="utf-8")  # read when a client is made: refused then
    with pytest.raises(ConfigError, match="COC_WORKER_DEDUP_REDIS_PASSWORD_FILE: a value of 6") as short:
        dedup_target(settings)
    assert "Zq9x7w" not in str(short.value)


@pytest.mark.parametrize("url", ["sqlite:///d.sqlite3", "memory://"])
@pytest.mark.parametrize(
    "variable", ["COC_WORKER_DEDUP_REDIS_PASSWORD", "COC_WORKER_DEDUP_REDIS_PASSWORD_FILE"]
)
def test_a_redis_password_without_a_redis_store_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, variable: str
) -> None:
    """Set for a store that logs in nowhere, it would be dropped without a word: the operator
    meant a Redis, and the replicas would each keep their own records."""
    path = tmp_path / "redis-password"
    path.write_text(REDIS_PASSWORD, encoding="utf-8")
    monkeypatch.setenv("COC_WORKER_DEDUP_URL", url)
    monkeypatch.setenv(variable, str(path) if variable.endswith("_FILE") else REDIS_PASSWORD)
    message = config_error()
    assert (
        f"{variable} is the Redis dedup store's password, and COC_WORKER_DEDUP_URL names no Redis" in message
    )
    assert SECRET not in message


def test_a_redis_password_in_the_url_and_in_the_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two passwords: which one logs in would be redis-py's choice (the URL's), not the operator's."""
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD", REDIS_PASSWORD)
    for url in (
        "redis://:url-pw-" + SECRET + "@redis:6379/0",
        "redis://acl-user:url-pw-" + SECRET + "@redis/0",
    ):
        monkeypatch.setenv("COC_WORKER_DEDUP_URL", url)
        message = config_error()
        assert (
            "COC_WORKER_DEDUP_REDIS_PASSWORD and a password in COC_WORKER_DEDUP_URL: give the password"
            " in one place" in message
        )
        assert SECRET not in message


def test_an_acl_user_in_the_url_with_the_password_setting_is_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """``redis://coc-worker@redis`` with the password apart: the user is a name, shown where the
    URL is (masked, as a password written where the user goes, the start-up line hid which user
    failed to log in) and not scrubbed from every line (the redactor took "coc-worker" out of the
    worker's own messages)."""
    monkeypatch.setenv("COC_WORKER_DEDUP_URL", "redis://coc-worker@redis:6379/0?prefix=coc:")
    monkeypatch.setenv("COC_WORKER_DEDUP_REDIS_PASSWORD", REDIS_PASSWORD)
    settings = load_settings()
    assert settings.dedup_url_shown == "redis://coc-worker@redis:6379/0"
    assert settings.secret_values() == [REDIS_PASSWORD]
    assert "dedup_url='redis://coc-worker@redis:6379/0?prefix=coc:'" in repr(settings)
    assert SECRET not in repr(settings)
    monkeypatch.delenv("COC_WORKER_DEDUP_REDIS_PASSWORD")  # without it: a password, as before
    assert load_settings().dedup_url_shown == "redis://***@redis:6379/0"


def test_settings_class_is_the_one_entry_point() -> None:
    assert isinstance(load_settings(), WorkerSettings)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dlq_topic": "bad topic!"},
        {"results_topic": ".."},
        {"input_topic": "x" * 250},
        {"dlq_topic": "coc.change-outcomes"},  # the results topic
        {"results_topic": "coc.change-events"},  # the input topic: the worker would read its outcomes
    ],
    ids=["illegal-characters", "dots", "too-long", "dlq-is-results", "results-is-input"],
)
def test_topics_must_be_legal_kafka_names_and_three_different_ones(overrides: dict[str, str]) -> None:
    """A topic name the broker refuses failed only at the first write (a missing dead letter paused
    the worker); the results topic as the input would feed the worker its own outcomes."""
    with pytest.raises(ValidationError):
        WorkerSettings(api_endpoint="http://127.0.0.1:1", api_ak="a", api_sk="sk-0123456789", **overrides)


def test_a_retry_after_cap_beyond_the_budget_is_refused() -> None:
    """Every Retry-After the worker would honour past the budget failed the event at its first 429."""
    with pytest.raises(ConfigError, match="COC_WORKER_RETRY_AFTER_MAX_S"):
        load_settings(retry_after_max_s=300, retry_max_elapsed_s=30)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dedup_ttl_s": "inf"},
        {"dedup_lease_s": "Infinity"},
        {"retry_max_elapsed_s": "inf"},
        {"api_rate_limit_per_s": "inf"},
    ],
)
def test_infinite_durations_and_rates_are_refused(overrides: dict[str, str]) -> None:
    """They were accepted, then crashed at run time: a Redis TTL of inf ms after the API call had
    succeeded (the applied change reported failed, its claim left open), a rate limit at start."""
    [(name, _)] = overrides.items()
    assert f"{ENV_PREFIX}{name.upper()}: Input should be a finite number" in config_error(**overrides)


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis:6379/2?password=" + SECRET,
        "redis://redis:6379/2?" + SECRET,
        "redis://redis:6379/2?prefix=p:&max_connections=2",
        "redis://redis:6379/2?ssl_ca_certs=/etc/ca.pem",  # TLS options on a plain connection
        "redis://redis:6379/0?db=two",  # redis-py raised at start, naming no setting
        "rediss://redis:6380/0?ssl_cert_reqs=strict",  # read as a store outage, for ever
    ],
)
def test_redis_url_options_the_worker_would_drop_are_refused(url: str) -> None:
    """Only ``prefix`` was read and the rest dropped: a ``?password=`` never reached the login, and
    it was shown in clear (the mask covers a password before the host only)."""
    error = config_error(dedup_url=url)
    assert "COC_WORKER_DEDUP_URL" in error
    assert SECRET not in error


def test_redis_url_options_redis_reads_are_accepted() -> None:
    url = "rediss://:pw-secret@redis:6380/0?db=5&prefix=p:&ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false"
    assert load_settings(dedup_url=url).dedup_url == url


def test_a_misspelled_variable_is_refused_with_the_name_it_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings ignores unknown variables: ``COC_WORKER_DEDUP_URI`` left every replica
    on a local sqlite store of its own, and events could be applied twice."""
    monkeypatch.setenv("COC_WORKER_DEDUP_URI", "redis://redis:6379/0")
    monkeypatch.setenv("coc_worker_max_inflight", "5")
    error = config_error()
    assert "COC_WORKER_DEDUP_URI (did you mean COC_WORKER_DEDUP_URL?)" in error
    assert "coc_worker_max_inflight (did you mean COC_WORKER_MAX_IN_FLIGHT?)" in error
    assert "redis://" not in error  # names only, never values
    monkeypatch.delenv("COC_WORKER_DEDUP_URI")
    monkeypatch.delenv("coc_worker_max_inflight")
    monkeypatch.setenv("COC_WORKER_API_SK_FILE", "/run/secrets/sk")  # a known name, with its _FILE
    assert load_settings().api_sk_file == Path("/run/secrets/sk")


def test_a_retry_budget_shorter_than_a_timed_out_call_and_its_settle_wait_is_refused() -> None:
    """After a read timeout the next attempt waits a request timeout for the API to settle: with a
    budget shorter than the call and that wait, one slow answer failed the event at once."""
    with pytest.raises(ConfigError, match="COC_WORKER_RETRY_MAX_ELAPSED_S must be at least"):
        load_settings(retry_max_elapsed_s=20, retry_after_max_s=20)  # 3 + 2 x 10 = 23 s
    assert load_settings(retry_max_elapsed_s=23, retry_after_max_s=20).retry_max_elapsed_s == 23


@pytest.mark.parametrize(
    ("connect", "request_", "lease", "budget"),
    [(0.1, 1.3, 4.8, 2.7), (0.1, 0.8, 3.8, 1.7), (0.3, 0.7, 4.0, 1.7)],
)
def test_bounds_met_exactly_in_decimals_are_met(
    connect: float, request_: float, lease: float, budget: float
) -> None:
    """The chart checks these bounds in exact decimals: a value it renders at the bound must not
    stop the worker because 2 x (0.1 + 1.3) + 2 is 4.800000000000001 in binary floating point."""
    settings = load_settings(
        api_connect_timeout_s=connect,
        api_request_timeout_s=request_,
        dedup_lease_s=lease,
        retry_max_elapsed_s=budget,
        retry_after_max_s=budget,
    )
    assert (settings.dedup_lease_s, settings.retry_max_elapsed_s) == (lease, budget)
    with pytest.raises(ConfigError, match="COC_WORKER_DEDUP_LEASE_S must be at least"):
        load_settings(
            api_connect_timeout_s=connect,
            api_request_timeout_s=request_,
            dedup_lease_s=lease - 0.001,
            retry_max_elapsed_s=budget,
            retry_after_max_s=budget,
        )


def test_kubernetes_service_links_are_not_unknown_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Service named ``coc-worker`` in the namespace gives every pod these variables (unless the
    pod disables service links): they are not typos of settings, and the worker starts."""
    links = {
        "COC_WORKER_SERVICE_HOST": "10.96.12.7",
        "COC_WORKER_SERVICE_PORT": "8080",
        "COC_WORKER_SERVICE_PORT_HTTP": "8080",
        "COC_WORKER_PORT": "tcp://10.96.12.7:8080",
        "COC_WORKER_PORT_8080_TCP": "tcp://10.96.12.7:8080",
        "COC_WORKER_PORT_8080_TCP_PROTO": "tcp",
        "COC_WORKER_PORT_8080_TCP_PORT": "8080",
        "COC_WORKER_PORT_8080_TCP_ADDR": "10.96.12.7",
        "COC_WORKER_INGEST_SERVICE_HOST": "fd00::12",
        "COC_WORKER_INGEST_PORT": "tcp://[fd00::12]:8080",
    }
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    assert load_settings().http_port == 8080
    monkeypatch.setenv("COC_WORKER_DEDUP_URI", "redis://r:6379/0")  # a typo is still refused
    assert "COC_WORKER_DEDUP_URI" in config_error()
    monkeypatch.delenv("COC_WORKER_DEDUP_URI")
    monkeypatch.setenv("COC_WORKER_PORT", "8080")  # a service link's bare _PORT is a URL
    assert "COC_WORKER_PORT" in config_error()
    monkeypatch.setenv("COC_WORKER_PORT", "tcp://10.96.12.7:8080")
    # typos that look like links but are none: a number for a URL, no family's _SERVICE_HOST,
    # a host that is no IP address
    for typo, value in [
        ("COC_WORKER_HTP_PORT", "9000"),
        ("COC_WORKER_METRICS_PORT", "tcp://10.96.12.9:9090"),
        ("COC_WORKER_API_SERVICE_HOST", "cafe"),
    ]:
        monkeypatch.setenv(typo, value)
        assert typo in config_error()
        monkeypatch.delenv(typo)


def test_a_service_named_coc_worker_http_is_named_when_it_sets_the_http_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COC_WORKER_HTTP_SERVICE_HOST", "10.96.12.8")  # set with it, as Kubernetes does
    monkeypatch.setenv("COC_WORKER_HTTP_PORT", "tcp://10.96.12.8:8080")
    message = config_error()
    assert "enableServiceLinks: false" in message
    assert "coc-worker-http" in message


@pytest.mark.parametrize("name", ["api_token", "api_sk", "kafka_sasl_password"])
def test_an_empty_secret_variable_beside_its_file_is_not_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    """Compose's ``${TOKEN:-}`` exports an empty variable: not "set both"."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t-from-a-file-0001\n")
    monkeypatch.setenv(f"COC_WORKER_{name.upper()}", "")
    monkeypatch.setenv(f"COC_WORKER_{name.upper()}_FILE", str(secret_file))
    settings = load_settings()
    assert getattr(settings, name) is None
    assert settings.secret(name) == "s3cr3t-from-a-file-0001"


def test_errors_name_variables_and_a_level_may_be_lower_case(tmp_path: Path) -> None:
    """A check across settings said "settings: Value error, kafka_sasl_mechanism is required", a
    field name no user sets; a short secret read from a file was reported under the variable that
    was not set; ``debug`` was refused as a level."""
    assert WorkerSettings(log_level="debug").log_level == "DEBUG"
    assert "Value error" not in config_error(kafka_security_protocol="SASL_SSL")
    short = tmp_path / "sk"
    short.write_text("short\n")
    with pytest.raises(ConfigError, match=r"^COC_WORKER_API_SK_FILE: a value of 5 characters"):
        WorkerSettings(api_endpoint="http://127.0.0.1:1", api_ak="a", api_sk_file=str(short)).secret("api_sk")


@pytest.mark.parametrize("protocol", ["SSL", "PLAINTEXT"])
def test_a_client_key_without_its_certificate_is_refused(protocol: str) -> None:
    """A key is shown to the broker only with its certificate: alone it would be ignored, and a
    broker that requires one would close every connection with no word of why."""
    message = config_error(kafka_security_protocol=protocol, kafka_ssl_keyfile="client.key")
    assert "COC_WORKER_KAFKA_SSL_KEYFILE without COC_WORKER_KAFKA_SSL_CERTFILE" in message
    settings = load_settings(
        kafka_security_protocol=protocol, kafka_ssl_certfile="client.crt", kafka_ssl_keyfile="client.key"
    )
    assert (settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile) == (
        Path("client.crt"),
        Path("client.key"),
    )


def test_the_client_key_password_needs_8_characters_and_is_scrubbed_from_output() -> None:
    """It is never sent anywhere, but every secret read is scrubbed from all output: a short one
    ("true", "123456") was scrubbed out of JSON log lines ("ready": **redacted**) and offsets."""
    short = "k" + os.urandom(3).hex()  # 7 characters, known to no earlier test
    with pytest.raises(
        ConfigError, match="COC_WORKER_KAFKA_SSL_KEY_PASSWORD: a value of 7 characters"
    ) as refused:
        load_settings(kafka_ssl_certfile="client.pem", kafka_ssl_key_password=short)
    assert short not in str(refused.value)
    good = "k" + os.urandom(8).hex()
    settings = load_settings(kafka_ssl_certfile="client.pem", kafka_ssl_key_password=good)
    assert settings.secret("kafka_ssl_key_password") == good
    assert redact_text(f"key {good} here") == f"key {REDACTED} here"
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert good not in text
