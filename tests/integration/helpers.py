"""Building events and reading topics in integration tests."""

from __future__ import annotations

import itertools
import json
from typing import Any

from worker.sandbox import Record, produce, read_topic

_ids = itertools.count(1)


def event(
    kind: str, ticket: str, sub: str | None = "sub-1", *, event_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"event_id": event_id or f"ev-{next(_ids)}", "type": kind, "ticket_id": ticket}
    if sub is not None and kind.startswith("change."):
        body["sub_ticket_id"] = sub
    body.update(fields)
    return body


async def send(
    bootstrap: str,
    topic: str,
    items: list[dict[str, Any] | bytes],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """Produce events keyed by ticket (raw bytes are sent unkeyed), in order."""
    records = []
    for item in items:
        if isinstance(item, bytes):
            records.append((None, item, headers))
        else:
            records.append(
                (str(item.get("ticket_id", "")).encode() or None, json.dumps(item).encode(), headers)
            )
    await produce(bootstrap, topic, records)


async def read_json(bootstrap: str, topic: str, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    records = await read_topic(bootstrap, topic, until=lambda r: len(r) >= count, timeout_s=timeout_s)
    return [json.loads(r.value or b"null") for r in records]


async def read_records(bootstrap: str, topic: str, count: int, timeout_s: float = 30) -> list[Record]:
    return await read_topic(bootstrap, topic, until=lambda r: len(r) >= count, timeout_s=timeout_s)
