"""The one error tree of the worker.

Every failure is classified once, at the boundary where it happens, into the branch that decides
what the pipeline does with the message::

    CocWorkerError
    ├── ConfigError               bad settings: the process refuses to start
    ├── InvalidEvent              the message breaks the contract -> outcome `invalid` + DLQ
    ├── TransientError            may work if tried again -> retry with backoff
    │   └── ApiTransientError     connection error, timeout, 408, 429 (+Retry-After), 500/502/503/504
    ├── PermanentError            will fail the same way again -> outcome + DLQ, no retry
    │   ├── ApiRejected           other 3xx/4xx/5xx, or a 2xx with a non-success error_code -> `rejected`
    │   └── DedupRecordError      this event's own dedup record is unusable (a Redis key of another
    │                             type, a script error on it) -> `failed`; the store is not away
    │                             (a transient error that outlives the retry budget is `failed`:
    │                             an outcome of the retry loop, worker/apply.py, not an error)
    ├── KafkaClientStopped        a Kafka client ended for good: the process exits to start afresh
    └── SystemicError             the *worker* cannot make progress, not the message:
        │                         pause consumption, report not-ready, probe, resume by itself;
        │                         the message is retried, never rejected or dead-lettered
        │                         (but a 403 again once the gate verified the credentials is
        │                         this change not permitted: `rejected`)
        ├── ApiAuthError          401/403: credentials are wrong or revoked
        ├── ApiUnreachable        every call failed to connect for longer than the threshold
        ├── DedupUnavailable      the dedup store cannot be reached
        └── BrokerUnavailable     outcome/DLQ writes cannot be confirmed by the broker
            └── DeadLetterUnwritable  only the dead letter's write was refused

Library exceptions (pyreqwest, aiohttp, aiokafka, redis, sqlite3) never cross a module boundary:
the module that speaks to the library translates them into these with ``raise ... from exc``.
Messages never carry secrets.
"""

from __future__ import annotations


class CocWorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class ConfigError(CocWorkerError):
    """A setting is missing or invalid; raised before anything connects."""


class InvalidEvent(CocWorkerError):
    """The consumed bytes are not a valid change event (never retried).

    ``reason`` is a short machine-readable code (``too_large``, ``empty``, ``not_utf8``,
    ``bad_json``, ``schema``, ``unreadable``, ``event_id_reused``); ``detail`` is the human-readable explanation, safe to publish.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransientError(CocWorkerError):
    """A failure that may go away by itself; the retry policy decides how long to wait."""


class ApiTransientError(TransientError):
    """The API call failed in a way worth retrying.

    ``ambiguous`` is true when the request may have reached the API (a read timeout or a dropped
    connection after the body was sent): a retry might find the change already applied.
    ``timed_out`` marks a read timeout (ours, or a gateway's 504) among those: the API may still
    be working on it.
    """

    def __init__(
        self,
        detail: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        retry_after_s: float | None = None,
        ambiguous: bool = False,
        connect_failure: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.http_status = http_status
        self.error_code = error_code
        self.retry_after_s = retry_after_s
        self.ambiguous = ambiguous or timed_out
        self.connect_failure = connect_failure
        self.timed_out = timed_out


class PermanentError(CocWorkerError):
    """A failure that will repeat if retried; the message ends here."""


class ApiRejected(PermanentError):
    """The API refused the change (a 4xx, or 200 with a non-success ``error_code``)."""

    def __init__(
        self, detail: str, *, http_status: int, error_code: str | None, error_msg: str | None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.http_status = http_status
        self.error_code = error_code
        self.error_msg = error_msg


class DedupRecordError(PermanentError):
    """A store call that this event's own record refuses (a Redis key of another type, a script
    error on it), not the store: the job fails (``failed``, ``internal_error``, dead-lettered) and
    the worker does not pause. ``DedupUnavailable`` paused it, its probe on another key passed,
    the gate reopened, and the same record paused it again, without end."""


class SystemicError(CocWorkerError):
    """The worker as a whole cannot make progress; pause and probe instead of failing messages."""

    #: Short name used in metrics and logs (one fixed label value per subclass).
    kind = "systemic"


class ApiAuthError(SystemicError):
    """401/403 from the API: every message would fail the same way until credentials are fixed.

    Except a 403 that comes back once the gate's probe has read a ticket with the same
    credentials: that refusal is the request's own (``ApiCaller`` ends the event ``rejected``)."""

    kind = "api_auth"

    def __init__(self, detail: str, *, http_status: int, error_code: str | None = None) -> None:
        super().__init__(detail)
        self.http_status = http_status
        self.error_code = error_code


class ApiUnreachable(SystemicError):
    """No API call has connected for longer than the configured threshold."""

    kind = "api_unreachable"


class ApiFailing(SystemicError):
    """The API answers, but with server errors, throttling or timeouts only: an event's whole
    retry budget passed and no call has had a working answer for longer than the threshold."""

    kind = "api_failing"


class DedupUnavailable(SystemicError):
    """The dedup store cannot be read or written; applying without it risks double application."""

    kind = "dedup_unavailable"


class BrokerUnavailable(SystemicError):
    """The broker did not confirm an outcome or dead-letter write."""

    kind = "broker_unavailable"
    #: The outcome failed but its dead-letter record went through: only the outcome is owed.
    dead_letter_confirmed = False


class DeadLetterUnwritable(BrokerUnavailable):
    """The outcome is confirmed, the dead-letter record is not (its topic missing, writes to it
    refused, or the broker gone meanwhile): only the record is still owed."""

    kind = "dlq_unwritable"


#: Every kind of pause (``SystemicError.kind`` of each subclass): a metric's label values, fixed.
PAUSE_KINDS = tuple(
    cls.kind
    for cls in (
        ApiAuthError,
        ApiUnreachable,
        ApiFailing,
        DedupUnavailable,
        BrokerUnavailable,
        DeadLetterUnwritable,
    )
)


class JobCrashed(CocWorkerError):
    """A job ended with an exception instead of an outcome: a bug in the outcome's own path (every
    other one ends as a ``failed``/``internal_error`` outcome). Its offset can never be committed,
    and its partition would stop for good behind it, held once ``max_uncommitted`` later messages
    are done. Not a pause: the process stops (exit 1), and a fresh one reads the message again."""


class KafkaClientStopped(CocWorkerError):
    """A Kafka client ended on an error it does not recover from, while the broker still answers:
    the consumer's group coordination (every fetch fails from then on, with no heartbeat and no
    commit) or the producer's sender (every write fails). Not a pause: the process stops (exit 1)
    so that it is started afresh."""
