"""The simulator's HTTP face: the COC API routes (gateway auth, faults, logs) and the ``/_sim`` admin.

Per API request, in the order a real deployment would meet them: the request read whole, injected
latency (a slow service: a request slower than its client's timeout is still applied), then a hang
or a dropped connection (the network), then authentication and throttling (the API gateway),
then an injected 5xx or the real handler (the service), then perhaps a drop after applying.
Nothing is printed per request: the benchmark pushes thousands of requests a second through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from pydantic_core import to_json

from schemas.api import SUCCESS_CODE, UpdateTicketBody
from worker.signing import verify
from worker.simulator.faults import FaultKind
from worker.simulator.state import SimulatorConfig, SimulatorState, now_ms
from worker.simulator.tickets import (
    BAD_BODY,
    FAULT_CODES,
    PROVIDER_CODE,
    SUPPORTED_TICKET_TYPE,
    UNSUPPORTED_TICKET_TYPE,
    Refused,
    Ticket,
)

EVENT_ID_HEADER = "X-Event-Id"
TRACEPARENT_HEADER = "traceparent"
AUTH_FAILED_CODE = "APIGW.0301"
NOT_AUTHORIZED_CODE = "APIGW.0302"
BACKEND_TIMEOUT_CODE = "APIG.0201"
THROTTLED_CODE = "APIGW.0308"

STATE_KEY = web.AppKey("simulator_state", SimulatorState)


@dataclass(slots=True)
class _Reply:
    status: int
    payload: dict[str, Any]
    headers: dict[str, str] | None = None


_Handler = Callable[[web.Request, bytes, str | None], _Reply]


def _ok(data: Any) -> _Reply:
    return _Reply(
        200, {"provider_code": PROVIDER_CODE, "error_code": SUCCESS_CODE, "error_msg": None, "data": data}
    )


def _gom_error(code: str, message: str, status: int = 400) -> _Reply:
    return _Reply(status, {"provider_code": PROVIDER_CODE, "error_code": code, "error_msg": message})


def _gateway_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, {"error_code": code, "error_msg": message, "request_id": uuid.uuid4().hex}, headers)


def _describe(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:3]]
    return "; ".join(parts)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class _Api:
    """The three COC routes behind one wrapper that applies faults, auth and bookkeeping."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state

    async def update_ticket(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._update)

    async def show_ticket(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._show)

    async def list_sub_tickets(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._list_sub_tickets)

    async def _serve(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        state = self.state
        state.arrived += 1
        # Read whole on arrival, as a real service's front end does: a request slower than its
        # client's timeout (injected latency) is still applied after the client gave up on it.
        body = await request.read()
        decision = state.injector.decide()
        if decision.delay_s > 0:
            await asyncio.sleep(decision.delay_s)
        kind = decision.kind
        event_id = request.headers.get(EVENT_ID_HEADER)
        if kind is FaultKind.HANG:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.stopping.wait(), state.faults.hang_s)
            return self._drop(request, event_id, kind)
        if kind is FaultKind.DROP:
            return self._drop(request, event_id, kind)
        reason = self._authenticate(request, body) if state.auth_enabled else None
        if reason is not None:
            kind = None  # the gateway refused it first: no fault was applied
            reply = _gateway_error(
                401, AUTH_FAILED_CODE, f"Incorrect IAM authentication information: {reason}"
            )
        elif (state.read_only and request.method != "GET") or (state.write_only and request.method == "GET"):
            kind = None
            reply = _gateway_error(
                403, NOT_AUTHORIZED_CODE, "The IAM user is not authorized to access the API"
            )
        elif kind is FaultKind.THROTTLE:
            reply = _gateway_error(
                429,
                THROTTLED_CODE,
                "The throttling threshold has been reached",
                {"Retry-After": _seconds(state.faults.retry_after_s)},
            )
        elif kind is FaultKind.ERROR:
            status = decision.status or 500
            reply = _gom_error(FAULT_CODES[status], "internal server error (injected fault)", status)
        else:
            reply = handler(request, body, event_id)
            if kind is FaultKind.DROP_AFTER_APPLY:
                return self._drop(request, event_id, kind, reply.payload.get("error_code"))
            if kind is FaultKind.TIMEOUT_AFTER_APPLY:  # the backend finished; the gateway gave up
                reply = _gateway_error(504, BACKEND_TIMEOUT_CODE, "Backend timeout")
        state.record_request(
            request.method, request.path, reply.status, reply.payload.get("error_code"), event_id, kind
        )
        # pydantic_core's encoder: the json module's was ~4% of the simulator's CPU per request
        return web.Response(
            body=to_json(reply.payload),
            status=reply.status,
            headers=reply.headers,
            content_type="application/json",
        )

    def _drop(
        self, request: web.Request, event_id: str | None, kind: FaultKind, error_code: str | None = None
    ) -> web.StreamResponse:
        """Close the connection unanswered; aiohttp then fails to write the response and moves on."""
        self.state.record_request(request.method, request.path, None, error_code, event_id, kind)
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response()

    def _authenticate(self, request: web.Request, body: bytes) -> str | None:
        """Why the gateway refuses this request, or None. Reasons never carry a key or a secret."""
        state = self.state
        headers = request.headers
        if "Authorization" in headers:
            if state.revoked:
                return "the access key has been revoked"
            return verify(
                secret_for=state.credentials,
                method=request.method,
                path=request.rel_url.raw_path,
                query=list(request.rel_url.query.items()),
                headers=headers,
                body=body,
                now=datetime.now(UTC),
            )
        token = headers.get("X-Auth-Token")
        if token is not None:
            if state.revoked:
                return "the token has been revoked"
            return None if token in state.tokens else "invalid token"
        return "missing Authorization header or X-Auth-Token"

    def _update(self, request: web.Request, body: bytes, event_id: str | None) -> _Reply:
        ticket_type = request.match_info["ticket_type"]
        ticket_id = request.match_info["ticket_id"]
        if ticket_type != SUPPORTED_TICKET_TYPE:
            return _unsupported(ticket_type)
        try:
            raw = json.loads(body)
        except ValueError as exc:
            return _gom_error(BAD_BODY, f"the body is not JSON: {exc}")
        if not isinstance(raw, dict):
            return _gom_error(BAD_BODY, "the body must be a JSON object")
        try:
            # Strict, as the reference types the fields: "yes" or 1 is not a Boolean, "123" or 1.0
            # not a Long. Lax validation would let a type bug in the worker's mapping pass here.
            parsed = UpdateTicketBody.model_validate_json(body, strict=True)
        except ValidationError as exc:
            return _gom_error(BAD_BODY, _describe(exc))
        try:
            changes = self.state.book.apply(ticket_id, parsed, now_ms=now_ms())
        except Refused as exc:
            return _gom_error(exc.code, exc.message, exc.http_status)
        self.state.record_applied(ticket_id, changes, raw, event_id, request.headers.get(TRACEPARENT_HEADER))
        # Shaped as the reference's example answer (``data.ticket_info``), which differs from its
        # Table 7 (the same fields directly in ``data``); the worker reads only ``error_code``.
        return _ok(
            {
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
            }
        )

    def _ticket(self, request: web.Request) -> Ticket | _Reply:
        """The ticket the read endpoints name, or the error reply the API gives instead."""
        ticket_type = request.match_info["ticket_type"]
        if ticket_type != SUPPORTED_TICKET_TYPE:
            return _unsupported(ticket_type)
        try:
            return self.state.book.get(request.match_info["ticket_id"], now_ms=now_ms())
        except Refused as exc:
            return _gom_error(exc.code, exc.message, exc.http_status)

    def _show(self, request: web.Request, body: bytes, event_id: str | None) -> _Reply:
        ticket = self._ticket(request)
        if not isinstance(ticket, Ticket):
            return ticket
        return _ok(ticket.snapshot(sdk_only=self.state.detail_as_sdk))

    def _list_sub_tickets(self, request: web.Request, body: bytes, event_id: str | None) -> _Reply:
        """``data`` is ``{"total", "sub_tickets"}``, paged by ``limit`` and ``marker`` (last id seen)."""
        ticket = self._ticket(request)
        if not isinstance(ticket, Ticket):
            return ticket
        subs = list(ticket.sub_tickets.values())
        marker = request.query.get("marker")
        if marker:
            ids = [sub.ticket_id for sub in subs]
            subs = subs[ids.index(marker) + 1 :] if marker in ids else []
        limit_text = request.query.get("limit")
        if limit_text is not None:
            try:
                limit = int(limit_text)
            except ValueError:
                return _gom_error(BAD_BODY, f"limit must be an integer, not {limit_text!r}")
            subs = subs[: max(limit, 0)]
        return _ok(
            {
                "total": len(ticket.sub_tickets),
                "sub_tickets": [sub.snapshot(sdk_only=self.state.detail_as_sdk) for sub in subs],
            }
        )


def _unsupported(ticket_type: str) -> _Reply:
    return _gom_error(
        UNSUPPORTED_TICKET_TYPE,
        f"ticket_type {ticket_type!r} is not supported; only {SUPPORTED_TICKET_TYPE!r}",
    )


def _admin_error(status: int, message: str) -> web.HTTPException:
    cls = web.HTTPNotFound if status == 404 else web.HTTPBadRequest
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as exc:
        raise _admin_error(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _admin_error(400, "the body must be a JSON object")
    return data


def _int_query(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise _admin_error(400, f"{name} must be an integer") from None


class _Admin:
    """The unauthenticated, fault-free ``/_sim`` routes (documented in the package docstring)."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state

    async def seed(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        try:
            count = self.state.seed(data)
        except ValidationError as exc:
            raise _admin_error(400, _describe(exc)) from exc
        return web.json_response({"seeded": count})

    async def ticket(self, request: web.Request) -> web.Response:
        ticket = self.state.tickets.get(request.match_info["ticket_id"])
        if ticket is None:
            raise _admin_error(404, f"ticket {request.match_info['ticket_id']} not found")
        return web.json_response(ticket.snapshot())

    async def log(self, request: web.Request) -> web.Response:
        event_id = request.query.get("event_id")
        since = _int_query(request, "since") or 0
        entries = self.state.applied_for(event_id) if event_id is not None else self.state.applied_log
        return web.json_response({"applied": [entry for entry in entries if entry["seq"] > since]})

    async def requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.state.request_dicts(_int_query(request, "limit"))})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.stats())

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.faults.model_dump(mode="json"))

    async def put_faults(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        try:
            faults = self.state.set_faults(**data)
        except ValidationError as exc:
            raise _admin_error(400, _describe(exc)) from exc
        return web.json_response(faults.model_dump(mode="json"))

    async def credentials(self, request: web.Request) -> web.Response:
        """``{"revoked": bool}``, ``{"credentials": {ak: sk}}``, ``{"tokens": [...]}``, or a bare ``{ak: sk}``."""
        data = await _json_object(request)
        revoked = data.pop("revoked", None)
        credentials = data.pop("credentials", None)
        tokens = data.pop("tokens", None)
        if data:
            if credentials is not None:
                raise _admin_error(400, "unknown keys next to 'credentials'")
            credentials = data
        if revoked is not None and not isinstance(revoked, bool):
            raise _admin_error(400, "revoked must be true or false")
        if credentials is not None and not (
            isinstance(credentials, dict) and all(isinstance(v, str) for v in credentials.values())
        ):
            raise _admin_error(400, "credentials must map access keys to secret keys (strings)")
        if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise _admin_error(400, "tokens must be a list of strings")
        self.state.set_credentials(credentials, tokens)
        if revoked is not None:
            self.state.revoke(revoked)
        return web.json_response(
            {
                "revoked": self.state.revoked,
                "access_keys": len(self.state.credentials),
                "tokens": len(self.state.tokens),
            }
        )

    async def reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        return web.json_response({"reset": True})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def build_app(state: SimulatorState, config: SimulatorConfig) -> web.Application:
    """The aiohttp application serving ``state``; ``app[STATE_KEY]`` gives the state back."""
    app = web.Application(client_max_size=config.max_body_bytes)
    app[STATE_KEY] = state
    api = _Api(state)
    admin = _Admin(state)
    router = app.router
    router.add_put("/v1/{ticket_type}/tickets/{ticket_id}", api.update_ticket)
    router.add_get("/v1/{ticket_type}/tickets/{ticket_id}", api.show_ticket)
    router.add_get("/v1/{ticket_type}/tickets/{ticket_id}/list-sub-tickets", api.list_sub_tickets)
    router.add_post("/_sim/tickets", admin.seed)
    router.add_get("/_sim/tickets/{ticket_id}", admin.ticket)
    router.add_get("/_sim/log", admin.log)
    router.add_get("/_sim/requests", admin.requests)
    router.add_get("/_sim/stats", admin.stats)
    router.add_get("/_sim/faults", admin.get_faults)
    router.add_put("/_sim/faults", admin.put_faults)
    router.add_put("/_sim/credentials", admin.credentials)
    router.add_post("/_sim/reset", admin.reset)
    router.add_get("/_sim/health", admin.health)
    return app
