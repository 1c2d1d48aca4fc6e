"""The backoff is full-jitter exponential, bounded by attempts, elapsed time and Retry-After."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import ApiTransientError
from worker.retry import RetryPolicy, backoff_delay
from worker.settings import load_settings


def test_backoff_ceiling_doubles_then_caps() -> None:
    top = [backoff_delay(n, 0.2, 5.0, lambda: 1.0) for n in range(1, 8)]
    assert top == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert backoff_delay(3, 0.2, 5.0, lambda: 0.0) == 0.0


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=100),
    draw=st.floats(min_value=0, max_value=0.999999),
)
def test_backoff_always_within_bounds(attempt: int, base: float, cap: float, draw: float) -> None:
    delay = backoff_delay(attempt, base, cap, lambda: draw)
    assert 0 <= delay <= min(cap, base * 2.0 ** min(attempt - 1, 62)) + 1e-9


def test_attempts_are_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_delay(0, 1, 1)


def test_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, max_elapsed_s=1000)
    err = ApiTransientError("503", http_status=503)
    assert policy.next_delay(1, 0, err, lambda: 0.5) is not None
    assert policy.next_delay(2, 0, err, lambda: 0.5) is not None
    assert policy.next_delay(3, 0, err, lambda: 0.5) is None


def test_gives_up_when_the_wait_would_pass_max_elapsed() -> None:
    policy = RetryPolicy(max_attempts=100, max_elapsed_s=10, base_delay_s=4, max_delay_s=4)
    err = ApiTransientError("timeout", ambiguous=True)
    assert policy.next_delay(1, 5.0, err, lambda: 1.0) == 4.0
    assert policy.next_delay(1, 6.5, err, lambda: 1.0) is None


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(
        max_attempts=10, max_elapsed_s=1000, base_delay_s=0.1, max_delay_s=1, retry_after_max_s=30
    )
    assert (
        policy.next_delay(1, 0, ApiTransientError("429", http_status=429, retry_after_s=7), lambda: 0.1) == 7
    )
    assert (
        policy.next_delay(1, 0, ApiTransientError("429", http_status=429, retry_after_s=600), lambda: 0.1)
        == 30
    )
    # a Retry-After shorter than the backoff does not shorten it
    assert (
        policy.next_delay(4, 0, ApiTransientError("429", http_status=429, retry_after_s=0), lambda: 1.0)
        == 0.8
    )


def test_a_floor_from_the_caller_is_waited_and_must_fit_the_budget() -> None:
    """A timed-out request left to settle: the wait is at least the floor, and the floor counts
    against the time budget like any wait (it is the policy's one budget check)."""
    policy = RetryPolicy(max_attempts=10, max_elapsed_s=10, base_delay_s=0.1, max_delay_s=1)
    err = ApiTransientError("timeout", timed_out=True)
    assert policy.next_delay(1, 0, err, lambda: 0.5, at_least_s=3.0) == 3.0
    assert policy.next_delay(1, 6.0, err, lambda: 0.5, at_least_s=3.0) == 3.0
    assert policy.next_delay(1, 7.5, err, lambda: 0.5, at_least_s=3.0) is None
    assert policy.next_delay(1, 7.5, err, lambda: 0.5) == 0.05


def test_by_default_the_time_budget_not_the_attempt_cap_ends_an_events_retries() -> None:
    """At 8 attempts the full-jitter backoff spent ~13 s on average (6-18 s in an outage), and an
    API answering 503 for 30-60 s failed every event it touched, while the documented budget was
    120 s. With the default cap, a typical draw reaches the time budget first."""
    policy = RetryPolicy.from_settings(load_settings())
    error = ApiTransientError("HTTP 503", http_status=503)
    for draw in (0.4, 0.5, 0.6):  # around the mean draw
        attempts, elapsed = 1, 0.0
        while (delay := policy.next_delay(attempts, elapsed, error, lambda d=draw: d)) is not None:
            attempts, elapsed = attempts + 1, elapsed + delay
        assert elapsed > 100.0, draw
        if draw >= 0.5:
            assert attempts < policy.max_attempts  # the time ran out first
