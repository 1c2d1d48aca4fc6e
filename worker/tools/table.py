"""Cells of the tools' live tables (``outcomes tail``, ``dlq list``): rows are printed as records
arrive, so columns have fixed widths, and a value longer than its column is cut with a mark."""

from __future__ import annotations

import re

#: The last column takes the rest of the line, up to this many characters.
LAST_COLUMN_MAX = 200
#: Control characters (C0 but whitespace, DEL, C1): an ESC in an API's error text or a dead
#: letter's header would otherwise drive the operator's terminal (colours, cursor moves, a title).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def cell(value: str, width: int, *, cut: bool = True) -> str:
    """``value`` on one line, cut to ``width`` with "…" when longer; 0: the last column.
    ``cut=False`` for an identifier an operator copies (an event id, a position): it pushes the
    rest of its row instead."""
    value = " ".join(_CONTROL.sub("?", value).split())  # no newline, tab or escape from a message
    limit = width or LAST_COLUMN_MAX
    if cut and len(value) > limit:
        value = value[: limit - 1] + "…"
    return value.ljust(width)


def api_answer(http_status: int | None, error_code: str | None) -> str:
    """The API's answer as both tables show it (``HTTP 400 GOM.00001005``); empty when it gave none."""
    return " ".join(
        part for part in (f"HTTP {http_status}" if http_status is not None else "", error_code) if part
    )
