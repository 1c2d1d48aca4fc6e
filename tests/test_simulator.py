"""The COC API simulator: its pure state machine, then the real server over HTTP (auth, faults, admin)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from schemas.api import SUCCESS_CODE, ChangeResult, HistoryAction, Phase, UpdateTicketBody
from worker.signing import canonical_request, sdk_date, sign, signature
from worker.simulator import (
    FaultConfig,
    FaultKind,
    SimulatorConfig,
    SimulatorServer,
    SubState,
    load_seed_file,
    run_simulator,
)
from worker.simulator.faults import NO_FAULT, FaultInjector
from worker.simulator.state import SimulatorState
from worker.simulator.tickets import (
    BAD_ACTION,
    BAD_BODY,
    ILLEGAL_TRANSITION,
    SUB_TICKET_NOT_FOUND,
    TICKET_CLOSED,
    TICKET_NOT_FOUND,
    UNSUPPORTED_TICKET_TYPE,
    Change,
    Refused,
    SubTicket,
    Ticket,
    TicketBook,
    apply_update,
    transition,
)

AK = "AK-TEST-0001"
SK = "sk-test-secret-value"
TOKEN = "token-test-value"
SEED: dict[str, Any] = {
    "tickets": [
        {"ticket_id": "CM1", "sub_tickets": ["s-1", "s-2", "s-3"]},
        {"ticket_id": "CM-CLOSED", "phase": "phase_change_close", "sub_tickets": ["c-1"]},
    ]
}
START = {"history_info": {"action": "change_start_change_success"}, "sub_tickets": [{"ticket_id": "s-1"}]}


# --------------------------------------------------------------------------- the state machine


def body(action: HistoryAction | None, *subs: dict[str, Any], **extra: Any) -> UpdateTicketBody:
    raw: dict[str, Any] = {**extra}
    if action is not None:
        raw["history_info"] = {"action": str(action)}
    if subs:
        raw["sub_tickets"] = list(subs)
    return UpdateTicketBody.model_validate(raw)


def ticket(*states: tuple[str, SubState], phase: Phase = Phase.IMPLEMENTE) -> Ticket:
    t = Ticket("CM1", phase)
    for sub_id, state in states:
        t.sub_tickets[sub_id] = SubTicket(sub_id, "CM1", state)
    return t


ALLOWED: dict[tuple[SubState, HistoryAction, ChangeResult | None], SubState] = {
    (SubState.PENDING, HistoryAction.START, None): SubState.IMPLEMENTING,
    (SubState.IMPLEMENTING, HistoryAction.END, None): SubState.ENDED,
    (SubState.ENDED, HistoryAction.SET_RESULT, ChangeResult.SUCCESS): SubState.SUCCEEDED,
    (SubState.ENDED, HistoryAction.SET_RESULT, ChangeResult.FAILED): SubState.FAILED,
    (SubState.ENDED, HistoryAction.RESULT_FAILED, None): SubState.FAILED,
    (SubState.ENDED, HistoryAction.RESULT_FAILED, ChangeResult.FAILED): SubState.FAILED,
    # a failure reported during the rollout (a monitoring system's alert); a success needs the end
    (SubState.IMPLEMENTING, HistoryAction.SET_RESULT, ChangeResult.FAILED): SubState.FAILED,
    (SubState.IMPLEMENTING, HistoryAction.RESULT_FAILED, None): SubState.FAILED,
    (SubState.IMPLEMENTING, HistoryAction.RESULT_FAILED, ChangeResult.FAILED): SubState.FAILED,
    (SubState.PENDING, HistoryAction.CANCEL, None): SubState.CANCELLED,
    (SubState.PENDING, HistoryAction.CANCEL, ChangeResult.CANCEL): SubState.CANCELLED,
    (SubState.IMPLEMENTING, HistoryAction.CANCEL, None): SubState.CANCELLED,
    (SubState.IMPLEMENTING, HistoryAction.CANCEL, ChangeResult.CANCEL): SubState.CANCELLED,
}
# change_result values each action accepts at all (from any state).
ACCEPTED_RESULTS = {(action, result) for (_, action, result) in ALLOWED}


@pytest.mark.parametrize(
    ("state", "action", "result"),
    list(itertools.product(SubState, HistoryAction, [None, *ChangeResult])),
)
def test_every_transition_is_allowed_or_refused(
    state: SubState, action: HistoryAction, result: ChangeResult | None
) -> None:
    expected = ALLOWED.get((state, action, result))
    if expected is not None:
        assert transition("s-1", state, action, result) is expected
        return
    with pytest.raises(Refused) as refused:
        transition("s-1", state, action, result)
    assert refused.value.http_status == 400
    assert refused.value.code == (ILLEGAL_TRANSITION if (action, result) in ACCEPTED_RESULTS else BAD_ACTION)


def test_refusal_says_what_the_action_needed() -> None:
    with pytest.raises(
        Refused, match=r"^sub-ticket s-9 is ended; change_start_change_success needs pending$"
    ):
        transition("s-9", SubState.ENDED, HistoryAction.START, None)
    with pytest.raises(
        Refused, match=r"is succeeded; change_cancel_change_success needs pending or implementing"
    ):
        transition("s-9", SubState.SUCCEEDED, HistoryAction.CANCEL, None)


def test_full_walk_stores_result_fields() -> None:
    t = ticket(("s-1", SubState.PENDING))
    apply_update(t, body(HistoryAction.START, {"ticket_id": "s-1"}), now_ms=1)
    apply_update(t, body(HistoryAction.END, {"ticket_id": "s-1"}), now_ms=2)
    result = {
        "ticket_id": "s-1",
        "change_result": "change_result_failed",
        "comment": "Change failed.",
        "change_fail_type": "fr_dependent_service_issue",
        "rollback_start_time": 10,
        "rollback_end_time": 20,
        "is_rollback_success": True,
        "is_monitor_found": False,
        "verified_docs": None,
    }
    changes = apply_update(t, body(HistoryAction.SET_RESULT, result), now_ms=3)
    sub = t.sub_tickets["s-1"]
    assert sub.state == "failed"
    assert sub.change_result == "change_result_failed"
    assert {k: v for k, v in result.items() if k != "ticket_id"}.items() <= sub.fields.items()
    assert sub.update_time == 3
    assert [(c.sub_ticket_id, c.action, c.change_result) for c in changes] == [
        ("s-1", "change_set_change_result_success", "change_result_failed")
    ]


def test_several_sub_tickets_are_all_or_nothing() -> None:
    t = ticket(("s-1", SubState.PENDING), ("s-2", SubState.IMPLEMENTING))
    with pytest.raises(Refused) as refused:
        apply_update(t, body(HistoryAction.START, {"ticket_id": "s-1"}, {"ticket_id": "s-2"}), now_ms=5)
    assert refused.value.code == ILLEGAL_TRANSITION
    assert t.sub_tickets["s-1"].state == "pending"
    assert t.sub_tickets["s-1"].update_time == 0

    t = ticket(("s-1", SubState.PENDING), ("s-2", SubState.PENDING))
    changes = apply_update(t, body(HistoryAction.START, {"ticket_id": "s-1"}, {"ticket_id": "s-2"}), now_ms=5)
    assert [c.sub_ticket_id for c in changes] == ["s-1", "s-2"]
    assert {s.state for s in t.sub_tickets.values()} == {SubState.IMPLEMENTING}


def test_same_sub_ticket_twice_in_one_body_is_checked_in_order() -> None:
    t = ticket(("s-1", SubState.PENDING))
    with pytest.raises(Refused, match="is implementing"):
        apply_update(t, body(HistoryAction.START, {"ticket_id": "s-1"}, {"ticket_id": "s-1"}), now_ms=1)
    assert t.sub_tickets["s-1"].state == "pending"


def test_unknown_sub_ticket_and_malformed_sub_ticket_bodies_are_refused() -> None:
    t = ticket(("s-1", SubState.PENDING))
    with pytest.raises(Refused) as refused:
        apply_update(t, body(HistoryAction.START, {"ticket_id": "nope"}), now_ms=1)
    assert refused.value.code == SUB_TICKET_NOT_FOUND
    with pytest.raises(Refused) as refused:
        apply_update(t, body(HistoryAction.START, {"comment": "no id"}), now_ms=1)
    assert refused.value.code == BAD_BODY
    with pytest.raises(Refused) as refused:
        apply_update(t, body(None, {"ticket_id": "s-1"}), now_ms=1)
    assert refused.value.code == BAD_ACTION
    with pytest.raises(Refused) as refused:
        apply_update(t, body(HistoryAction.START), now_ms=1)
    assert refused.value.code == BAD_ACTION
    assert t.sub_tickets["s-1"].state == "pending"


def test_create_missing_adds_sub_tickets_only_when_accepted() -> None:
    t = ticket()
    with pytest.raises(Refused):
        apply_update(t, body(HistoryAction.END, {"ticket_id": "new"}), now_ms=1, create_missing=True)
    assert t.sub_tickets == {}
    apply_update(t, body(HistoryAction.START, {"ticket_id": "new"}), now_ms=1, create_missing=True)
    assert t.sub_tickets["new"].state == "implementing"


def test_ticket_info_sets_phase_and_status_until_closed() -> None:
    t = ticket()
    apply_update(t, body(None, ticket_info={"work_flow_status": "running"}), now_ms=1)
    assert (t.phase, t.work_flow_status) == (Phase.IMPLEMENTE, "running")
    changes = apply_update(
        t, body(HistoryAction.CANCEL, ticket_info={"phase": "phase_change_cancel"}), now_ms=2
    )
    assert t.phase == Phase.CANCEL
    assert [(c.sub_ticket_id, c.action) for c in changes] == [(None, "change_cancel_change_success")]
    for refused_body in (
        body(None, ticket_info={"phase": "phase_change_implemente"}),
        body(HistoryAction.START, {"ticket_id": "s-1"}),
    ):
        with pytest.raises(Refused) as refused:
            apply_update(t, refused_body, now_ms=3)
        assert refused.value.code == TICKET_CLOSED
    assert t.phase == Phase.CANCEL


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_can_be_set_from_an_open_ticket(phase: Phase) -> None:
    t = ticket()
    apply_update(t, body(None, ticket_info={"phase": str(phase)}), now_ms=1)
    assert t.phase is phase


def test_bodies_that_change_nothing_are_refused() -> None:
    for empty in (body(None), body(None, ticket_info={}), body(HistoryAction.START)):
        with pytest.raises(Refused) as refused:
            apply_update(ticket(), empty, now_ms=1)
        assert refused.value.code == BAD_ACTION


def test_ticket_book_seed_lookup_and_auto_create(tmp_path: Path) -> None:
    book = TicketBook()
    seed_file = tmp_path / "seed.json"
    seed_file.write_text(
        json.dumps(
            {
                "tickets": [
                    {
                        "ticket_id": "CM9",
                        "phase": "phase_change_approve",
                        "sub_tickets": ["a", {"ticket_id": "b", "state": "ended"}],
                    }
                ]
            }
        )
    )
    assert book.seed(load_seed_file(seed_file), now_ms=1) == 1
    cm9 = book.get("CM9", now_ms=2)
    assert cm9.phase == Phase.APPROVE
    assert {k: s.state for k, s in cm9.sub_tickets.items()} == {"a": "pending", "b": "ended"}
    with pytest.raises(Refused) as refused:
        book.get("missing", now_ms=2)
    assert (refused.value.code, refused.value.http_status) == (TICKET_NOT_FOUND, 400)
    with pytest.raises(ValidationError):
        book.seed({"tickets": [{"ticket_id": "x", "unknown": 1}]}, now_ms=1)

    auto = TicketBook(auto_create=True)
    auto.apply("CM-NEW", body(HistoryAction.START, {"ticket_id": "r-1"}), now_ms=1)
    assert auto.tickets["CM-NEW"].sub_tickets["r-1"].state == "implementing"


def test_config_hides_secrets_and_checks_the_seed() -> None:
    config = SimulatorConfig(credentials={AK: SK}, tokens={TOKEN})
    assert SK not in repr(config)
    assert TOKEN not in repr(config)
    with pytest.raises(ValidationError):
        SimulatorConfig(seed={"tickets": [{"phase": "phase_change_close"}]})


# --------------------------------------------------------------------------- fault decisions


def test_fault_config_validates_and_updates_partially() -> None:
    with pytest.raises(ValidationError):
        FaultConfig(error_ratio=1.5)
    with pytest.raises(ValidationError):
        FaultConfig(error_statuses=(418,))
    with pytest.raises(ValidationError):
        FaultConfig().updated(nonsense=1)
    updated = FaultConfig(latency_ms=5).updated(error_ratio=0.5)
    assert (updated.latency_ms, updated.error_ratio) == (5, 0.5)


def test_injector_is_silent_when_off_and_deterministic_when_seeded() -> None:
    assert FaultInjector(FaultConfig(), 1).decide() is NO_FAULT
    config = FaultConfig(error_ratio=0.3, drop_ratio=0.2, latency_ms=1, latency_jitter_ms=4)
    first, second = FaultInjector(config, 7), FaultInjector(config, 7)
    decisions = [first.decide() for _ in range(200)]
    assert decisions == [second.decide() for _ in range(200)]
    assert all(0.001 <= d.delay_s <= 0.005 for d in decisions)


@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("hang_ratio", FaultKind.HANG),
        ("drop_ratio", FaultKind.DROP),
        ("error_ratio", FaultKind.ERROR),
        ("throttle_ratio", FaultKind.THROTTLE),
        ("drop_after_apply_ratio", FaultKind.DROP_AFTER_APPLY),
    ],
)
def test_ratio_one_always_injects(field: str, kind: FaultKind) -> None:
    injector = FaultInjector(FaultConfig.model_validate({field: 1.0}), None)
    assert {injector.decide().kind for _ in range(50)} == {kind}


def test_ratios_split_one_draw() -> None:
    injector = FaultInjector(
        FaultConfig(error_ratio=0.25, throttle_ratio=0.25, spike_ratio=0.5, spike_ms=10), 3
    )
    decisions = [injector.decide() for _ in range(4000)]
    kinds = Counter(d.kind for d in decisions)
    assert 800 < kinds[FaultKind.ERROR] < 1200
    assert 800 < kinds[FaultKind.THROTTLE] < 1200
    assert {d.status for d in decisions if d.kind is FaultKind.ERROR} == {500, 502, 503, 504}
    assert 1600 < sum(d.delay_s > 0 for d in decisions) < 2400


# --------------------------------------------------------------------------- over HTTP


@dataclass
class Reply:
    status: int
    json: dict[str, Any]
    headers: Any
    text: str


@dataclass
class Api:
    """Signs and sends API requests to the simulator as the worker would."""

    session: aiohttp.ClientSession
    sim: SimulatorServer

    @property
    def host(self) -> str:
        return self.sim.url.removeprefix("http://")

    async def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        raw: bytes | None = None,
        ak: str = AK,
        sk: str = SK,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        query: Iterable[tuple[str, str]] = (),
        now: datetime | None = None,
        timeout_s: float = 5.0,
    ) -> Reply:
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        query = list(query)
        out = {"Content-Type": "application/json", **(headers or {})}
        if auth:
            out = sign(
                ak=ak,
                sk=sk,
                method=method,
                host=self.host,
                path=path,
                query=query,
                headers=out,
                body=data,
                now=now,
            )
        async with self.session.request(
            method,
            self.sim.url + path,
            params=query,
            data=data,
            headers=out,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            text = await resp.text()
            return Reply(resp.status, json.loads(text) if text else {}, resp.headers, text)

    async def put(self, ticket_id: str, payload: Any, **kw: Any) -> Reply:
        ticket_type = kw.pop("ticket_type", "change")
        return await self.call("PUT", f"/v1/{ticket_type}/tickets/{ticket_id}", payload, **kw)

    async def admin(self, method: str, path: str, payload: Any = None) -> Reply:
        async with self.session.request(method, self.sim.url + path, json=payload) as resp:
            text = await resp.text()
            return Reply(resp.status, json.loads(text), resp.headers, text)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorConfig(credentials={AK: SK}, tokens={TOKEN}, seed=SEED)) as server:
        yield server


@pytest.fixture
async def api(sim: SimulatorServer) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, sim)


def success_body(ticket_id: str) -> dict[str, Any]:
    return {
        "provider_code": "049",
        "error_code": SUCCESS_CODE,
        "error_msg": None,
        "data": {
            "ticket_info": {
                "is_start_process_async": True,
                "is_update_null": False,
                "is_return_full_info": False,
                "is_start_process": True,
                "ticket_id": ticket_id,
                "sub_tickets": [],
                "enum_data_list": [],
            },
            "history_info": None,
        },
    }


async def test_start_end_result_over_http(api: Api, sim: SimulatorServer) -> None:
    reply = await api.put("CM1", START)
    assert (reply.status, reply.json) == (200, success_body("CM1"))
    await api.put(
        "CM1",
        {"history_info": {"action": "change_end_change_success"}, "sub_tickets": [{"ticket_id": "s-1"}]},
    )
    result = {
        "sub_tickets": [
            {
                "ticket_id": "s-1",
                "sub_tickets": [],
                "change_result": "change_result_success",
                "is_verified_in_change_time": True,
                "verified_docs": None,
                "comment": "Change succeeded.",
            }
        ],
        "history_info": {"action": "change_set_change_result_success"},
    }
    assert (await api.put("CM1", result)).status == 200
    assert sim.state.tickets["CM1"].sub_tickets["s-1"].state == "succeeded"

    detail = await api.call("GET", "/v1/change/tickets/CM1")
    assert detail.status == 200
    assert detail.json["error_code"] == SUCCESS_CODE
    data = detail.json["data"]
    assert (data["ticket_id"], data["phase"]) == ("CM1", "phase_change_implemente")
    s1 = next(sub for sub in data["sub_tickets"] if sub["ticket_id"] == "s-1")
    assert (s1["state"], s1["change_result"], s1["comment"]) == (
        "succeeded",
        "change_result_success",
        "Change succeeded.",
    )
    assert s1["is_verified_in_change_time"] is True


async def test_list_sub_tickets_pages(api: Api) -> None:
    reply = await api.call("GET", "/v1/change/tickets/CM1/list-sub-tickets")
    assert reply.status == 200
    assert reply.json["data"]["total"] == 3
    assert [s["ticket_id"] for s in reply.json["data"]["sub_tickets"]] == ["s-1", "s-2", "s-3"]
    page = await api.call(
        "GET", "/v1/change/tickets/CM1/list-sub-tickets", query=[("limit", "1"), ("marker", "s-1")]
    )
    assert [s["ticket_id"] for s in page.json["data"]["sub_tickets"]] == ["s-2"]
    bad = await api.call("GET", "/v1/change/tickets/CM1/list-sub-tickets", query=[("limit", "x")])
    assert (bad.status, bad.json["error_code"]) == (400, BAD_BODY)


@pytest.mark.parametrize(
    ("payload", "raw", "code", "message"),
    [
        (None, b"{not json", BAD_BODY, "not JSON"),
        (None, b"", BAD_BODY, "not JSON"),
        ([START], None, BAD_BODY, "JSON object"),
        ({**START, "extra": 1}, None, BAD_BODY, "extra"),
        (
            {"history_info": {"action": "change_fly"}, "sub_tickets": [{"ticket_id": "s-1"}]},
            None,
            BAD_BODY,
            "action",
        ),
        (
            {"history_info": {"action": "change_end_change_success"}, "sub_tickets": [{"ticket_id": "s-1"}]},
            None,
            ILLEGAL_TRANSITION,
            "sub-ticket s-1 is pending; change_end_change_success needs implementing",
        ),
        (
            {
                "history_info": {"action": "change_start_change_success"},
                "sub_tickets": [{"ticket_id": "s-404"}],
            },
            None,
            SUB_TICKET_NOT_FOUND,
            "s-404",
        ),
        ({"sub_tickets": [{"ticket_id": "s-1"}]}, None, BAD_ACTION, "history_info.action is required"),
        # The reference's types, strictly (before, each of these was coerced and applied):
        *(
            (
                {**START, "sub_tickets": [{"ticket_id": "s-1", name: value}]},
                None,
                BAD_BODY,
                f"sub_tickets.0.{name}",
            )
            for name, value in (
                ("is_verified_in_change_time", "yes"),
                ("is_monitor_found", 1),
                ("rollback_start_time", "123"),
                ("rollback_start_time", 1.0),
                ("rollback_end_time", True),
                ("rollback_end_time", 2**63),  # a Long is 64 bits
            )
        ),
    ],
)
async def test_refusals_are_400_with_gom_codes(
    api: Api, sim: SimulatorServer, payload: Any, raw: bytes | None, code: str, message: str
) -> None:
    reply = await api.put("CM1", payload, raw=raw)
    assert reply.status == 400
    assert reply.json["provider_code"] == "049"
    assert reply.json["error_code"] == code
    assert message in reply.json["error_msg"]
    assert sim.state.applied_log == []
    assert sim.state.tickets["CM1"].sub_tickets["s-1"].state == "pending"


async def test_ticket_type_unknown_ticket_and_closed_ticket(api: Api) -> None:
    reply = await api.put("CM1", START, ticket_type="incident")
    assert (reply.status, reply.json["error_code"]) == (400, UNSUPPORTED_TICKET_TYPE)
    reply = await api.call("GET", "/v1/issues_mgmt/tickets/CM1")
    assert (reply.status, reply.json["error_code"]) == (400, UNSUPPORTED_TICKET_TYPE)
    reply = await api.put("CM-404", START)
    assert (reply.status, reply.json["error_code"]) == (400, TICKET_NOT_FOUND)
    reply = await api.call("GET", "/v1/change/tickets/CM-404")
    assert (reply.status, reply.json["error_code"]) == (400, TICKET_NOT_FOUND)
    reply = await api.put("CM-CLOSED", {"ticket_info": {"phase": "phase_change_end"}})
    assert (reply.status, reply.json["error_code"]) == (400, TICKET_CLOSED)


async def test_auto_create_on_first_sight() -> None:
    async with SimulatorServer(SimulatorConfig(auto_create=True)) as sim, aiohttp.ClientSession() as session:
        api = Api(session, sim)
        assert (await api.put("CM-BENCH", START, auth=False)).status == 200
        assert sim.state.tickets["CM-BENCH"].sub_tickets["s-1"].state == "implementing"


async def test_a_failure_is_taken_while_the_change_is_implementing_a_success_is_not(
    api: Api, sim: SimulatorServer
) -> None:
    """A monitoring system reports a failure while the deploy system is still rolling out: the
    reference's fourth example (and Table 5's ``change_result_failed`` action) on an implementing
    sub-ticket is applied and leaves it failed. A success still needs the end, and the deploy
    system's own end after the failure is refused."""
    started = {
        "history_info": {"action": "change_start_change_success"},
        "sub_tickets": [{"ticket_id": s} for s in ("s-1", "s-2", "s-3")],
    }
    assert (await api.put("CM1", started)).status == 200
    alert = {
        "sub_tickets": [
            {
                "ticket_id": "s-1",
                "sub_tickets": [],
                "change_result": "change_result_failed",
                "verified_docs": None,
                "comment": "HighErrorRate firing",
                "change_fail_type": "fr_dependent_service_issue",
                "rollback_start_time": None,
                "rollback_end_time": None,
                "is_monitor_found": True,
            }
        ],
        "history_info": {"action": "change_set_change_result_success"},
    }
    reply = await api.put("CM1", alert)
    assert (reply.status, reply.json) == (200, success_body("CM1"))
    failed_action = {
        "history_info": {"action": "change_result_failed"},
        "sub_tickets": [{"ticket_id": "s-2"}],
    }
    assert (await api.put("CM1", failed_action)).status == 200
    subs = sim.state.tickets["CM1"].sub_tickets
    assert (subs["s-1"].state, subs["s-1"].change_result) == ("failed", "change_result_failed")
    assert subs["s-1"].fields["is_monitor_found"] is True
    assert subs["s-2"].state == "failed"

    success = {
        "sub_tickets": [{"ticket_id": "s-3", "sub_tickets": [], "change_result": "change_result_success"}],
        "history_info": {"action": "change_set_change_result_success"},
    }
    reply = await api.put("CM1", success)
    assert (reply.status, reply.json["error_code"], reply.json["error_msg"]) == (
        400,
        ILLEGAL_TRANSITION,
        "sub-ticket s-3 is implementing; change_set_change_result_success with change_result_success"
        " needs ended",
    )
    assert subs["s-3"].state == "implementing"
    ended = {"history_info": {"action": "change_end_change_success"}, "sub_tickets": [{"ticket_id": "s-1"}]}
    reply = await api.put("CM1", ended)
    assert (reply.status, reply.json["error_code"]) == (400, ILLEGAL_TRANSITION)
    assert "sub-ticket s-1 is failed; change_end_change_success needs implementing" in reply.json["error_msg"]
    assert [(e["sub_ticket_id"], e["action"]) for e in sim.state.applied_log[3:]] == [
        ("s-1", "change_set_change_result_success"),
        ("s-2", "change_result_failed"),
    ]


async def test_auto_create_stores_a_ticket_only_once_a_write_to_it_is_accepted() -> None:
    """``auto_create`` made a ticket on any sight: a read, or a write it then refused (the worker's
    probe sends ``{}`` to a ticket no event names), contrary to "nothing is written if any part
    fails". A read answers with a fresh ticket's view, as before, without storing it."""
    async with SimulatorServer(SimulatorConfig(auto_create=True)) as sim, aiohttp.ClientSession() as session:
        api = Api(session, sim)
        detail = await api.call("GET", "/v1/change/tickets/CM-READ", auth=False)
        assert (detail.status, detail.json["error_code"]) == (200, SUCCESS_CODE)
        data = detail.json["data"]
        assert (data["ticket_id"], data["phase"], data["sub_tickets"]) == (
            "CM-READ",
            "phase_change_implemente",
            [],
        )
        listed = await api.call("GET", "/v1/change/tickets/CM-LIST/list-sub-tickets", auth=False)
        assert (listed.status, listed.json["data"]) == (200, {"total": 0, "sub_tickets": []})
        empty = await api.put("CM-EMPTY", {}, auth=False)
        assert (empty.status, empty.json["error_code"]) == (400, BAD_ACTION)
        ended = {
            "history_info": {"action": "change_end_change_success"},
            "sub_tickets": [{"ticket_id": "s-1"}],
        }
        refused = await api.put("CM-EARLY", ended, auth=False)
        assert (refused.status, refused.json["error_code"]) == (400, ILLEGAL_TRANSITION)
        assert sim.state.tickets == {}
        assert sim.state.stats()["tickets"] == 0

        assert (await api.put("CM-EARLY", START, auth=False)).status == 200
        assert list(sim.state.tickets) == ["CM-EARLY"]
        assert sim.state.tickets["CM-EARLY"].sub_tickets["s-1"].state == "implementing"


async def test_applied_log_carries_event_id_and_traceparent(api: Api, sim: SimulatorServer) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await api.put("CM1", START, headers={"X-Event-Id": "ev-1", "traceparent": traceparent})
    await api.put(
        "CM1",
        {
            "history_info": {"action": "change_cancel_change_success"},
            "sub_tickets": [{"ticket_id": "s-2"}, {"ticket_id": "s-3"}],
        },
        headers={"X-Event-Id": "ev-2"},
    )
    await api.put("CM1", START, headers={"X-Event-Id": "ev-3"})  # refused: not logged
    log = sim.state.applied_log
    assert [(e["seq"], e["sub_ticket_id"], e["event_id"]) for e in log] == [
        (1, "s-1", "ev-1"),
        (2, "s-2", "ev-2"),
        (3, "s-3", "ev-2"),
    ]
    assert log[0]["traceparent"] == traceparent
    assert log[0]["action"] == "change_start_change_success"
    assert log[0]["body"] == START
    assert log[1]["traceparent"] is None

    reply = await api.admin("GET", "/_sim/log?event_id=ev-2")
    assert [e["sub_ticket_id"] for e in reply.json["applied"]] == ["s-2", "s-3"]
    reply = await api.admin("GET", "/_sim/log?since=2")
    assert [e["seq"] for e in reply.json["applied"]] == [3]


# --------------------------------------------------------------------------- auth


async def test_good_signature_and_token_pass(api: Api) -> None:
    assert (await api.put("CM1", START)).status == 200
    reply = await api.call("GET", "/v1/change/tickets/CM1", auth=False, headers={"X-Auth-Token": TOKEN})
    assert reply.status == 200
    skewed = datetime.now(UTC) - timedelta(minutes=14)
    assert (await api.call("GET", "/v1/change/tickets/CM1", now=skewed)).status == 200


def assert_401(reply: Reply, reason: str) -> None:
    assert reply.status == 401
    assert set(reply.json) == {"error_code", "error_msg", "request_id"}
    assert reply.json["error_code"] == "APIGW.0301"
    assert reply.json["error_msg"].startswith("Incorrect IAM authentication information: ")
    assert reason in reply.json["error_msg"]
    assert len(reply.json["request_id"]) == 32
    assert SK not in reply.text
    assert TOKEN not in reply.text


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"sk": "wrong-secret"}, "signature mismatch"),
        ({"ak": "AK-UNKNOWN"}, "unknown access key"),
        # the skew is applied when the test runs, not when it is collected (minutes earlier)
        ({"skew": timedelta(minutes=-16)}, "more than 15 minutes"),
        ({"skew": timedelta(minutes=16)}, "more than 15 minutes"),
        ({"auth": False}, "missing Authorization header or X-Auth-Token"),
        ({"auth": False, "headers": {"X-Auth-Token": "not-a-token"}}, "invalid token"),
    ],
)
async def test_bad_credentials_are_401(
    api: Api, sim: SimulatorServer, kwargs: dict[str, Any], reason: str
) -> None:
    kwargs = dict(kwargs)
    if "skew" in kwargs:
        kwargs["now"] = datetime.now(UTC) + kwargs.pop("skew")
    assert_401(await api.put("CM1", START, **kwargs), reason)
    assert sim.state.applied_log == []


async def test_tampered_body_and_unsigned_headers_are_401(api: Api) -> None:
    path = "/v1/change/tickets/CM1"
    signed = sign(
        ak=AK,
        sk=SK,
        method="PUT",
        host=api.host,
        path=path,
        headers={"Content-Type": "application/json"},
        body=b"{}",
    )
    async with api.session.put(api.sim.url + path, data=json.dumps(START), headers=signed) as resp:
        assert_401(
            Reply(resp.status, await resp.json(), resp.headers, await resp.text()), "signature mismatch"
        )

    no_date = {k: v for k, v in signed.items() if k != "X-Sdk-Date"}
    async with api.session.put(api.sim.url + path, data=b"{}", headers=no_date) as resp:
        assert_401(Reply(resp.status, await resp.json(), resp.headers, await resp.text()), "X-Sdk-Date")

    # Sign everything but Host.
    date = sdk_date()
    headers = {"Content-Type": "application/json", "X-Sdk-Date": date}
    names = ["content-type", "x-sdk-date"]
    canonical = canonical_request("PUT", path, [], headers, names, b"{}")
    headers["Authorization"] = (
        f"SDK-HMAC-SHA256 Access={AK}, SignedHeaders={';'.join(names)}, Signature={signature(SK, date, canonical)}"
    )
    async with api.session.put(api.sim.url + path, data=b"{}", headers=headers) as resp:
        assert_401(Reply(resp.status, await resp.json(), resp.headers, await resp.text()), "Host not signed")


async def test_revoke_and_restore_credentials(api: Api, sim: SimulatorServer) -> None:
    reply = await api.admin("PUT", "/_sim/credentials", {"revoked": True})
    assert reply.json == {"revoked": True, "access_keys": 1, "tokens": 1}
    assert_401(await api.put("CM1", START), "revoked")
    assert_401(
        await api.call("GET", "/v1/change/tickets/CM1", auth=False, headers={"X-Auth-Token": TOKEN}),
        "revoked",
    )
    await api.admin("PUT", "/_sim/credentials", {"revoked": False})
    assert (await api.put("CM1", START)).status == 200

    sim.state.revoke(True)
    assert (await api.call("GET", "/v1/change/tickets/CM1")).status == 401
    sim.state.revoke(False)
    assert (await api.call("GET", "/v1/change/tickets/CM1")).status == 200


async def test_replace_credentials_never_echoes_secrets(api: Api) -> None:
    reply = await api.admin("PUT", "/_sim/credentials", {"AK-NEW": "sk-new-secret"})
    assert reply.json == {"revoked": False, "access_keys": 1, "tokens": 1}
    assert "sk-new-secret" not in reply.text
    assert_401(await api.call("GET", "/v1/change/tickets/CM1"), "unknown access key")
    assert (await api.call("GET", "/v1/change/tickets/CM1", ak="AK-NEW", sk="sk-new-secret")).status == 200
    reply = await api.admin("PUT", "/_sim/credentials", {"credentials": {AK: SK}, "tokens": []})
    assert reply.json == {"revoked": False, "access_keys": 1, "tokens": 0}
    assert (await api.call("GET", "/v1/change/tickets/CM1")).status == 200
    assert (await api.admin("PUT", "/_sim/credentials", {"revoked": "yes"})).status == 400
    assert (await api.admin("PUT", "/_sim/credentials", {"tokens": "one"})).status == 400


# --------------------------------------------------------------------------- faults


async def test_error_fault_is_5xx_and_not_applied(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(error_ratio=1.0, error_statuses=[503])
    reply = await api.put("CM1", START, headers={"X-Event-Id": "ev-err"})
    assert reply.status == 503
    assert reply.json["error_code"] == "GOM.00009503"
    assert sim.state.applied_log == []
    sim.state.set_faults(error_statuses=[500, 502, 503, 504])
    statuses = {(await api.call("GET", "/v1/change/tickets/CM1")).status for _ in range(20)}
    assert statuses <= {500, 502, 503, 504}
    assert len(statuses) > 1
    assert sim.state.requests[0].fault == "error"
    assert sim.state.requests[0].event_id == "ev-err"


async def test_throttle_fault_is_429_with_retry_after(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(throttle_ratio=1.0, retry_after_s=0.5)
    reply = await api.put("CM1", START)
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "0.5"
    assert reply.json["error_code"] == "APIGW.0308"
    sim.state.set_faults(retry_after_s=2)
    assert (await api.put("CM1", START)).headers["Retry-After"] == "2"
    assert sim.state.applied_log == []


async def test_auth_is_checked_before_gateway_faults(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(throttle_ratio=1.0)
    assert_401(await api.put("CM1", START, sk="wrong"), "signature mismatch")
    assert sim.state.requests[-1].fault is None


@pytest.mark.parametrize("faults", [{"latency_ms": 60}, {"spike_ratio": 1.0, "spike_ms": 60}])
async def test_latency_faults_delay_the_answer(
    api: Api, sim: SimulatorServer, faults: dict[str, float]
) -> None:
    sim.state.set_faults(**faults)
    started = time.monotonic()
    assert (await api.put("CM1", START)).status == 200
    assert time.monotonic() - started >= 0.06


async def test_hang_fault_never_answers_nor_applies(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(hang_ratio=1.0)
    with pytest.raises(TimeoutError):
        await api.put("CM1", START, timeout_s=0.2)
    assert sim.state.applied_log == []
    started = time.monotonic()
    await sim.stop()  # releases the hung handler instead of waiting out hang_s
    assert time.monotonic() - started < 10.0  # only catches a hang
    # Released, the handler ends as a hang does (the connection closed unanswered) and is logged;
    # one left hanging would be cancelled by the server's shutdown timeout, leaving no record.
    assert [(r.status, r.fault) for r in sim.state.requests] == [(None, "hang")]


async def test_hang_fault_ends_by_closing_the_connection(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(hang_ratio=1.0, hang_s=0.05)
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.put("CM1", START)
    assert sim.state.applied_log == []


async def test_drop_fault_closes_the_connection_without_applying(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(drop_ratio=1.0)
    # On the wire: the connection ends without a single byte of response.
    host, port = api.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/change/tickets/CM1 HTTP/1.1\r\nHost: {api.host}\r\nX-Auth-Token: {TOKEN}\r\n\r\n".encode()
    )
    assert await asyncio.wait_for(reader.read(), timeout=2.0) == b""
    writer.close()
    await writer.wait_closed()

    with pytest.raises(aiohttp.ClientConnectionError):
        await api.put("CM1", START)
    assert sim.state.applied_log == []
    assert sim.state.tickets["CM1"].sub_tickets["s-1"].state == "pending"
    # aiohttp silently resends an idempotent method (PUT, GET) once after a disconnect.
    assert [(r.method, r.status, r.fault) for r in sim.state.requests] == [
        ("GET", None, "drop"),
        ("PUT", None, "drop"),
        ("PUT", None, "drop"),
    ]
    assert sim.state.stats()["by_status"] == {"dropped": 3}


async def test_drop_after_apply_is_an_ambiguous_failure(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(drop_after_apply_ratio=1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.put("CM1", START, headers={"X-Event-Id": "ev-amb"})
    assert [e["event_id"] for e in sim.state.applied_log] == ["ev-amb"]
    assert sim.state.tickets["CM1"].sub_tickets["s-1"].state == "implementing"
    # aiohttp's own resend of the PUT already met the applied state (and was dropped too).
    assert [(r.status, r.error_code, r.fault) for r in sim.state.requests] == [
        (None, SUCCESS_CODE, "drop_after_apply"),
        (None, ILLEGAL_TRANSITION, "drop_after_apply"),
    ]
    sim.state.set_faults(drop_after_apply_ratio=0.0)
    assert (await api.put("CM1", START)).json["error_code"] == ILLEGAL_TRANSITION


async def test_faults_never_touch_admin_endpoints(api: Api, sim: SimulatorServer) -> None:
    await api.admin("PUT", "/_sim/faults", {"error_ratio": 1.0})
    for path in ("/_sim/health", "/_sim/stats", "/_sim/faults", "/_sim/log", "/_sim/requests"):
        assert (await api.admin("GET", path)).status == 200
    assert (await api.put("CM1", START)).status >= 500


# --------------------------------------------------------------------------- admin


async def test_admin_seed_get_and_reset(api: Api, sim: SimulatorServer) -> None:
    assert (await api.admin("GET", "/_sim/health")).json == {"status": "ok"}
    reply = await api.admin(
        "POST", "/_sim/tickets", {"tickets": [{"ticket_id": "CM2", "sub_tickets": ["x-1"]}]}
    )
    assert reply.json == {"seeded": 1}
    assert (await api.admin("POST", "/_sim/tickets", {"tickets": [{"sub_tickets": []}]})).status == 400
    assert (await api.admin("POST", "/_sim/tickets", ["not", "an", "object"])).status == 400
    await api.put(
        "CM2",
        {"history_info": {"action": "change_start_change_success"}, "sub_tickets": [{"ticket_id": "x-1"}]},
    )
    reply = await api.admin("GET", "/_sim/tickets/CM2")
    assert reply.json["sub_tickets"][0]["state"] == "implementing"
    assert (await api.admin("GET", "/_sim/tickets/CM-404")).status == 404

    await api.admin("PUT", "/_sim/faults", {"latency_ms": 1})
    reply = await api.admin("POST", "/_sim/reset")
    assert reply.json == {"reset": True}
    assert set(sim.state.tickets) == {"CM1", "CM-CLOSED"}
    assert sim.state.applied_log == []
    assert sim.state.faults == FaultConfig()
    assert (await api.admin("GET", "/_sim/stats")).json["requests_total"] == 0


async def test_admin_faults_partial_update(api: Api, sim: SimulatorServer) -> None:
    reply = await api.admin("PUT", "/_sim/faults", {"throttle_ratio": 0.25})
    assert reply.status == 200
    assert reply.json["throttle_ratio"] == 0.25
    reply = await api.admin("PUT", "/_sim/faults", {"retry_after_s": 3})
    assert (reply.json["throttle_ratio"], reply.json["retry_after_s"]) == (0.25, 3)
    assert (await api.admin("GET", "/_sim/faults")).json == reply.json
    assert (await api.admin("PUT", "/_sim/faults", {"error_ratio": 2})).status == 400
    assert (await api.admin("PUT", "/_sim/faults", {"unknown": 1})).status == 400
    assert sim.state.faults.throttle_ratio == 0.25


async def test_admin_request_log_and_stats(api: Api, sim: SimulatorServer) -> None:
    await api.put("CM1", START, headers={"X-Event-Id": "ev-a"})
    await api.put("CM1", START, headers={"X-Event-Id": "ev-b"})
    await api.call("GET", "/v1/change/tickets/CM1", sk="bad")
    reply = await api.admin("GET", "/_sim/requests")
    assert [
        (r["method"], r["path"], r["status"], r["error_code"], r["event_id"], r["fault"])
        for r in reply.json["requests"]
    ] == [
        ("PUT", "/v1/change/tickets/CM1", 200, SUCCESS_CODE, "ev-a", None),
        ("PUT", "/v1/change/tickets/CM1", 400, ILLEGAL_TRANSITION, "ev-b", None),
        ("GET", "/v1/change/tickets/CM1", 401, "APIGW.0301", None, None),
    ]
    assert len((await api.admin("GET", "/_sim/requests?limit=1")).json["requests"]) == 1
    stats = (await api.admin("GET", "/_sim/stats")).json
    assert stats == {
        "requests_total": 3,
        "by_status": {"200": 1, "400": 1, "401": 1},
        "faults": {},
        "applied": 1,
        "tickets": 2,
    }


async def test_wait_for_follows_requests_with_a_deadline(api: Api, sim: SimulatorServer) -> None:
    sim.state.set_faults(latency_ms=30)
    task = asyncio.create_task(api.put("CM1", START))
    await sim.state.wait_for(lambda: len(sim.state.applied_log) == 1, timeout_s=2.0)
    assert (await task).status == 200
    with pytest.raises(TimeoutError):
        await sim.state.wait_for(lambda: False, timeout_s=0.05)


async def test_request_log_is_bounded() -> None:
    async with (
        SimulatorServer(SimulatorConfig(request_log_size=2, seed=SEED)) as sim,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, sim)
        for _ in range(3):
            await api.call("GET", "/v1/change/tickets/CM1", auth=False)
        assert [r.seq for r in sim.state.requests] == [2, 3]
        assert sim.state.stats()["requests_total"] == 3


def test_applied_log_can_be_bounded_and_still_counts_every_change() -> None:
    """The benchmark keeps one entry (a log of every change, bodies included, made the collector's
    full passes stall the simulator for tens of ms); the count and the ``seq`` numbers go on."""
    change = [Change("s-1", "change_start", None)]
    bounded = SimulatorState(SimulatorConfig(applied_log_size=2))
    for n in range(3):
        bounded.record_applied("CM1", change, {"n": n}, f"ev-{n}", None)
    assert [(e["seq"], e["event_id"]) for e in bounded.applied_log] == [(2, "ev-1"), (3, "ev-2")]
    assert bounded.stats()["applied"] == 3
    bounded.reset()
    assert (bounded.applied_log, bounded.stats()["applied"]) == ([], 0)
    bounded.record_applied("CM1", change, {}, "ev-9", None)
    assert [e["seq"] for e in bounded.applied_log] == [1]

    every = SimulatorState(SimulatorConfig())  # the default, which the tests' ledgers rely on
    for n in range(3):
        every.record_applied("CM1", change, {}, f"ev-{n}", None)
    assert [e["seq"] for e in every.applied_log] == [1, 2, 3]


async def test_run_simulator_serves_until_cancelled() -> None:
    urls: list[str] = []
    ready = asyncio.Event()

    def on_ready(url: str) -> None:
        urls.append(url)
        ready.set()

    task = asyncio.create_task(run_simulator(SimulatorConfig(), on_ready))
    await asyncio.wait_for(ready.wait(), timeout=5.0)
    async with aiohttp.ClientSession() as session, session.get(urls[0] + "/_sim/health") as resp:
        assert resp.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(urls[0] + "/_sim/health")
