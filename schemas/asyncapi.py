"""The AsyncAPI 3.0 document of the worker's three topics, built from the contract.

It describes what the worker receives (change events on the input topic) and sends (outcomes on
the results topic, dead-letter records on the DLQ topic): Kafka keys, headers (``traceparent``,
``coc-status``, ``coc-dlq-*``, ``coc-replayed-from-*``) and payloads. Payloads are not copied:
they reference the JSON Schema files written next to this document (``schemas.export``), which
are generated from the pydantic models, so the three documents cannot disagree.

Written as YAML (``asyncapi.yaml``, AsyncAPI's usual form) by a small emitter that quotes every
string as JSON does, so no YAML library is needed at run time and no value is ever misread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.events import SCHEMA_VERSION, TICKET_ID_PATTERN
from schemas.export import JSON_DIR
from schemas.outcomes import DEAD_LETTER_STATUSES, REDACTED, OutcomeStatus

ASYNCAPI_FILE = "asyncapi.yaml"
EVENT_SCHEMA_FILE = "change-event.v1.schema.json"
OUTCOME_SCHEMA_FILE = "outcome-event.v1.schema.json"
#: The exported files are JSON Schema 2020-12 (AsyncAPI allows custom schema formats).
JSON_SCHEMA_FORMAT = "application/schema+json;version=2020-12"
KAFKA_BINDING_VERSION = "0.5.0"

DEFAULT_TOPICS = {
    "input": "coc.change-events",
    "results": "coc.change-outcomes",
    "dlq": "coc.change-events.dlq",
}
TRACEPARENT_PATTERN = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

#: ``coc-dlq-*`` headers of every dead-letter record (worker.publisher writes them).
DLQ_HEADERS: dict[str, str] = {
    "coc-dlq-status": "Outcome status that sent the message here: rejected, failed or invalid.",
    "coc-dlq-reason": "Machine-readable cause, e.g. api_rejected, retries_exhausted, schema, bad_json.",
    "coc-dlq-error": "Human-readable detail (at most 1000 characters, secrets redacted).",
    "coc-dlq-source-topic": "Topic the input message was read from.",
    "coc-dlq-source-partition": "Its partition (decimal).",
    "coc-dlq-source-offset": "Its offset (decimal).",
    "coc-dlq-at": "When it was dead-lettered (RFC 3339, UTC, as the outcomes' times: ...Z).",
    "coc-dlq-worker": "Id of the worker process.",
}
DLQ_OPTIONAL_HEADERS: dict[str, str] = {
    "coc-dlq-event-id": "The input's event_id, when it could be read.",
    "coc-dlq-http-status": "The API's HTTP status (decimal), when the worker got an answer (a rejected "
    "event's 400, a failed one's last 5xx).",
    "coc-dlq-error-code": "The API's error_code, when its answer carried one (secrets redacted), as the API "
    "sent it. The COC reference gives only its range (GOM.00000000~GOM.00009999999) and refers to its Error "
    "Codes page, no code per cause: the codes this project's simulator answers with (GOM.00001005, a step "
    "its state machine does not allow; GOM.00001003, no such ticket) are its own, and a consumer of the "
    "real API must not rely on them.",
    "coc-dlq-value-truncated-from": "Set when the value was cut to fit the broker's limit: its full size in bytes.",
    "coc-dlq-headers-dropped": "Set when the input's own headers were left out to fit the broker's limit: how many.",
    "coc-dlq-key-dropped": "Set (true) when even the key had to be left out to fit the broker's limit.",
    "coc-dlq-tombstone": "Set (true) when the input had no value: the record carries an empty one.",
    "coc-dlq-redelivered": "Set (true) on the dead letter of a redelivered message: the first may exist too.",
}
#: Headers ``coc-worker dlq replay`` adds to a replayed message (worker.tools.dlq writes them).
REPLAY_HEADERS: dict[str, str] = {
    "coc-replayed-from-topic": "Dead-letter topic the message was replayed from.",
    "coc-replayed-from-partition": "Partition of the dead-letter record (decimal).",
    "coc-replayed-from-offset": "Offset of the dead-letter record (decimal).",
    "coc-replayed-at": "When it was replayed (RFC 3339, UTC, as the outcomes' times: ...Z).",
}

_TRACEPARENT = {
    "type": "string",
    "pattern": TRACEPARENT_PATTERN,
    "description": "W3C trace context. Carried from the input to the API call, the outcome and the DLQ record.",
}
_EXAMPLE_EVENT: dict[str, Any] = {
    "event_id": "am-fp-8c1d2e",
    "type": "change.failed",
    "ticket_id": "CM202511280003",
    "sub_ticket_id": "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
    "source": "alertmanager",
    "result": {
        "comment": "HighErrorRate firing",
        "change_fail_type": "fr_dependent_service_issue",
        "is_monitor_found": True,
    },
}
_EXAMPLE_OUTCOME: dict[str, Any] = {
    "schema_version": 1,
    "event_id": "am-fp-8c1d2e",
    "ticket_id": "CM202511280003",
    "sub_ticket_id": "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
    "type": "change.failed",
    "status": "applied",
    "reason": None,
    "attempts": 1,
    "http_status": 200,
    "error_code": None,  # the API's own code is kept for rejected and failed events only
    "error_msg": None,
    "request": {  # the body sent for _EXAMPLE_EVENT (worker.mapping.request_wire)
        "sub_tickets": [
            {
                "ticket_id": "e72f9b49-2294-4c58-bc57-4a0c6903c5e1",
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
    },
    "source": {"topic": "coc.change-events", "partition": 3, "offset": 42},
    "received_at": "2025-11-28T03:00:00.100000Z",
    "finished_at": "2025-11-28T03:00:00.160000Z",
    "duration_ms": 60.0,
    "worker": "coc-worker-7d9f-1",
    "redelivered": False,
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
}
_EXAMPLE_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _headers(required: dict[str, str], optional: dict[str, str], *, open_ended: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {"traceparent": _TRACEPARENT}
    properties.update({name: {"type": "string", "description": text} for name, text in required.items()})
    properties.update({name: {"type": "string", "description": text} for name, text in optional.items()})
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema["additionalProperties"] = (
        {
            "type": "string",
            "description": "Other headers of the producer, kept as they were (but its own coc-dlq-* "
            "and traceparent headers: the dead letter's replace them).",
        }
        if open_ended
        else False
    )
    return schema


def _payload(reference: dict[str, Any]) -> dict[str, Any]:
    return {"schemaFormat": JSON_SCHEMA_FORMAT, "schema": reference}


def _kafka_key(schema: dict[str, Any]) -> dict[str, Any]:
    return {"kafka": {"key": schema, "bindingVersion": KAFKA_BINDING_VERSION}}


def _messages() -> dict[str, Any]:
    ticket_key = {
        "type": "string",
        "pattern": TICKET_ID_PATTERN,
        "description": "The event's ticket_id: all events of one ticket share a partition, so they stay in order.",
    }
    statuses = [s.value for s in OutcomeStatus]
    dead = sorted(s.value for s in DEAD_LETTER_STATUSES)
    return {
        "ChangeEvent": {
            "name": "ChangeEvent",
            "title": f"Change event (schema version {SCHEMA_VERSION})",
            "summary": "A deploy or monitoring system reports a step of a change.",
            "contentType": "application/json",
            "headers": _headers({}, REPLAY_HEADERS, open_ended=True),
            "payload": _payload({"$ref": EVENT_SCHEMA_FILE}),
            "bindings": _kafka_key(ticket_key),
            "examples": [
                {
                    "name": "monitoringFailure",
                    "summary": "A monitoring system reports a failed change.",
                    "headers": {"traceparent": _EXAMPLE_TRACEPARENT},
                    "payload": _EXAMPLE_EVENT,
                }
            ],
        },
        "OutcomeEvent": {
            "name": "OutcomeEvent",
            "title": "Outcome event",
            "summary": "What happened to one consumed message: exactly one per input message.",
            "description": (
                "Identified by its source (topic, partition, offset). After a crash the same input "
                "may be read again and its outcome published again with redelivered=true."
            ),
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    "traceparent": _TRACEPARENT,
                    "coc-status": {
                        "type": "string",
                        "enum": statuses,
                        "description": "The outcome's status.",
                    },
                },
                "required": ["traceparent", "coc-status"],
                "additionalProperties": False,
            },
            "payload": _payload({"$ref": OUTCOME_SCHEMA_FILE}),
            "bindings": _kafka_key(
                {
                    **ticket_key,
                    "type": ["string", "null"],
                    # The outcome's own ticket_id, scrubbed there too: one that holds a secret
                    # (a producer's mistake) keyed the record with a value this pattern refused.
                    "pattern": f"^({TICKET_ID_PATTERN[1:-1]}|{re.escape(REDACTED)})$",
                    "description": "The ticket_id; for an invalid input whose value names none that "
                    f"could be read, its key when that is a ticket id; else null. {REDACTED} when the "
                    "ticket_id holds a secret (a producer's mistake), as in the outcome.",
                }
            ),
            "examples": [
                {
                    "name": "applied",
                    "headers": {"traceparent": _EXAMPLE_TRACEPARENT, "coc-status": "applied"},
                    "payload": _EXAMPLE_OUTCOME,
                }
            ],
        },
        "DeadLetter": {
            "name": "DeadLetter",
            "title": "Dead-letter record",
            "summary": f"An input message whose outcome was {', '.join(dead)}: unchanged, plus why.",
            "description": (
                "Key, value bytes and headers of the input message as they were (the value may be "
                "empty or not JSON when the status is invalid, whatever contentType says), plus the "
                "coc-dlq-* headers and a traceparent. "
                "`coc-worker dlq replay` sends such records back to the input topic."
            ),
            "contentType": "application/json",
            "headers": _headers(DLQ_HEADERS, DLQ_OPTIONAL_HEADERS, open_ended=True),
            "payload": _payload(
                {
                    "description": "The input message's value, byte for byte.",
                    "anyOf": [
                        {"$ref": EVENT_SCHEMA_FILE},
                        {"description": "With status invalid: any value, as it was consumed."},
                    ],
                }
            ),
            "bindings": _kafka_key(
                {
                    "type": ["string", "null"],
                    "description": "The input message's key, unchanged; null for an unreadable record "
                    "and when the key was dropped to fit the broker's size limit (coc-dlq-key-dropped).",
                }
            ),
            "examples": [
                {
                    "name": "rejected",
                    "summary": "The example event refused by this project's simulator: its own error "
                    "code and message, not the real API's.",
                    "headers": {
                        "traceparent": _EXAMPLE_TRACEPARENT,
                        "coc-dlq-status": "rejected",
                        "coc-dlq-reason": "api_rejected",
                        "coc-dlq-error": "sub-ticket e72f9b49-2294-4c58-bc57-4a0c6903c5e1 is pending; change_set_change_result_success with change_result_failed needs implementing or ended",
                        "coc-dlq-source-topic": "coc.change-events",
                        "coc-dlq-source-partition": "3",
                        "coc-dlq-source-offset": "41",
                        "coc-dlq-at": "2025-11-28T03:00:00.160000Z",
                        "coc-dlq-worker": "coc-worker-7d9f-1",
                        "coc-dlq-event-id": "am-fp-8c1d2e",
                        "coc-dlq-http-status": "400",
                        "coc-dlq-error-code": "GOM.00001005",
                    },
                    "payload": _EXAMPLE_EVENT,
                }
            ],
        },
    }


def asyncapi_document(topics: dict[str, str] | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document, from the worker's point of view (it receives and sends)."""
    names = {**DEFAULT_TOPICS, **(topics or {})}
    channel_of = {"input": "changeEvents", "results": "outcomes", "dlq": "deadLetters"}
    message_of = {"input": "ChangeEvent", "results": "OutcomeEvent", "dlq": "DeadLetter"}
    setting_of = {"input": "INPUT_TOPIC", "results": "RESULTS_TOPIC", "dlq": "DLQ_TOPIC"}
    descriptions = {
        "input": "Change events from deploy and monitoring systems, keyed by ticket_id.",
        "results": "One outcome per consumed input message, keyed by ticket_id when known.",
        "dlq": "Input messages that ended rejected, failed or invalid, with the reason in headers.",
    }
    channels = {
        channel_of[kind]: {
            "address": names[kind],
            "title": names[kind],
            "description": f"{descriptions[kind]} Topic name: COC_WORKER_{setting_of[kind]}.",
            "messages": {message_of[kind]: {"$ref": f"#/components/messages/{message_of[kind]}"}},
            "bindings": {"kafka": {"topic": names[kind], "bindingVersion": KAFKA_BINDING_VERSION}},
        }
        for kind in ("input", "results", "dlq")
    }

    def operation(kind: str, action: str, summary: str) -> dict[str, Any]:
        channel = channel_of[kind]
        found: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message_of[kind]}"}],
        }
        if action == "receive":
            found["bindings"] = {
                "kafka": {
                    "groupId": {
                        "type": "string",
                        "description": "COC_WORKER_GROUP_ID",
                        "default": "coc-change-worker",
                    },
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            }
        return found

    return {
        "asyncapi": "3.0.0",
        "id": "urn:coc-change-worker",
        "info": {
            "title": "coc-change-worker",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                "Applies change events to the COC change-ticket API and publishes one outcome per "
                "input message; undeliverable or invalid input also goes to a dead-letter topic. "
                "Payload schemas are the JSON Schema files next to this document."
            ),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": "{bootstrap}",
                "protocol": "kafka",
                "description": "The Kafka cluster (COC_WORKER_KAFKA_BOOTSTRAP_SERVERS; TLS/SASL by COC_WORKER_KAFKA_SECURITY_PROTOCOL).",
                "variables": {
                    "bootstrap": {"default": "127.0.0.1:9092", "description": "host:port of a broker"}
                },
            }
        },
        "channels": channels,
        "operations": {
            "receiveChangeEvents": operation("input", "receive", "Consume change events and apply them."),
            "sendOutcomes": operation("results", "send", "Publish the outcome of every consumed message."),
            "sendDeadLetters": operation("dlq", "send", "Dead-letter rejected, failed and invalid messages."),
        },
        "components": {"messages": _messages()},
    }


# --- YAML ---------------------------------------------------------------------------------------------
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "null", "on", "off"})


def _key(key: str) -> str:
    if _PLAIN_KEY.match(key) and key.lower() not in _YAML_WORDS:
        return key
    return json.dumps(key, ensure_ascii=False)


def _scalar(value: Any) -> str:
    if isinstance(value, dict | list):  # only empty ones get here
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(value, ensure_ascii=False)  # null, true, numbers, "double-quoted" strings


def _lines(value: Any, indent: int) -> Iterator[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                yield f"{pad}{_key(key)}:"
                yield from _lines(item, indent + 1)
            else:
                yield f"{pad}{_key(key)}: {_scalar(item)}"
        return
    for item in value:
        if isinstance(item, dict | list) and item:
            nested = list(_lines(item, indent + 1))
            yield f"{pad}- {nested[0][len(pad) + 2 :]}"
            yield from nested[1:]
        else:
            yield f"{pad}- {_scalar(item)}"


def render_yaml(document: dict[str, Any]) -> str:
    """Block-style YAML; every string double-quoted with JSON escapes (valid YAML 1.2 and 1.1)."""
    return "\n".join(_lines(document, 0)) + "\n"


def write(out_dir: Path = JSON_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ASYNCAPI_FILE
    path.write_text(render_yaml(asyncapi_document()), encoding="utf-8")
    return path
