"""AK/SK request signing (``SDK-HMAC-SHA256``), byte-for-byte as the cloud's SDKs sign.

Pure functions, shared by the API client (to sign) and the simulator (to verify). A test proves
the ``Authorization`` value equal to the official ``huaweicloudsdkcore`` ``Signer`` on generated
requests, non-ASCII paths, queries and bodies included.

The canonical request is::

    METHOD \\n CanonicalURI \\n CanonicalQuery \\n CanonicalHeaders \\n SignedHeaders \\n hex(sha256(body))

and the signature is ``hex(hmac_sha256(SK, "SDK-HMAC-SHA256\\n" + X-Sdk-Date + "\\n" +
hex(sha256(canonical_request))))``. Every header whose name has no underscore is signed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

ALGORITHM = "SDK-HMAC-SHA256"
DATE_HEADER = "X-Sdk-Date"
CONTENT_SHA_HEADER = "X-Sdk-Content-Sha256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()

QueryParam = tuple[str, str | bool | int | float | list[str]]

_AUTH_RE = re.compile(
    r"^SDK-HMAC-SHA256\s+Access=(?P<ak>[^,\s]+),\s*SignedHeaders=(?P<headers>[^,\s]+),\s*Signature=(?P<sig>[0-9a-f]+)$"
)


def sdk_date(now: datetime | None = None) -> str:
    """The ``X-Sdk-Date`` value for ``now`` (UTC)."""
    if now is not None:
        return now.strftime(DATE_FORMAT)
    return _date_of_second(int(time.time()))


@functools.lru_cache(maxsize=2)
def _date_of_second(second: int) -> str:
    """One ``strftime`` per second instead of one per request."""
    return datetime.fromtimestamp(second, UTC).strftime(DATE_FORMAT)


def _encode(text: str) -> str:
    return quote(text, safe="~")


_PLAIN_PATH = re.compile(r"^[A-Za-z0-9/_.~-]*$")


def canonical_uri(path: str) -> str:
    """Each path segment percent-encoded (after decoding once), always ending with ``/``."""
    if _PLAIN_PATH.match(path):  # the worker's own paths: nothing to decode or encode
        return path if path.endswith("/") else path + "/"
    encoded = "/".join(_encode(segment) for segment in unquote(path).split("/"))
    return encoded if encoded.endswith("/") else encoded + "/"


def _query_order(param: QueryParam) -> tuple[str, int, Any]:
    """Sort as the SDK's ``params.sort()`` does: by key, then by the value itself (``9 < 10``).

    The SDK cannot compare values of different kinds under one key (it raises); ranking the kind
    first keeps that case deterministic here.
    """
    key, value = param
    rank = 2 if isinstance(value, list) else 1 if isinstance(value, str) else 0
    return key, rank, value


def canonical_query(params: Iterable[QueryParam]) -> str:
    parts: list[str] = []
    for key, value in sorted(params, key=_query_order):
        k = _encode(key)
        if isinstance(value, list):
            parts.extend(f"{k}={_encode(str(v))}" for v in sorted(value))
        elif isinstance(value, bool):
            parts.append(f"{k}={_encode(str(value).lower())}")
        else:
            parts.append(f"{k}={_encode(str(value))}")
    return "&".join(parts)


def _payload_hash(headers: Mapping[str, str], body: bytes, *, maybe_declared: bool = True) -> str:
    """``maybe_declared=False``: the caller knows no content-hash header is there (no lookup)."""
    if not body:
        return EMPTY_BODY_SHA256
    declared = _get(headers, CONTENT_SHA_HEADER) if maybe_declared else None
    return declared if declared else hashlib.sha256(body).hexdigest()


def _get(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def canonical_request(
    method: str,
    path: str,
    query: Iterable[QueryParam],
    headers: Mapping[str, str],
    signed: list[str],
    body: bytes,
    *,
    declared_hash: bool = True,
) -> str:
    """``declared_hash=False``: hash ``body`` even when an ``X-Sdk-Content-Sha256`` header says
    what to use instead."""
    lowered = {k.lower(): str(v).strip() for k, v in headers.items()}
    payload_hash = _payload_hash(headers, body, maybe_declared=declared_hash)
    return _canonical(method, path, query, lowered, signed, payload_hash)


def _canonical(
    method: str,
    path: str,
    query: Iterable[QueryParam],
    lowered: Mapping[str, str],
    signed: list[str],
    payload_hash: str,
) -> str:
    """``lowered``: the headers by lower-case name (the last of a name wins), values stripped."""
    canonical_headers = "".join(f"{name}:{lowered.get(name, '')}\n" for name in signed)
    return "\n".join(
        (
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            canonical_headers,
            ";".join(signed),
            payload_hash,
        )
    )


def signature(sk: str, date: str, canonical: str) -> str:
    string_to_sign = f"{ALGORITHM}\n{date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    return hmac.digest(sk.encode(), string_to_sign.encode(), "sha256").hex()


def sign(
    *,
    ak: str,
    sk: str,
    method: str,
    host: str,
    path: str,
    query: Iterable[QueryParam] = (),
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    now: datetime | None = None,
) -> dict[str, str]:
    """Return ``headers`` plus ``X-Sdk-Date``, ``Host`` and ``Authorization`` for this request.

    A fresh date is taken on every call: a retry is signed again, never replayed. The headers are
    lower-cased once; the first-of-a-name lookups (``_get``, as the SDK finds a header) run only
    when such a header is there at all: the worker signs every request it sends.
    """
    out = dict(headers or {})
    content_type = out.get("Content-Type")  # case-sensitive, exactly as the SDK looks it up
    if content_type and not content_type.startswith(("application/json", "application/bson")):
        out[CONTENT_SHA_HEADER] = "UNSIGNED-PAYLOAD"
    lowered = {k.lower(): str(v).strip() for k, v in out.items()}
    date = _get(out, DATE_HEADER) if _DATE_LOWER in lowered else None
    if date is None:
        date = sdk_date(now)
        out[DATE_HEADER] = lowered[_DATE_LOWER] = date
    if "host" not in lowered:
        out["Host"] = host
        lowered["host"] = str(host).strip()
    names = sorted(name for name in lowered if "_" not in name)
    payload_hash = _payload_hash(out, body, maybe_declared=_CONTENT_SHA_LOWER in lowered)
    canonical = _canonical(method, path, query, lowered, names, payload_hash)
    out["Authorization"] = (
        f"{ALGORITHM} Access={ak}, SignedHeaders={';'.join(names)}, Signature={signature(sk, date, canonical)}"
    )
    return out


_DATE_LOWER = DATE_HEADER.lower()
_CONTENT_SHA_LOWER = CONTENT_SHA_HEADER.lower()


@dataclass(frozen=True)
class ParsedAuthorization:
    ak: str
    signed_headers: list[str]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization | None:
    match = _AUTH_RE.match(value.strip())
    if match is None:
        return None
    return ParsedAuthorization(match["ak"], match["headers"].split(";"), match["sig"])


@functools.lru_cache(maxsize=16)
def _signed_at(date: str) -> datetime | None:
    """``X-Sdk-Date`` as a time; a second's requests all carry the same value, and ``strptime``
    was ~5% of the simulator's CPU per request."""
    try:
        return datetime.strptime(date, DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def verify(
    *,
    secret_for: Mapping[str, str],
    method: str,
    path: str,
    query: Iterable[QueryParam],
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    max_skew_s: float = 15 * 60,
) -> str | None:
    """Check a signed request as the API gateway does; return ``None`` if valid, else why not."""
    auth = _get(headers, "Authorization")
    if not auth:
        return "missing Authorization header"
    parsed = parse_authorization(auth)
    if parsed is None:
        return "malformed Authorization header"
    sk = secret_for.get(parsed.ak)
    if sk is None:
        return "unknown access key"
    date = _get(headers, DATE_HEADER)
    if date is None or DATE_HEADER.lower() not in parsed.signed_headers:
        return "X-Sdk-Date missing or not signed"
    signed_at = _signed_at(date)
    if signed_at is None:
        return "malformed X-Sdk-Date"
    if abs((now - signed_at).total_seconds()) > max_skew_s:
        return "request expired: X-Sdk-Date is more than 15 minutes away from server time"
    if "host" not in parsed.signed_headers:
        return "Host not signed"
    # A content hash header stands for the body only when it was signed (the SDK signs it whenever
    # it sets it); one added afterwards would let a replaced body through.
    trusted = _CONTENT_SHA_LOWER in parsed.signed_headers
    canonical = canonical_request(
        method, path, query, headers, parsed.signed_headers, body, declared_hash=trusted
    )
    if not hmac.compare_digest(signature(sk, date, canonical), parsed.signature):
        return "signature mismatch"
    return None
