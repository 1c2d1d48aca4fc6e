"""AK/SK signing: byte-for-byte the official ``huaweicloudsdkcore`` signer, and a verifier that holds."""

from __future__ import annotations

import copy
import hashlib
import json
import string
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import signing
from worker.signing import DATE_FORMAT, QueryParam, canonical_uri, parse_authorization, sign, verify

AK, SK = "HPUAEXAMPLEAK0000001", "exampleSecretKey0000000000000000000000000"
HOST = "coc.myhuaweicloud.com"
DATE = "20250626T191938Z"
SIGNED_AT = datetime(2025, 6, 26, 19, 19, 38, tzinfo=UTC)
PATH = "/v1/change/tickets/CM202506261919380164485133"
BODY = json.dumps({"history_info": {"action": "change_start_change_success"}}).encode()


def official(
    *,
    ak: str,
    sk: str,
    method: str,
    host: str,
    path: str,
    query: list[QueryParam],
    headers: dict[str, str],
    body: bytes,
) -> str:
    request = SdkRequest(
        method=method,
        schema="https",
        host=host,
        resource_path=path,
        query_params=copy.deepcopy(query),  # the SDK sorts list values in place
        header_params=dict(headers),
        body=body,
    )
    Signer(BasicCredentials(ak, sk)).sign(request)
    return str(request.header_params["Authorization"])


def ours(**request: Any) -> str:
    return sign(**request)["Authorization"]


# --- strategies ----------------------------------------------------------------------------------

no_surrogates = st.characters(codec="utf-8")
RESERVED = " !\"#$%&'()*+,/:;<=>?@[\\]^`{|}~"
segment_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(string.ascii_letters + string.digits + "-_."),
        st.sampled_from(RESERVED),
        st.sampled_from("éü中文€😀\uff41\u0430"),
        no_surrogates,
    ),
    max_size=12,
)
paths = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + ("/" if slash else ""),
    st.lists(segment_text, min_size=1, max_size=5),
    st.booleans(),
)
query_text = st.text(alphabet=st.one_of(st.sampled_from("ab=&+ %é中?#/"), no_surrogates), max_size=8)
numbers = st.one_of(
    st.integers(-(10**12), 10**12), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
)
#: One key's values are all of one kind, as a real query is (the SDK cannot sort mixed kinds).
values_of_one_kind = st.one_of(
    st.lists(query_text, min_size=1, max_size=3),
    st.lists(numbers, min_size=1, max_size=3),
    st.lists(st.lists(query_text, max_size=3), min_size=1, max_size=2),
)


@st.composite
def queries(draw: st.DrawFn) -> list[QueryParam]:
    keys = draw(st.lists(query_text, max_size=4, unique=True))
    params: list[QueryParam] = [(key, value) for key in keys for value in draw(values_of_one_kind)]
    return draw(st.permutations(params)) if params else []


header_names = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=12).filter(
    lambda name: (
        name.lower() not in {"host", "authorization", "x-sdk-date", "content-type", "x-sdk-content-sha256"}
    )
)
header_values = st.text(alphabet=st.one_of(st.sampled_from(" \tabcXYZ09;=,é中"), no_surrogates), max_size=16)
ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)


@st.composite
def header_sets(draw: st.DrawFn) -> dict[str, str]:
    headers = {signing.DATE_HEADER: DATE}
    content_type = draw(
        st.sampled_from(
            [
                None,
                "application/json",
                "application/json;charset=UTF-8",
                "text/plain",
                "application/octet-stream",
            ]
        )
    )
    if content_type is not None:
        headers[draw(st.sampled_from(["Content-Type", "content-type"]))] = content_type
    if draw(st.booleans()):
        headers["X-Domain-Id"] = draw(ids)
    if draw(st.booleans()):
        headers["X-Project-Id"] = draw(ids)
    if draw(st.booleans()):
        headers[draw(st.sampled_from(["Host", "host"]))] = draw(st.sampled_from([HOST, HOST + ":443"]))
    if draw(st.booleans()):
        headers["X-Sdk-Content-Sha256"] = draw(st.sampled_from(["UNSIGNED-PAYLOAD", "0" * 64]))
    taken = {name.lower() for name in headers}
    for name, value in draw(st.dictionaries(header_names, header_values, max_size=4)).items():
        if name.lower() not in taken:
            taken.add(name.lower())
            headers[name] = value
    return headers


json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=no_surrogates, max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
).map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8"))
bodies = st.one_of(st.just(b""), json_bodies, st.binary(max_size=64))


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "ak": draw(st.text(alphabet=string.ascii_uppercase + string.digits, min_size=1, max_size=24)),
        "sk": draw(st.text(alphabet=no_surrogates, min_size=1, max_size=48)),
        "method": draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "put"])),
        "host": draw(st.sampled_from([HOST, "127.0.0.1:8443", "coc-intl.myhuaweicloud.com"])),
        "path": draw(paths),
        "query": draw(queries()),
        "headers": draw(header_sets()),
        "body": draw(bodies),
    }


# --- equality with the official signer -----------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(request=requests())
def test_authorization_equals_official_signer(request: dict[str, Any]) -> None:
    assert ours(**request) == official(**request)


@pytest.mark.parametrize(
    "request_",
    [
        {"method": "PUT", "path": PATH, "query": [], "headers": {}, "body": BODY},
        {"method": "GET", "path": PATH, "query": [], "headers": {}, "body": b""},
        {
            "method": "GET",
            "path": PATH + "/list-sub-tickets",
            "query": [("limit", 10), ("offset", 0)],
            "headers": {},
            "body": b"",
        },
        {
            "method": "PUT",
            "path": "/v1/change/tickets/工单 1",
            "query": [],
            "headers": {},
            "body": '{"c": "变更成功"}'.encode(),
        },
        {"method": "PUT", "path": "/v1/a%2Fb/c%20d/", "query": [], "headers": {}, "body": b"x"},
        {
            "method": "GET",
            "path": "/",
            "query": [("k", "b"), ("k", "a"), ("é", "中 文")],
            "headers": {},
            "body": b"",
        },
        {
            "method": "GET",
            "path": "/",
            "query": [("id", 10), ("id", 9), ("id", 100)],
            "headers": {},
            "body": b"",
        },
        {
            "method": "GET",
            "path": "/",
            "query": [("ids", ["a", "b"]), ("ids", ["a"])],
            "headers": {},
            "body": b"",
        },
        {
            "method": "GET",
            "path": "/",
            "query": [("flag", True), ("flag", False)],
            "headers": {},
            "body": b"",
        },
        {"method": "POST", "path": "/", "query": [], "headers": {"content-type": "text/plain"}, "body": b"x"},
        {"method": "POST", "path": "/", "query": [], "headers": {"Content-Type": "text/plain"}, "body": b"x"},
        {
            "method": "PUT",
            "path": PATH,
            "query": [],
            "headers": {
                "Content-Type": "application/json;charset=UTF-8",
                "X-Domain-Id": "d" * 32,
                "X-Project-Id": "p" * 32,
            },
            "body": BODY,
        },
        {
            "method": "PUT",
            "path": PATH,
            "query": [],
            "headers": {"X_Ignored": "v", "X-Spaced": "  v  "},
            "body": BODY,
        },
    ],
)
def test_known_requests_equal_official_signer(request_: dict[str, Any]) -> None:
    request = {"ak": AK, "sk": SK, "host": HOST, **request_}
    request["headers"] = {signing.DATE_HEADER: DATE, **request["headers"]}
    assert ours(**request) == official(**request)


def test_authorization_format() -> None:
    headers = sign(
        ak=AK,
        sk=SK,
        method="PUT",
        host=HOST,
        path=PATH,
        headers={"X-Project-Id": "p1"},
        body=BODY,
        now=SIGNED_AT,
    )
    assert headers[signing.DATE_HEADER] == DATE
    assert headers["Host"] == HOST
    parsed = parse_authorization(headers["Authorization"])
    assert parsed is not None
    assert parsed.ak == AK
    assert parsed.signed_headers == ["host", "x-project-id", "x-sdk-date"]
    assert len(parsed.signature) == 64


def test_underscore_headers_are_not_signed() -> None:
    headers = sign(ak=AK, sk=SK, method="GET", host=HOST, path="/", headers={"X_Trace": "1"}, now=SIGNED_AT)
    parsed = parse_authorization(headers["Authorization"])
    assert parsed is not None
    assert "x_trace" not in parsed.signed_headers


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/change/tickets/CM1", "/v1/change/tickets/CM1/"),
        ("/v1/change/tickets/CM1/", "/v1/change/tickets/CM1/"),
        ("/a b/é", "/a%20b/%C3%A9/"),
        ("/a%2Fb", "/a/b/"),
        ("/~x", "/~x/"),
    ],
)
def test_canonical_uri(path: str, expected: str) -> None:
    assert canonical_uri(path) == expected


# --- verify --------------------------------------------------------------------------------------


def _signed(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "method": "PUT",
        "path": PATH,
        "query": [("lang", "zh-cn")],
        "headers": {"Content-Type": "application/json", "X-Project-Id": "p" * 32},
        "body": BODY,
    }
    request.update(overrides)
    headers = sign(ak=AK, sk=SK, host=HOST, now=SIGNED_AT, **request)
    return {**request, "headers": headers}


def check(
    request: dict[str, Any], *, now: datetime = SIGNED_AT, secrets: dict[str, str] | None = None
) -> str | None:
    return verify(secret_for=secrets or {AK: SK}, now=now, **request)


def test_verify_accepts_what_sign_made() -> None:
    assert check(_signed()) is None
    assert check(_signed(method="GET", body=b"", query=[], headers={})) is None


@settings(max_examples=150, deadline=None)
@given(request=requests())
def test_verify_accepts_generated_requests(request: dict[str, Any]) -> None:
    headers = sign(**request)
    secrets = {request["ak"]: request["sk"]}
    args = {k: request[k] for k in ("method", "path", "query", "body")}
    assert verify(secret_for=secrets, headers=headers, now=SIGNED_AT, **args) is None


@pytest.mark.parametrize(
    "tamper",
    [
        {"body": BODY.replace(b"start", b"end__")},
        {"body": BODY + b" "},
        {"body": b""},
        {"path": PATH.replace("CM2025", "CM2026")},
        {"path": PATH + "/x"},
        {"method": "POST"},
        {"query": [("lang", "en-us")]},
        {"query": []},
    ],
)
def test_verify_rejects_tampered_request(tamper: dict[str, Any]) -> None:
    assert check({**_signed(), **tamper}) == "signature mismatch"


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Project-Id", "q" * 32), ("Host", "evil.example.com"), ("Content-Type", "application/xml")],
)
def test_verify_rejects_tampered_header(name: str, value: str) -> None:
    request = _signed()
    request["headers"] = {**request["headers"], name: value}
    assert check(request) == "signature mismatch"


def test_verify_rejects_tampered_date() -> None:
    request = _signed()
    request["headers"] = {**request["headers"], signing.DATE_HEADER: "20250626T191939Z"}
    assert check(request) == "signature mismatch"


def test_verify_rejects_unknown_ak_and_wrong_sk() -> None:
    assert check(_signed(), secrets={"OTHER": SK}) == "unknown access key"
    assert check(_signed(), secrets={AK: SK + "x"}) == "signature mismatch"


@pytest.mark.parametrize(
    "skew", [timedelta(minutes=15, seconds=1), timedelta(hours=3), -timedelta(minutes=16)]
)
def test_verify_rejects_stale_or_future_date(skew: timedelta) -> None:
    assert "expired" in (check(_signed(), now=SIGNED_AT + skew) or "")


@pytest.mark.parametrize("skew", [timedelta(minutes=14, seconds=59), -timedelta(minutes=15), timedelta(0)])
def test_verify_accepts_small_skew(skew: timedelta) -> None:
    assert check(_signed(), now=SIGNED_AT + skew) is None


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing Authorization header"),
        ("", "missing Authorization header"),
        ("Bearer abc", "malformed Authorization header"),
        ("SDK-HMAC-SHA256 Access=AK, Signature=00", "malformed Authorization header"),
    ],
)
def test_verify_rejects_bad_authorization(authorization: str | None, reason: str) -> None:
    request = _signed()
    headers = {k: v for k, v in request["headers"].items() if k != "Authorization"}
    if authorization is not None:
        headers["Authorization"] = authorization
    assert check({**request, "headers": headers}) == reason


def test_verify_requires_signed_date_and_host() -> None:
    request = _signed()
    headers = {k: v for k, v in request["headers"].items() if k != signing.DATE_HEADER}
    assert check({**request, "headers": headers}) == "X-Sdk-Date missing or not signed"
    garbled = {**request["headers"], signing.DATE_HEADER: "2025-06-26T19:19:38Z"}
    assert check({**request, "headers": garbled}) == "malformed X-Sdk-Date"
    unsigned_host = request["headers"]["Authorization"].replace("host;", "")
    assert (
        check({**request, "headers": {**request["headers"], "Authorization": unsigned_host}})
        == "Host not signed"
    )


# --- dates ---------------------------------------------------------------------------------------


def test_each_sign_takes_a_fresh_date(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(SIGNED_AT.timestamp() + i for i in range(10))  # one second later on every call
    monkeypatch.setattr(signing.time, "time", lambda: next(ticks))
    base = {"X-Project-Id": "p1"}
    first = sign(ak=AK, sk=SK, method="PUT", host=HOST, path=PATH, headers=base, body=BODY)
    second = sign(ak=AK, sk=SK, method="PUT", host=HOST, path=PATH, headers=base, body=BODY)
    assert base == {"X-Project-Id": "p1"}  # the caller's headers are not mutated
    assert first[signing.DATE_HEADER] == "20250626T191938Z"
    assert second[signing.DATE_HEADER] == "20250626T191939Z"
    assert first["Authorization"] != second["Authorization"]


def test_date_without_now_is_the_current_utc_time() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    headers = sign(ak=AK, sk=SK, method="GET", host=HOST, path="/")
    after = datetime.now(UTC)
    stamped = datetime.strptime(headers[signing.DATE_HEADER], DATE_FORMAT).replace(tzinfo=UTC)
    assert before <= stamped <= after


def test_a_given_date_header_is_kept() -> None:
    headers = sign(ak=AK, sk=SK, method="GET", host=HOST, path="/", headers={"x-sdk-date": DATE})
    assert headers["x-sdk-date"] == DATE
    assert signing.DATE_HEADER not in headers


@pytest.mark.parametrize("declared", ["body", "UNSIGNED-PAYLOAD"])
def test_verify_ignores_a_content_hash_header_that_was_not_signed(declared: str) -> None:
    """Only a signed ``X-Sdk-Content-Sha256`` may stand for the body (the SDK signs it whenever
    it sets it): added afterwards, it let a replaced body through with the old body's hash."""
    request = _signed()
    value = hashlib.sha256(request["body"]).hexdigest() if declared == "body" else declared
    request["headers"] = {**request["headers"], signing.CONTENT_SHA_HEADER: value}
    assert check(request) is None  # the body as signed still verifies
    request["body"] = BODY.replace(b"start", b"end__")
    assert check(request) == "signature mismatch"


def test_verify_honours_a_signed_content_hash_header() -> None:
    request = _signed(headers={"Content-Type": "application/octet-stream"})  # SDK: UNSIGNED-PAYLOAD
    assert parse_authorization(request["headers"]["Authorization"]) is not None
    assert check(request) is None
    assert check({**request, "body": b"other bytes"}) is None  # as the SDK's gateway: not covered
