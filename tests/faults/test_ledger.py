"""The ledger check catches each broken promise (synthetic runs, no services needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from faults.ledger import CommitSnapshot, InputMessage, check

T0 = 1_700_000_000.0


def _inputs(n: int = 4) -> list[InputMessage]:
    # two tickets, two events each, on partition 0
    return [InputMessage(0, i, f"ev{i}", f"T{i % 2}", i, True) for i in range(n)]


def _outcome(
    offset: int, status: str = "applied", *, at: float | None = None, redelivered: bool = False
) -> dict[str, Any]:
    finished = datetime.fromtimestamp(at if at is not None else T0 + offset, UTC).isoformat()
    return {
        "event_id": f"ev{offset}",
        "status": status,
        "redelivered": redelivered,
        "finished_at": finished,
        "source": {"topic": "in", "partition": 0, "offset": offset},
    }


def _applied(*event_ids: str) -> list[dict[str, Any]]:
    return [
        {"seq": n, "at": T0 + n, "ticket_id": f"T{int(e[2:]) % 2}", "event_id": e}
        for n, e in enumerate(event_ids, 1)
    ]


def _put(seq: int, event_id: str, code: str | None, at: float, status: int | None = 200) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at,
        "method": "PUT",
        "status": status,
        "error_code": code,
        "event_id": event_id,
        "fault": None,
    }


def _run(**changes: Any) -> Any:
    base: dict[str, Any] = {
        "inputs": _inputs(),
        "outcomes": [_outcome(i) for i in range(4)],
        "dead_letters": [],
        "applied_log": _applied("ev0", "ev1", "ev2", "ev3"),
        "requests": [],
        "snapshots": [CommitSnapshot(T0 + 10, {0: 4})],
        "final_positions": {0: 4},
    }
    base.update(changes)
    return check("t", **base)


def test_a_clean_run_holds() -> None:
    result = _run()
    assert result.problems() == []
    assert result.outcomes == {"applied": 4}
    assert result.commit_snapshots == 1


def test_a_message_without_outcome_is_lost() -> None:
    result = _run(outcomes=[_outcome(i) for i in range(3)], applied_log=_applied("ev0", "ev1", "ev2"))
    assert result.lost == 1
    assert result.example_events["lost"] == ["ev3"]


def test_a_redelivered_copy_with_the_same_status_is_allowed_and_counted() -> None:
    result = _run(outcomes=[*(_outcome(i) for i in range(4)), _outcome(2, redelivered=True, at=T0 + 5)])
    assert result.problems() == []
    assert result.redelivered_copies == 1


def test_two_unmarked_outcomes_or_two_statuses_break_exactly_one() -> None:
    result = _run(
        outcomes=[*(_outcome(i) for i in range(4)), _outcome(1, "rejected", at=T0 + 5)], dead_letters=[(0, 1)]
    )
    assert result.unmarked_copies == 1
    assert result.conflicting == 1


def test_double_application_and_misreported_outcomes() -> None:
    result = _run(applied_log=_applied("ev0", "ev1", "ev2", "ev3", "ev3"))
    assert result.applied_twice == 1
    rejected = [_outcome(0), _outcome(1), _outcome(2, "rejected"), _outcome(3)]
    result = _run(outcomes=rejected, dead_letters=[(0, 2)])
    assert result.applied_not_reported == 1
    result = _run(applied_log=_applied("ev0", "ev1", "ev2"))
    assert result.reported_not_applied == 1


def test_a_dead_letter_status_needs_a_dlq_record() -> None:
    result = _run(
        outcomes=[_outcome(0), _outcome(1), _outcome(2), _outcome(3, "invalid")],
        applied_log=_applied("ev0", "ev1", "ev2"),
    )
    assert result.dlq_missing == 1


def test_per_ticket_order_is_checked_on_first_applications() -> None:
    # T0 holds ev0 and ev2: ev2 applied before ev0
    result = _run(applied_log=_applied("ev2", "ev1", "ev0", "ev3"))
    assert result.order_violations == 1
    assert result.example_events["order_violations"] == []  # a ticket, not an event


def test_commits_over_unfinished_work_are_caught_at_the_moment_sampled() -> None:
    # offset 3 finished at T0+3; a commit of 4 seen at T0+2.5 was over unfinished work
    result = _run(snapshots=[CommitSnapshot(T0 + 2.5, {0: 4}, "early")])
    assert result.commit_violations == 1
    result = _run(final_positions={0: 2})
    assert result.uncommitted_at_end == 2


def test_a_request_after_the_applying_one_is_a_resend_and_after_the_outcome_a_reapplication() -> None:
    requests = [
        _put(1, "ev1", "GOM.00000000", T0 + 0.5),
        _put(2, "ev1", "GOM.00001005", T0 + 0.9, status=400),  # before ev1's outcome (T0+1)
        _put(3, "ev2", "GOM.00000000", T0 + 1.5),
        _put(4, "ev2", "GOM.00001005", T0 + 9, status=400),  # after ev2's outcome (T0+2)
        _put(5, "ev3", "GOM.00000000", T0 + 2.5),
        {**_put(6, "ev3", None, T0 + 9, status=None), "fault": "hang"},  # never reached the service
    ]
    result = _run(requests=requests)
    assert result.resent_after_apply == 2
    assert result.reapplied_after_outcome == 1
    assert result.example_events["reapplied_after_outcome"] == ["ev2"]


def test_an_identical_record_written_twice_is_a_producer_copy_not_a_second_outcome() -> None:
    result = _run(outcomes=[*(_outcome(i) for i in range(4)), _outcome(2)])
    assert result.problems() == []
    assert result.producer_copies == 1
    assert result.redelivered_copies == 0
