"""Structured logging (structlog): JSON when not on a terminal, and no secret ever printed.

Every secret value configured (AK, SK, token, SASL password, Kafka client key password, ...) is
registered with the redactor, which replaces it in every rendered line, whatever field or
exception text carries it, also in the forms an echo may carry it in (percent-encoded,
form-encoded, JSON-escaped). Longer secrets are replaced first, so one that contains another
leaves nothing readable behind.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO, cast
from urllib.parse import quote, quote_plus

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from schemas.outcomes import REDACTED as REDACTED  # the log marker is the outcomes' too

#: Shorter values are not scrubbed (they would mangle every line); settings refuse short secrets.
MIN_REDACTED_CHARS = 4
_secrets: set[str] = set()
_longest_first: list[str] = []
_longest_first_bytes: list[bytes] = []


def register_secrets(values: Iterable[str]) -> None:
    """Add values the redactor must scrub from all output, with their encoded forms."""
    global _longest_first, _longest_first_bytes
    added = False
    for value in values:
        if not value or len(value) < MIN_REDACTED_CHARS:
            continue
        escaped = json.dumps(value)[1:-1]
        encoded = quote(value, safe="")
        forms = (
            value,
            encoded,
            _lower_escapes(encoded),
            quote(value),  # "/" left as it is, as ``quote`` does by default
            quote_plus(value),
            escaped,
            escaped.replace("/", "\\/"),
            # As the outcome's serialiser writes it: non-ASCII as it is, quotes and backslashes
            # escaped (the ASCII-only form above does not match "ü" next to an escaped '"').
            unicode_escaped := json.dumps(value, ensure_ascii=False)[1:-1],
            unicode_escaped.replace("/", "\\/"),
            # As a repr shows it (a dict or bytes in a log field, a KeyError's text, a library's
            # repr of a raw header line): quotes and control or non-ASCII characters escaped.
            *_with_json_escapes(repr(value)[1:-1]),
            *_with_json_escapes(repr(value.encode())[2:-1]),
            # Inside a repr of text that holds both quotes (a KeyError's message, a list of
            # strings), where "'" is escaped too; and that again, as the console's repr of a
            # field shows it.
            *_with_json_escapes(forced := _repr_escaping_quotes(value)),
            _repr_escaping_quotes(forced),
        )
        for form in forms:
            if form not in _secrets:
                _secrets.add(form)
                added = True
    if added:
        _longest_first = sorted(_secrets, key=len, reverse=True)
        _longest_first_bytes = [form.encode() for form in _longest_first]


def _repr_escaping_quotes(text: str) -> str:
    """``text`` as ``repr`` shows it inside a string that also holds a ``"``: its ``'`` as ``\'``."""
    return repr(text + '"')[1:-2]


def _with_json_escapes(form: str) -> tuple[str, str]:
    """A form as it is, and as a JSON line shows it (its backslashes and quotes escaped)."""
    return form, json.dumps(form)[1:-1]


def _lower_escapes(encoded: str) -> str:
    """``%2F`` as ``%2f``: percent-encoding is case-insensitive, and some encoders write lowercase."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded)


def redact_text(text: str) -> str:
    for secret in _longest_first:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_cut(text: str, limit: int) -> str:
    """``text`` redacted whole, then cut to ``limit`` characters: cut first, a secret across the
    cut no longer matches, and its first characters would be written as they are."""
    return redact_text(text)[:limit]


def holds_secret_of(text: str, min_chars: int) -> bool:
    """Whether ``text`` holds a registered value (in any form) of at least ``min_chars`` characters."""
    for secret in _longest_first:
        if len(secret) < min_chars:
            return False
        if secret in text:
            return True
    return False


def holds_secret(data: bytes) -> bool:
    """Whether UTF-8 bytes (an outcome as written) hold a secret, without decoding them."""
    return any(secret in data for secret in _longest_first_bytes)


def redact_values(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with its strings redacted, its keys as they are:
    scrubbing the serialised text instead would break it where a secret matched a key."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_values(item) for item in value]
    return value


#: Where the running task's message came from and what it names, merged into every line the task
#: logs. One variable set once per message: structlog's ``bind_contextvars`` sets one per key, five
#: times the work on every message for lines that are mostly never written.
_message_context: ContextVar[Mapping[str, Any] | None] = ContextVar("coc_message_context", default=None)


def bind_message_context(fields: Mapping[str, Any]) -> None:
    """Fields every later log line of this task (and of tasks it starts) carries."""
    _message_context.set(fields)


def _merge_message_context(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    fields = _message_context.get()
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)  # a line's own value of a key wins
    return event_dict


class _Redacted:
    """The renderer, then the redactor over the whole line: whatever field, nesting or repr a
    secret reached the line through, it is replaced in the form the line shows it in."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        line: str = self._renderer(logger, name, event_dict)
        return redact_text(line) if _longest_first else line


def configure(level: str = "INFO", fmt: str = "auto", stream: Any = None, *, final: bool = False) -> None:
    """Configure structlog once, at the entry point.

    ``final``: this configuration stays for the life of the process (the worker), so every module's
    logger may bind it on first use; otherwise each log call binds anew (a few microseconds, a
    visible share of the hot path at thousands of events per second), which keeps loggers following
    a later ``configure`` or a test's ``capture_logs``.
    """
    out = stream or _CurrentStderr()
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            _merge_message_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _Redacted(renderer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, out)),
        cache_logger_on_first_use=final,
    )
    # Libraries (aiokafka, aiohttp) log through stdlib logging: keep their warnings, redacted too.
    handler = logging.StreamHandler(cast(TextIO, out))
    handler.setFormatter(_StdlibFormatter(use_json))
    handler.addFilter(_Repeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time, not at configure time (it may be redirected)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _Repeats(logging.Filter):
    """A library's line (same logger, level and text) is shown once per ``window_s``; the next one
    shown says how many were held back. With the broker away, aiokafka wrote 60-75 errors a
    second, burying the worker's own lines about the outage. The text is the formatted one: lines
    of one template about different partitions or nodes are different lines."""

    def __init__(
        self, window_s: float = 10.0, keep: int = 1000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window_s = window_s
        self._keep = keep
        self._clock = clock  # not the record's wall-clock time, which may step back
        #: (logger, level, text) -> [when last shown, held back since]
        self._shown: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        key = (record.name, record.levelno, record.getMessage()[:300])
        shown = self._shown.get(key)
        if shown is not None and now - shown[0] < self._window_s:
            shown[1] += 1
            return False
        if shown is None and len(self._shown) >= self._keep:
            self._shown.clear()  # a bound on lines that carry ever-new values
        if shown is not None and shown[1]:
            record.coc_held_back = int(shown[1])
        self._shown[key] = [now, 0]
        return True


class _StdlibFormatter(logging.Formatter):
    """Formats library log records like ours (JSON or plain), redacted after formatting."""

    def __init__(self, use_json: bool) -> None:
        super().__init__()
        self._json = use_json

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            # A request the HTTP server could not parse: aiohttp's text quotes the raw request
            # line or header, an ``Authorization`` of a token the redactor does not know included.
            message += f": {type(error).__name__} (the request's text is not logged)"
        elif record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        message = redact_text(message)
        held = getattr(record, "coc_held_back", 0)
        if not self._json:
            note = f" ({held} more like it not shown)" if held else ""
            return f"{record.levelname.lower()} [{record.name}] {message}{note}"
        stamped = datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z")
        line: dict[str, str | int] = {
            "event": message,
            "logger": record.name,
            "level": record.levelname.lower(),
            "timestamp": stamped,
        }
        if held:
            line["not_shown"] = held
        return json.dumps(line)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
