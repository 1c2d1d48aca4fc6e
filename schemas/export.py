"""JSON Schema export of the contract: the files in ``schemas/json/`` are generated from the models.

A test regenerates them and fails when the committed files drift from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.events import CHANGE_EVENT_ADAPTER
from schemas.outcomes import OutcomeEvent

JSON_DIR = Path(__file__).parent / "json"
_BASE_URI = "https://coc-change-worker.dev/schemas/"


def _document(schema: dict[str, Any], name: str, title: str, description: str) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": _BASE_URI + name,
        "title": title,
        "description": description,
        **schema,
    }


def contract_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema document, for every public message of the worker."""
    return {
        "change-event.v1.schema.json": _document(
            CHANGE_EVENT_ADAPTER.json_schema(mode="validation"),
            "change-event.v1.schema.json",
            "ChangeEvent",
            "Inbound change event (schema version 1) on the input topic, keyed by ticket_id.",
        ),
        "outcome-event.v1.schema.json": _document(
            TypeAdapter(OutcomeEvent).json_schema(mode="serialization"),
            "outcome-event.v1.schema.json",
            "OutcomeEvent",
            "One outcome per consumed message, on the results topic, keyed by ticket_id.",
        ),
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_all(out_dir: Path = JSON_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in contract_schemas().items():
        path = out_dir / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
