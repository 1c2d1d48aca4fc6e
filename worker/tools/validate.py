"""``coc-worker validate FILE...``: check event files against the contract in a producer's CI.

A file holds one event (a JSON object) or a batch (a JSON array of events), the same shapes the
HTTP ingress takes, within its limits (``COC_WORKER_INGEST_MAX_BODY_BYTES``,
``COC_WORKER_INGEST_MAX_BATCH``: a file the ingress would answer with 413 is not valid). Every
error is printed with its file and JSON path, e.g.
``deploy.json: $[1].sub_ticket_id: Field required``; the exit code is 0 when every file is valid,
else 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from worker.errors import InvalidEvent
from worker.tools.events import event_errors, parse_document, read_document


@dataclass(slots=True)
class FileReport:
    name: str
    events: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True, slots=True)
class IngressLimits:
    """What one request to the HTTP ingress may hold."""

    max_body_bytes: int
    max_batch: int


def check_document(
    raw: bytes, max_event_bytes: int, ingress: IngressLimits | None = None
) -> tuple[int, list[tuple[str, str]]]:
    """(number of events, every (JSON path, message)) for one document."""
    limit_errors: list[tuple[str, str]] = []
    if ingress is not None and len(raw) > ingress.max_body_bytes:
        limit_errors.append(
            ("$", f"{len(raw)} bytes; the ingress takes at most {ingress.max_body_bytes} per request")
        )
    count, errors = _check_events(raw, max_event_bytes)
    if ingress is not None and count > ingress.max_batch:
        limit_errors.append(
            ("$", f"{count} events; the ingress takes at most {ingress.max_batch} per request")
        )
    return count, limit_errors + errors


def _check_events(raw: bytes, max_event_bytes: int) -> tuple[int, list[tuple[str, str]]]:
    try:
        document = parse_document(raw)
    except InvalidEvent as exc:
        return 0, [("$", f"{exc.reason}: {exc.detail}")]
    if isinstance(document, list):
        if not document:
            return 0, [("$", "an empty array holds no event")]
        errors = []
        for index, item in enumerate(document):
            errors += [(f"$[{index}]{path[1:]}", msg) for path, msg in event_errors(item, max_event_bytes)]
        return len(document), errors
    return 1, event_errors(document, max_event_bytes)


def validate_files(
    paths: list[str], stdin: BinaryIO, max_event_bytes: int, ingress: IngressLimits | None = None
) -> list[FileReport]:
    reports = []
    for path in paths:
        report = FileReport("<stdin>" if path == "-" else path)
        try:
            raw = read_document(path, stdin)
        except InvalidEvent as exc:
            report.errors.append(("$", exc.detail))
        else:
            report.events, report.errors = check_document(raw, max_event_bytes, ingress)
        reports.append(report)
    return reports


def print_reports(reports: list[FileReport], out: TextIO) -> int:
    """One line per error (or one ``ok`` line per file); returns the exit code."""
    for report in reports:
        if report.ok:
            noun = "event" if report.events == 1 else "events"
            print(f"{report.name}: ok ({report.events} {noun})", file=out)
        for path, message in report.errors:
            print(f"{report.name}: {path}: {message}", file=out)
    return 0 if all(r.ok for r in reports) else 1
