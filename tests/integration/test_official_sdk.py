"""The official ``huaweicloudsdkcoc`` client against the simulator: its signatures verify, its calls succeed
and its models parse our responses. Only 127.0.0.1 is contacted (endpoint and domain_id are given, so
the SDK never asks IAM)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from huaweicloudsdkcoc.v1 import (
    CocClient,
    CocUpdateChangeRequestBody,
    CocUpdateChangeRequestBodyHistoryInfo,
    CocUpdateChangeRequestBodySubTickets,
    CocUpdateChangeRequestBodyTicketInfo,
    ListSubTicketsRequest,
    ShowTicketInfoRequest,
    UpdateTicketRequest,
)
from huaweicloudsdkcore.auth.credentials import BasicCredentials, GlobalCredentials
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkcore.http.http_config import HttpConfig

from schemas.api import SUCCESS_CODE
from worker.simulator import SimulatorConfig, SimulatorServer
from worker.simulator.tickets import ILLEGAL_TRANSITION

pytestmark = pytest.mark.integration

AK = "AK-SDK-0001"
SK = "sk-sdk-secret"
SEED = {"tickets": [{"ticket_id": "CM202506261919380164485133", "sub_tickets": ["sub-a", "sub-b"]}]}
TICKET = "CM202506261919380164485133"


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorConfig(credentials={AK: SK}, seed=SEED)) as server:
        yield server


def make_client(url: str, credentials: GlobalCredentials | BasicCredentials) -> CocClient:
    config = HttpConfig.get_default_config()
    config.timeout = (2, 5)
    return (
        CocClient.new_builder()
        .with_http_config(config)
        .with_credentials(credentials)
        .with_endpoints([url])
        .build()
    )


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``requests`` honours proxy variables; keep the SDK's calls on the loopback."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def client(sim: SimulatorServer, no_proxy: None) -> Iterator[CocClient]:
    sdk = make_client(sim.url, GlobalCredentials(AK, SK, "domain-0001"))
    yield sdk
    sdk.close()


def update(action: str, sub_ticket: str, **result: Any) -> UpdateTicketRequest:
    return UpdateTicketRequest(
        ticket_type="change",
        ticket_id=TICKET,
        body=CocUpdateChangeRequestBody(
            history_info=CocUpdateChangeRequestBodyHistoryInfo(action=action),
            sub_tickets=[CocUpdateChangeRequestBodySubTickets(ticket_id=sub_ticket, **result)],
        ),
    )


async def test_sdk_walks_a_sub_ticket_through_start_end_result(
    client: CocClient, sim: SimulatorServer
) -> None:
    for request in (
        update("change_start_change_success", "sub-a"),
        update("change_end_change_success", "sub-a"),
        update(
            "change_set_change_result_success",
            "sub-a",
            change_result="change_result_failed",
            comment="Change failed.",
            change_fail_type="fr_dependent_service_issue",
            is_rollback_success=True,
            is_monitor_found=False,
        ),
    ):
        response = await asyncio.to_thread(client.update_ticket, request)
        assert response.error_code == SUCCESS_CODE
        assert response.provider_code == "049"
        assert response.data["ticket_info"]["ticket_id"] == TICKET

    sub = sim.state.tickets[TICKET].sub_tickets["sub-a"]
    assert (sub.state, sub.change_result) == ("failed", "change_result_failed")
    assert sub.fields["change_fail_type"] == "fr_dependent_service_issue"
    assert [entry["action"] for entry in sim.state.applied_log] == [
        "change_start_change_success",
        "change_end_change_success",
        "change_set_change_result_success",
    ]


async def test_sdk_parses_ticket_detail_and_sub_ticket_list(client: CocClient) -> None:
    await asyncio.to_thread(client.update_ticket, update("change_cancel_change_success", "sub-b"))
    detail = await asyncio.to_thread(
        client.show_ticket_info, ShowTicketInfoRequest(ticket_type="change", ticket_id=TICKET)
    )
    assert detail.error_code == SUCCESS_CODE
    assert (detail.data.ticket_id, detail.data.phase) == (TICKET, "phase_change_implemente")
    assert [(s.ticket_id, s.main_ticket_id) for s in detail.data.sub_tickets] == [
        ("sub-a", TICKET),
        ("sub-b", TICKET),
    ]

    listed = await asyncio.to_thread(
        client.list_sub_tickets,
        ListSubTicketsRequest(ticket_type="change", ticket_id=TICKET, type="change", limit=10),
    )
    assert listed.data["total"] == 2
    states = {s["ticket_id"]: s["state"] for s in listed.data["sub_tickets"]}
    assert states == {"sub-a": "pending", "sub-b": "cancelled"}


async def test_sdk_sets_the_ticket_phase(client: CocClient, sim: SimulatorServer) -> None:
    request = UpdateTicketRequest(
        ticket_type="change",
        ticket_id=TICKET,
        body=CocUpdateChangeRequestBody(
            ticket_info=CocUpdateChangeRequestBodyTicketInfo(
                phase="phase_change_end", work_flow_status="done"
            )
        ),
    )
    assert (await asyncio.to_thread(client.update_ticket, request)).error_code == SUCCESS_CODE
    assert (sim.state.tickets[TICKET].phase, sim.state.tickets[TICKET].work_flow_status) == (
        "phase_change_end",
        "done",
    )


async def test_sdk_surfaces_refusals_with_their_gom_code(client: CocClient) -> None:
    with pytest.raises(ClientRequestException) as refused:
        await asyncio.to_thread(client.update_ticket, update("change_end_change_success", "sub-a"))
    assert refused.value.status_code == 400
    assert refused.value.error_code == ILLEGAL_TRANSITION
    assert "needs implementing" in refused.value.error_msg


async def test_sdk_with_a_wrong_secret_gets_401(sim: SimulatorServer, no_proxy: None) -> None:
    sdk = make_client(sim.url, BasicCredentials(AK, "not-the-secret", "project-0001"))
    try:
        with pytest.raises(ClientRequestException) as refused:
            await asyncio.to_thread(sdk.update_ticket, update("change_start_change_success", "sub-a"))
    finally:
        sdk.close()
    assert refused.value.status_code == 401
    assert refused.value.error_code == "APIGW.0301"
    assert sim.state.applied_log == []
