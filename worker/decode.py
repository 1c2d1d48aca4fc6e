"""Decode and validate one Kafka message value into a change event, or say exactly why not.

Stricter than ``json.loads``: it refuses oversized values, invalid UTF-8, duplicate keys,
NaN/Infinity, lone surrogates, and objects wider or nesting deeper than any event needs, before the pydantic
contract checks every field. Whatever is refused becomes an ``InvalidEvent`` with a reason code and
a readable detail; nothing here ever raises anything else.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from schemas.events import (
    CHANGE_EVENT_ADAPTER,
    EVENT_ID_PATTERN,
    MIN_EPOCH_MS,
    TICKET_ID_PATTERN,
    AnyChangeEvent,
    EventType,
)
from worker.errors import InvalidEvent
from worker.logs import redact_cut, redact_text

#: The contract nests three levels at most; anything much deeper is hostile.
MAX_DEPTH = 16
#: Keys of any one JSON object. The contract's widest object has 9 and an Alertmanager alert's
#: labels a few dozen; with no bound, one 1 MiB message of ~95,000 unknown keys kept the event
#: loop busy ~0.4 s listing a validation error for each.
MAX_KEYS = 256
_MAX_ERRORS_SHOWN = 5
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_EVENT_ID = re.compile(EVENT_ID_PATTERN.replace("$", r"\Z"), re.ASCII)
_TICKET_ID = re.compile(TICKET_ID_PATTERN.replace("$", r"\Z"), re.ASCII)
_EVENT_TYPES = frozenset(t.value for t in EventType)
#: Keys shown as ``.name`` in an error path; any other key is the producer's text, shown escaped.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]{1,64}\Z", re.ASCII)
_KEY_SHOWN = 32


class _DuplicateKey(ValueError):
    pass


class _TooManyKeys(ValueError):
    pass


class _NumberTooLong(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_KEYS:
        raise _TooManyKeys(len(pairs))
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(text: str) -> int:
    """``int``, refusing in our words what it would refuse in Python's (which told the producer to
    call ``sys.set_int_max_str_digits()``)."""
    if len(text) - text.startswith("-") > sys.get_int_max_str_digits():
        raise _NumberTooLong
    return int(text)


#: Made once: ``json.loads`` with hooks builds a decoder (and its scanner) on every call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_int=_parse_int
)


def _loads(text: str) -> Any:
    """``json.loads(text, ...)`` with the hooks above, its BOM refusal included."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def _depth(value: Any, limit: int) -> bool:
    """True when ``value`` nests deeper than ``limit`` containers."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            if level > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return False


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def parse_json(value: bytes | None, max_bytes: int) -> Any:
    """Strict JSON parsing of a message value (step one of decoding)."""
    if value is None:
        raise InvalidEvent("empty", "message has no value (tombstone)")
    if len(value) > max_bytes:
        raise InvalidEvent("too_large", f"message is {len(value)} bytes, the limit is {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("not_utf8", f"value is not UTF-8 (byte {exc.start})") from None
    try:
        obj = _loads(text)
    except _DuplicateKey as exc:
        raise InvalidEvent("bad_json", f"duplicate key {redact_cut(str(exc), 64)!r}") from None
    except _TooManyKeys as exc:
        raise InvalidEvent("bad_json", f"an object has {exc} keys, more than {MAX_KEYS}") from None
    except RecursionError:
        raise InvalidEvent("bad_json", "JSON nesting is too deep") from None
    except _NumberTooLong:
        raise InvalidEvent("bad_json", "a number of thousands of digits: no field takes one") from None
    except ValueError as exc:  # JSONDecodeError and the NaN/Infinity refusal
        raise InvalidEvent("bad_json", str(exc)[:200]) from None
    # Walk the structure only when the text has enough brackets to nest that deep at all.
    if value.count(b"{") + value.count(b"[") > MAX_DEPTH and _depth(obj, MAX_DEPTH):
        raise InvalidEvent("bad_json", f"JSON nesting is deeper than {MAX_DEPTH}")
    if _SURROGATE_ESCAPE.search(value) and _has_surrogate(obj):
        raise InvalidEvent("bad_json", "string contains an unpaired UTF-16 surrogate")
    return obj


def _json_path(loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    if parts and isinstance(parts[0], str) and parts[0] in _EVENT_TYPES:
        parts = parts[1:]  # the discriminated union's tag is not part of the document
    path = "$"
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            path += f".{part}"
        else:  # an unknown key may be hostile: redacted, then ASCII-escaped and cut short (cut
            # first, the part of a secret before the cut matched nothing and went out as it was)
            shown = redact_text(part)
            path += f"[{json.dumps(shown[:_KEY_SHOWN])}{'...' if len(shown) > _KEY_SHOWN else ''}]"
    return path


def _keys_by_type() -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """Per event type, the keys its event takes and those its ``result`` takes (from the models)."""
    event_keys: dict[str, frozenset[str]] = {}
    result_keys: dict[str, frozenset[str]] = {}
    for model in get_args(AnyChangeEvent):
        tag = get_args(model.model_fields["type"].annotation)[0].value
        event_keys[tag] = frozenset(model.model_fields)
        if (result := model.model_fields.get("result")) is not None:
            result_model = result.annotation
            if not (isinstance(result_model, type) and issubclass(result_model, BaseModel)):
                raise TypeError(f"{model.__name__}.result is not a model")  # a contract change to follow here
            result_keys[tag] = frozenset(result_model.model_fields)
    return event_keys, result_keys


_EVENT_KEYS, _RESULT_KEYS = _keys_by_type()


def _said_better(err: ErrorDetails) -> str:
    """pydantic's message, with what a producer needs to put it right where it is not enough: a
    key of another type's event (which types take it), a time in seconds, a Python class name."""
    loc, kind, message = err["loc"], err["type"], err["msg"]
    tag = loc[0] if loc and isinstance(loc[0], str) and loc[0] in _EVENT_TYPES else None
    if kind == "greater_than_equal" and (err.get("ctx") or {}).get("ge") == MIN_EPOCH_MS:
        return message + " (epoch milliseconds from 2000-01-01: a time in seconds is 1,000 times smaller)"
    if kind == "extra_forbidden" and tag is not None and len(loc) in (2, 3):
        if len(loc) == 2:
            takers = [t for t, keys in _EVENT_KEYS.items() if loc[1] in keys]
        elif loc[1] == "result":
            takers = [t for t, keys in _RESULT_KEYS.items() if loc[2] in keys]
        else:
            takers = []
        if takers:
            verb = "takes" if len(takers) == 1 else "take"
            return f"{tag} takes no {loc[-1]} (only {', '.join(takers)} {verb} it)"
    if kind == "model_type":
        return "Input should be a JSON object"
    return message


def describe(exc: ValidationError) -> list[tuple[str, str]]:
    """(JSON path, message) for every error, input values left out (they may be hostile or huge)."""
    return [
        (_json_path(err["loc"]), _said_better(err))
        for err in exc.errors(include_url=False, include_input=False)
    ]


def json_type(value: Any) -> str:
    """A parsed JSON value's kind in JSON's words (producers are not all Python programs)."""
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check(obj: Any) -> AnyChangeEvent | list[tuple[str, str]] | ValidationError:
    """``obj`` as an event, or how it breaks the contract, not yet described: describing every
    error is the costly part, which a count of invalid items (the ingress) never needs."""
    if not isinstance(obj, dict):
        return [("$", f"expected a JSON object, got {json_type(obj)}")]
    try:
        return CHANGE_EVENT_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        return exc


def contract_errors(obj: Any) -> list[tuple[str, str]]:
    """Every (JSON path, message) by which ``obj`` breaks the contract; empty when it is valid."""
    found = check(obj)
    if isinstance(found, ValidationError):
        return describe(found)
    return found if isinstance(found, list) else []


def validate(obj: Any, shown: int = _MAX_ERRORS_SHOWN) -> AnyChangeEvent:
    """Step two: the pydantic contract. ``InvalidEvent`` names the first ``shown`` errors: an
    outcome carries a few (a hostile message may break thousands of rules), a person at the
    command line wants them all."""
    found = check(obj)
    if isinstance(found, ValidationError):
        found = describe(found)
    if isinstance(found, list):
        text = "; ".join(f"{path}: {msg}" for path, msg in found[:shown])
        more = f" (+{len(found) - shown} more)" if len(found) > shown else ""
        raise InvalidEvent("schema", text + more)
    return found


def decode(value: bytes | None, max_bytes: int) -> AnyChangeEvent:
    """Bytes to a validated event; raises ``InvalidEvent`` and nothing else."""
    return validate(parse_json(value, max_bytes))


Identity = dict[str, str | None]


def decode_or_salvage(
    value: bytes | None, max_bytes: int, *, key: bytes | None = None, unreadable: str | None = None
) -> tuple[AnyChangeEvent, None, None] | tuple[None, InvalidEvent, Identity]:
    """``(event, None, None)``, or for a message ``decode`` refuses ``(None, why, what its value
    still tells)`` (``salvage_identity``), from one parse of the value. ``unreadable``: why the
    Kafka client could not read the record at all (``consumer.Message.unreadable``). When the
    value names no valid ticket, the message's ``key`` does, if it is one (inputs are keyed by
    ticket_id): the outcome of a broken event then reaches that ticket's consumers, in its order."""
    if unreadable is not None:
        return None, InvalidEvent("unreadable", unreadable), _identity_of(None)
    try:
        obj = parse_json(value, max_bytes)
    except InvalidEvent as exc:
        return None, exc, _with_key_ticket(_identity_of(None), key)
    try:
        return validate(obj), None, None
    except InvalidEvent as exc:
        return None, exc, _with_key_ticket(_identity_of(obj), key)


def _with_key_ticket(identity: Identity, key: bytes | None) -> Identity:
    identity["ticket_id"] = ticket_of(identity, key)
    return identity


def ticket_of(identity: Identity, key: bytes | None) -> str | None:
    """An invalid message's ticket: its value's, else its key's when that is a ticket id (inputs
    are keyed by ticket_id; almost any key passes the pattern, so the value's comes first)."""
    return identity["ticket_id"] or ticket_of_key(key)


def ticket_of_key(key: bytes | None) -> str | None:
    """A message key that is a valid ticket id (inputs are keyed by ticket_id), else None."""
    try:
        candidate = key.decode("utf-8") if key else None
    except UnicodeDecodeError:
        return None
    return candidate if candidate is not None and _TICKET_ID.match(candidate) else None


def salvage_identity(value: bytes | None, max_bytes: int) -> Identity:
    """Best-effort ``event_id``/``ticket_id``/``sub_ticket_id``/``type`` of an invalid message.

    Only values that pass their own contract rule are kept: a hostile ``ticket_id`` must not
    become an outcome key.
    """
    try:
        obj = parse_json(value, max_bytes)
    except InvalidEvent:
        obj = None
    return _identity_of(obj)


def _identity_of(obj: Any) -> Identity:
    found: Identity = {"event_id": None, "ticket_id": None, "sub_ticket_id": None, "type": None}
    if not isinstance(obj, dict):
        return found
    checks = {"event_id": _EVENT_ID, "ticket_id": _TICKET_ID, "sub_ticket_id": _TICKET_ID}
    for name, pattern in checks.items():
        candidate = obj.get(name)
        if isinstance(candidate, str) and pattern.match(candidate):
            found[name] = candidate
    kind = obj.get("type")
    if isinstance(kind, str) and kind in _EVENT_TYPES:
        found["type"] = kind
    return found
