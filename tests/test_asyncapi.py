"""The AsyncAPI 3.0 document: valid for an AsyncAPI 3 validator (the ``asyncapi3`` object model),
its references resolve, its payloads are the contract's JSON Schemas, its examples validate, and it
names exactly the headers the worker and the tools write."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, Draft202012Validator
from pydantic import ValidationError
from referencing import Registry, Resource

from schemas.asyncapi import (
    ASYNCAPI_FILE,
    DLQ_HEADERS,
    DLQ_OPTIONAL_HEADERS,
    REPLAY_HEADERS,
    asyncapi_document,
    render_yaml,
)
from schemas.export import JSON_DIR, contract_schemas
from worker.cli import main
from worker.consumer import Message
from worker.publisher import DeadLetter, dead_letter_headers
from worker.tools.dlq import DeadLetterRecord, replay_headers

with warnings.catch_warnings():  # the library's own models shadow BaseModel.schema: not ours to fix
    warnings.simplefilter("ignore", UserWarning)
    from asyncapi3.models.asyncapi import AsyncAPI3


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``coc-worker schema --out DIR``, run once."""
    out = tmp_path_factory.mktemp("schemas")
    assert main(["schema", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def document(written: Path) -> dict[str, Any]:
    return yaml.safe_load((written / ASYNCAPI_FILE).read_text(encoding="utf-8"))


def test_schema_command_writes_the_json_schemas_and_the_asyncapi_document(written: Path) -> None:
    assert sorted(p.name for p in written.iterdir()) == sorted([*contract_schemas(), ASYNCAPI_FILE])
    for name in contract_schemas():
        Draft202012Validator.check_schema(json.loads((written / name).read_text(encoding="utf-8")))


def test_the_committed_document_matches_the_models() -> None:
    path = JSON_DIR / ASYNCAPI_FILE
    assert path.read_text(encoding="utf-8") == render_yaml(asyncapi_document()), (
        f"{path} drifted from the models: run `make schemas` and commit the result"
    )


def test_yaml_is_exactly_the_document(document: dict[str, Any]) -> None:
    assert document == asyncapi_document()
    tricky = {"on": "no", "x": ["", {"a": []}, [1, [True, None]]], "k: v": 'line\nbreak "q" \u00e9', "n": 1.5}
    assert yaml.safe_load(render_yaml(tricky)) == tricky


def test_an_asyncapi_3_validator_accepts_it(document: dict[str, Any]) -> None:
    parsed = AsyncAPI3.model_validate(document)
    assert parsed.asyncapi == "3.0.0"
    assert set(parsed.channels or {}) == {"changeEvents", "outcomes", "deadLetters"}
    assert {name: op.action for name, op in (parsed.operations or {}).root.items()} == {
        "receiveChangeEvents": "receive",
        "sendOutcomes": "send",
        "sendDeadLetters": "send",
    }


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("operations", "sendOutcomes", "action"), "publish"),  # an AsyncAPI 2 verb
        (("info", "unknown"), 1),  # only x- extensions may be added
        (("channels", "outcomes", "bindings", "kafka", "partitions"), "many"),
        (("components", "messages", "ChangeEvent", "payload"), 5),
    ],
)
def test_the_validator_rejects_a_broken_document(
    document: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    broken = copy.deepcopy(document)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValidationError):
        AsyncAPI3.model_validate(broken)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _pointer(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves(document: dict[str, Any], written: Path) -> None:
    refs = set(_refs(document))
    local = {r for r in refs if r.startswith("#/")}
    files = refs - local
    assert files == {"change-event.v1.schema.json", "outcome-event.v1.schema.json"}
    for ref in local:
        _pointer(document, ref)
    for name in files:
        assert (written / name).is_file()
    # AsyncAPI 3: an operation's messages must be messages of its channel
    for operation in document["operations"].values():
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/")


def _registry(written: Path) -> Registry:
    resources = [
        (name, Resource.from_contents(json.loads((written / name).read_text(encoding="utf-8"))))
        for name in contract_schemas()
    ]
    return Registry().with_resources(resources)


def test_message_examples_validate(document: dict[str, Any], written: Path) -> None:
    """Examples against the payload JSON Schemas, the header schemas and the Kafka key schemas."""
    registry = _registry(written)
    for name, message in document["components"]["messages"].items():
        payload = message["payload"]
        assert payload["schemaFormat"] == "application/schema+json;version=2020-12"
        payload_validator = Draft202012Validator(payload["schema"], registry=registry)
        Draft7Validator.check_schema(message["headers"])
        headers_validator = Draft7Validator(message["headers"])
        key_schema = message["bindings"]["kafka"]["key"]
        Draft7Validator.check_schema(key_schema)
        assert message["examples"], name
        for example in message["examples"]:
            assert not list(payload_validator.iter_errors(example["payload"])), name
            assert not list(headers_validator.iter_errors(example["headers"])), name
            key = example["payload"]["ticket_id"]
            assert Draft7Validator(key_schema).is_valid(key), name


def test_dead_letter_headers_are_the_documented_ones(document: dict[str, Any]) -> None:
    letter = DeadLetter(
        b"CM1",
        b"{}",
        [("origin", b"x")],
        "rejected",
        "api_rejected",
        "no",
        "in",
        0,
        1,
        "e1",
        http_status=400,
        error_code="GOM.00001005",
    )
    headers = dead_letter_headers(letter, "w", "00-" + "a" * 32 + "-" + "b" * 16 + "-01", datetime.now(UTC))
    written_names = {k for k, _ in headers if k.startswith("coc-dlq-")}
    assert set(DLQ_HEADERS) <= written_names <= set(DLQ_HEADERS) | set(DLQ_OPTIONAL_HEADERS)
    schema = document["components"]["messages"]["DeadLetter"]["headers"]
    assert Draft7Validator(schema).is_valid({k: v.decode() for k, v in headers})


def test_replay_headers_are_the_documented_ones(document: dict[str, Any]) -> None:
    message = Message(
        "dlq", 2, 9, b"CM1", b"{}", [("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")], 0
    )
    record = DeadLetterRecord.from_message(message, 1024)
    headers = replay_headers(record, datetime.now(UTC))
    assert {k for k, _ in headers} - {"traceparent"} == set(REPLAY_HEADERS)
    schema = document["components"]["messages"]["ChangeEvent"]["headers"]
    assert Draft7Validator(schema).is_valid({k: v.decode() for k, v in headers})


def test_a_tombstones_dead_letter_says_so_in_a_documented_header() -> None:
    tombstone = DeadLetter(None, None, [], "invalid", "empty", "no value", "in", 0, 1, None)
    headers = dict(
        dead_letter_headers(tombstone, "w", "00-" + "a" * 32 + "-" + "b" * 16 + "-01", datetime.now(UTC))
    )
    assert headers["coc-dlq-tombstone"] == b"true"
    assert "coc-dlq-tombstone" in DLQ_OPTIONAL_HEADERS
    letter = DeadLetter(b"CM1", b"", [], "invalid", "empty", "no", "in", 0, 1, None)  # empty, not absent
    assert "coc-dlq-tombstone" not in dict(
        dead_letter_headers(letter, "w", "00-" + "a" * 32 + "-" + "b" * 16 + "-01", datetime.now(UTC))
    )


def test_the_applied_example_is_what_the_pipeline_emits() -> None:
    """The example said error_code "GOM.00000000" and request null; an applied outcome carries no
    error_code and the body sent. A consumer coding against the example would have read every
    applied outcome as something else."""
    from schemas.asyncapi import _EXAMPLE_EVENT, _EXAMPLE_OUTCOME
    from schemas.events import CHANGE_EVENT_ADAPTER
    from worker.mapping import request_wire

    event = CHANGE_EVENT_ADAPTER.validate_python({**_EXAMPLE_EVENT})
    assert _EXAMPLE_OUTCOME["status"] == "applied"
    assert _EXAMPLE_OUTCOME["error_code"] is None
    assert _EXAMPLE_OUTCOME["request"] == request_wire(event)


def test_the_dead_letter_example_is_what_a_refusal_of_its_event_writes() -> None:
    """The example's ``coc-dlq-error`` is the API's ``error_msg`` alone, as the worker writes it:
    here the simulator's refusal of the example event's action on a pending sub-ticket. (It once
    showed a code prefix and another action: a consumer parsing it would have broken.)"""
    from schemas.api import ChangeResult, HistoryAction
    from schemas.asyncapi import _EXAMPLE_EVENT, asyncapi_document
    from schemas.events import CHANGE_EVENT_ADAPTER
    from worker.mapping import request_wire
    from worker.simulator.tickets import Refused, SubState, transition

    body = request_wire(CHANGE_EVENT_ADAPTER.validate_python({**_EXAMPLE_EVENT}))
    [sub] = body["sub_tickets"]
    action = HistoryAction(body["history_info"]["action"])
    with pytest.raises(Refused) as refused:
        transition(sub["ticket_id"], SubState.PENDING, action, ChangeResult(sub["change_result"]))
    [example] = asyncapi_document()["components"]["messages"]["DeadLetter"]["examples"]
    assert example["payload"] == _EXAMPLE_EVENT
    assert example["headers"]["coc-dlq-error"] == refused.value.message
