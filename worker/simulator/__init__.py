"""A stateful simulator of the COC change-ticket API, for the demo, the integration tests and the benchmark.

It serves, like the cloud API behind its gateway (AK/SK ``SDK-HMAC-SHA256`` or ``X-Auth-Token``;
failures are 401 ``APIGW.0301``; with read-only credentials a write is 403 ``APIGW.0302``)::

    PUT /v1/{ticket_type}/tickets/{ticket_id}                     start / end / result / cancel / phase
    GET /v1/{ticket_type}/tickets/{ticket_id}                     ticket detail (SDK ``ShowTicketInfo``)
    GET /v1/{ticket_type}/tickets/{ticket_id}/list-sub-tickets    ``{"total", "sub_tickets"}``, limit/marker

``ticket_type`` must be ``change``. The state machine and the simulator's GOM error codes are in
``worker.simulator.tickets``; the fault kinds in ``worker.simulator.faults``. Every request that
changed state is in the applied log with its ``X-Event-Id`` and ``traceparent`` headers.

Admin endpoints (no auth, never faulted), all JSON::

    POST /_sim/tickets           seed tickets: {"tickets": [{"ticket_id", "phase", "sub_tickets"}]}
    GET  /_sim/tickets/{id}      one ticket with its sub-tickets' state and result fields
    GET  /_sim/log               applied log: {"applied": [...]}; ?event_id=...  ?since=<seq>
    GET  /_sim/requests          request log (last ``request_log_size``): {"requests": [...]}; ?limit=N
    GET  /_sim/stats             {"requests_total", "by_status", "faults", "applied", "tickets"}
    GET  /_sim/faults            the fault config in force
    PUT  /_sim/faults            partial update of the fault config, e.g. {"error_ratio": 0.1}
    PUT  /_sim/credentials       {"revoked": true|false}, {"credentials": {ak: sk}}, {"tokens": [...]},
                                 or a bare {ak: sk}; answers counts only, never secrets
    POST /_sim/reset             back to the configured start (seed, faults, credentials, random seed)
    GET  /_sim/health            {"status": "ok"}
"""

from worker.simulator.app import STATE_KEY, build_app
from worker.simulator.faults import FaultConfig, FaultKind
from worker.simulator.server import SimulatorServer, run_simulator
from worker.simulator.state import SimulatorConfig, SimulatorState
from worker.simulator.tickets import SubState, load_seed_file

__all__ = [
    "STATE_KEY",
    "FaultConfig",
    "FaultKind",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "SubState",
    "build_app",
    "load_seed_file",
    "run_simulator",
]
