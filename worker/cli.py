"""The ``coc-worker`` command line. Nothing in the package imports this module.

Every setting of ``WorkerSettings`` but the secrets is also a flag of ``run`` (``--max-in-flight
64`` overrides ``COC_WORKER_MAX_IN_FLIGHT``); flags win over the environment. Secrets are read from
the environment or a file only (``COC_WORKER_API_SK`` or ``COC_WORKER_API_SK_FILE``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, get_args, get_origin
from urllib.parse import urlsplit

from pydantic.fields import FieldInfo

from schemas.outcomes import DEAD_LETTER_STATUSES, OutcomeStatus
from worker.errors import CocWorkerError, ConfigError, InvalidEvent, SystemicError
from worker.logs import configure, get_logger, redact_cut, redact_text, register_secrets
from worker.loop import loop_factory
from worker.settings import SECRET_FIELDS, TOPIC_NAME_PATTERN, WorkerSettings, env_var, load_settings

if TYPE_CHECKING:
    from worker.tools.dlq import Selection


#: What an unknown argument must look like to be repeated in the error: a long flag's name.
_FLAG_SHAPE = re.compile(r"--[a-z][a-z0-9-]{0,40}")


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: ``--api-sk VALUE`` was taken as ``--api-sk-file`` and the secret
    typed after it sat in ``ps`` and shell history, with an error about a missing file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = "unrecognized arguments: "
        if message.startswith(unknown):  # the flags only: a value typed after one may be a secret,
            # and a secret may start with "-" too: only what is shaped like a flag is repeated.
            args = message.removeprefix(unknown).split()
            flags = [name for arg in args if _FLAG_SHAPE.fullmatch(name := arg.split("=", 1)[0])]
            message = unknown + " ".join(flags) + " (values not repeated)"
        super().error(message)


class _RefuseSecret(argparse.Action):
    """A secret given as a flag: refused with where it goes instead, its value never repeated
    (argparse's "unrecognized arguments" would print it)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        variable = env_var(self.dest)
        parser.error(
            f"{self.option_strings[0]}: secrets are not flags (a command line shows in `ps` and shell"
            f" history); set {variable} in the environment, or {variable}_FILE to a file holding it"
        )


def _add_settings_flags(
    parser: argparse.ArgumentParser,
    only: Sequence[str] | None = None,
    defaults: Mapping[str, str] | None = None,
) -> None:
    """``defaults``: what the command uses when a setting is not given, where that is not the
    setting's own default (the tools log at ``_TOOL_LOG_LEVEL``)."""
    group = parser.add_argument_group("settings (each also COC_WORKER_<NAME>)")
    for name, field in WorkerSettings.model_fields.items():
        if name in SECRET_FIELDS:  # env or *_FILE only; refused on every command, used there or not
            flag = "--" + name.replace("_", "-")
            group.add_argument(flag, dest=name, action=_RefuseSecret, help=argparse.SUPPRESS)
            continue
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = _with_default(field.description or "", field, (defaults or {}).get(name))
        if field.annotation is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _with_default(text: str, field: FieldInfo, default: object = None) -> str:
    """A flag's help with the setting's allowed values and default (``default``, when given, is
    the command's own): an operator outside the Helm chart has no other place to find them (the
    README names only the main ones)."""
    choices = _choices(field.annotation)
    if choices:
        text += f" One of: {', '.join(choices)}."
    if default is None and field.default_factory is None:
        default = field.default
    if default is not None:
        text += f" Default: {str(default).lower() if isinstance(default, bool) else default}."
    return text.strip().replace("%", "%%")  # argparse formats help with %


def _choices(annotation: object) -> list[str]:
    """The values of a ``Literal``, also of an optional one (``Literal[...] | None``, such as
    ``kafka_sasl_mechanism``: its flag named no allowed value)."""
    if get_origin(annotation) is Literal:
        return [str(c) for c in get_args(annotation) if isinstance(c, str | int)]
    return [choice for arg in get_args(annotation) if get_origin(arg) is Literal for choice in _choices(arg)]


def _password_in(url: str) -> bool:
    """Whether a URL given as a flag may hold a password: ``user:password@`` (an empty one too), or
    an ``@`` anywhere but after a plain user name (an unencoded ``/``, ``?``, ``#`` or ``@`` in a
    password moves the ``@`` after it out of the host part, and the rest with it). A user alone,
    ``redis://user@host``, is an ACL user's name only when the password is given apart
    (COC_WORKER_DEDUP_REDIS_PASSWORD or its _FILE): otherwise it is more often a password written
    where the user goes, as the settings take it (``WorkerSettings.secret_values``)."""
    if "@" not in url:
        return False
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # not a URL: what it holds cannot be told apart
        return True
    user = netloc.rpartition("@")[0]
    password_apart = any(os.environ.get(env_var("dedup_redis_password") + end) for end in ("", "_FILE"))
    return url.count("@") > 1 or not user or ":" in user or not password_apart


def _settings_from(args: argparse.Namespace) -> WorkerSettings:
    flagged_url = getattr(args, "dedup_url", None)
    if flagged_url and _password_in(flagged_url):
        raise ConfigError(
            "--dedup-url with a password: a command line shows in `ps` and shell history; set"
            " COC_WORKER_DEDUP_URL in the environment instead, or keep the URL (an ACL user's name"
            " may stay in it, redis://user@host) and give the password in"
            " COC_WORKER_DEDUP_REDIS_PASSWORD or COC_WORKER_DEDUP_REDIS_PASSWORD_FILE"
        )
    overrides = {name: getattr(args, name, None) for name in WorkerSettings.model_fields}
    settings = load_settings(**overrides)
    # Every command (the tools and the ingress too) scrubs its secrets from whatever it prints.
    register_secrets(settings.secret_values())
    return settings


# --- commands ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    configure(settings.log_level, settings.log_format, final=True)
    from worker.app import Worker  # imported late: `coc-worker schema` must not need a broker client

    async def main() -> None:
        worker = Worker(settings)
        _stop_on_signals(worker.stop)
        freeze = asyncio.create_task(_freeze_heap_when_started(worker.started))
        try:
            await worker.run()
        finally:
            freeze.cancel()

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(main())
    except Exception as exc:
        _log_failure(exc)
        raise  # main prints its plain line and exits by the error (a bug's traceback as before)
    return 0


def _log_failure(exc: Exception) -> None:
    """One line at error level when an error ends the worker (the Kafka clients stopped, a job
    crashed, the startup wait ran out, ...): the line before is ``worker_stopped`` at info, and
    with JSON logs only the plain line on stderr said it was no clean stop. The text is the one
    ``main`` prints, redacted (the worker's messages hold no secret; a library's may)."""
    fields: dict[str, Any] = {
        "error": type(exc).__name__,
        "exit_code": 2
        if isinstance(exc, ConfigError)
        else 141
        if isinstance(exc, BrokenPipeError)
        else 1,  # as main
    }
    if isinstance(exc, SystemicError):
        fields["kind"] = exc.kind
    detail = _os_error_text(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
    get_logger(__name__).error("worker_failed", detail=redact_cut(detail, _FAILURE_DETAIL_CHARS), **fields)


#: A failure's text in its log line is cut at this many characters (a library's may be long).
_FAILURE_DETAIL_CHARS = 2000


def _os_error_text(exc: OSError) -> str:
    """A file or port we were given (a seed file, --out, a port in use), without a traceback."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


#: Tracked objects that must be allocated (net of those freed) before a young collection; see below.
_YOUNG_THRESHOLD = 20_000


async def _freeze_heap_when_started(started: asyncio.Event) -> None:
    """Move everything alive after startup out of the garbage collector's sight.

    Startup leaves ~10^5 long-lived objects (modules, pydantic and aiohttp internals); each full
    collection walked them all, a 40 ms pause of the event loop every few seconds under load,
    which set the p99 latency. Frozen, a full collection takes ~1-2 ms (bench/README.md). A
    process-wide choice, so it lives here, with the process, not in ``Worker``.

    Then the young generation's threshold goes up: the pipeline makes almost no cyclic garbage
    (~450 objects in a 50,000-event run), yet at the default of 700 the count of live objects,
    which rises and falls with the events in flight, crossed it ~100 times a second, and the
    collector walked the in-flight events' objects ~6% of the loop's time, freeing nothing. The
    count must now grow by ``_YOUNG_THRESHOLD`` before a collection, so cyclic garbage is still
    collected. The bound is a count of objects, not of bytes, so the worker's own failure paths
    keep no traceback that would hold frames and their request bodies in a cycle
    (``tests/test_apply.py``).
    """
    await started.wait()
    gc.collect()  # what is garbage now must not be frozen with the rest
    gc.freeze()
    gc.set_threshold(_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call ``stop`` (in the running loop) for a clean shutdown."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas import asyncapi
    from schemas.export import write_all

    out = Path(args.out)
    for path in [*write_all(out), asyncapi.write(out)]:
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return asyncio.run(run_demo(verbose=args.verbose))


_FAULT_FLAGS = (
    "error_ratio",
    "throttle_ratio",
    "retry_after_s",
    "latency_ms",
    "latency_jitter_ms",
    "spike_ratio",
    "spike_ms",
    "hang_ratio",
    "hang_s",
    "drop_ratio",
    "drop_after_apply_ratio",
    "timeout_after_apply_ratio",
)


def _add_simulator_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443, help="0 picks a free port")
    parser.add_argument("--ak", default="demo-ak", help="access key the simulator accepts")
    parser.add_argument("--sk", default="demo-sk-0123456789", help="its secret key (a simulator default)")
    parser.add_argument("--token", action="append", default=[], help="also accept this X-Auth-Token")
    parser.add_argument("--seed-file", type=Path, help='JSON {"tickets": [{"ticket_id", "sub_tickets"}]}')
    parser.add_argument(
        "--auto-create",
        action="store_true",
        help="take any ticket: an unknown one is created by the first write it accepts (a read sees it fresh)",
    )
    parser.add_argument(
        "--detail-as-sdk",
        action="store_true",
        help="answer a ticket's GET with the SDK detail model's keys only (no sub-ticket state)",
    )
    parser.add_argument("--rng-seed", type=int, default=0)
    faults = parser.add_argument_group("injected faults (ratios are per-request probabilities)")
    for name in _FAULT_FLAGS:
        faults.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None)


def cmd_simulate(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

    configure("INFO", "auto")
    faults = {name: getattr(args, name) for name in _FAULT_FLAGS if getattr(args, name) is not None}
    try:
        seed = json.loads(args.seed_file.read_text(encoding="utf-8")) if args.seed_file else None
    except ValueError as exc:  # not JSON (a missing file is an OSError, reported by main)
        raise ConfigError(f"--seed-file {args.seed_file}: not JSON ({exc})") from None
    try:
        config = SimulatorConfig(
            host=args.host,
            port=args.port,
            credentials={args.ak: args.sk},
            tokens=set(args.token),
            auto_create=args.auto_create,
            detail_as_sdk=args.detail_as_sdk,
            seed=seed,
            faults=FaultConfig(**faults),
            rng_seed=args.rng_seed,
        )
    except ValidationError as exc:  # a fault flag out of range, a seed file of another shape
        problems = [
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigError(f"simulator settings ({exc.title}): " + "; ".join(problems)) from None

    def ready(url: str) -> None:
        print(f"COC API simulator listening on {url} (admin: {url}/_sim/stats)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_simulator(config, ready=ready))
    return 0


# --- tools for producers, monitoring and downstream consumers ---------------------------------------
#: The settings a Kafka tool needs (connection, security, topics); the rest keep their defaults.
_KAFKA_SETTINGS = (
    "kafka_bootstrap_servers",
    "input_topic",
    "results_topic",
    "dlq_topic",
    "kafka_client_id",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password_file",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
    "kafka_ssl_key_password_file",
    "kafka_ssl_verify",
    "kafka_enable_idempotence",
    "max_event_bytes",
    "log_level",
    "log_format",
)
_INGEST_SETTINGS = (
    *_KAFKA_SETTINGS,
    "http_host",
    "http_port",
    "ingest_tokens_file",
    "ingest_max_body_bytes",
    "ingest_max_batch",
    "ingest_allow_anonymous",
)
_TOOL_LOG_LEVEL = "WARNING"
#: What a tool's help gives as its defaults (``_tool_settings``), where they are not the settings' own.
_TOOL_DEFAULTS = {"log_level": _TOOL_LOG_LEVEL}


def _tool_settings(args: argparse.Namespace) -> WorkerSettings:
    """Settings for a tool: quiet logs unless a level was set (stdout is the tool's output)."""
    settings = _settings_from(args)
    if "log_level" in settings.model_fields_set:
        configure(settings.log_level, settings.log_format)
    else:
        configure(_TOOL_LOG_LEVEL, settings.log_format)
        # the tool reports a failure in its own one line; the client library's noise only hides it
        logging.getLogger().setLevel(logging.CRITICAL)
    return settings


def _bool_flag(group: Any, flag: str, help_text: str) -> None:
    group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)


def _add_event_flags(parser: argparse.ArgumentParser) -> None:
    from worker.tools.events import TYPE_ALIASES

    event = parser.add_argument_group("the event (flags override the fields of --file)")
    event.add_argument("--file", metavar="PATH", help="JSON event to start from; - reads stdin")
    event.add_argument(
        "--type", choices=sorted(TYPE_ALIASES), metavar="TYPE", help="e.g. started, change.ended"
    )
    event.add_argument("--ticket", dest="ticket_id", metavar="ID", help="ticket_id (the Kafka key)")
    event.add_argument("--sub-ticket", dest="sub_ticket_id", metavar="ID", help="sub_ticket_id")
    event.add_argument("--event-id", help="idempotency key (default: a new one); reuse it on retries")
    event.add_argument("--source", help="who sends it, e.g. github-actions")
    event.add_argument("--occurred-at", help="RFC 3339 time (default with flags only: now)")
    event.add_argument("--comment", help="result.comment")
    event.add_argument("--fail-type", dest="change_fail_type", help="result.change_fail_type")
    event.add_argument("--verified-docs", help="result.verified_docs")
    _bool_flag(event, "--verified", "result.is_verified_in_change_time")
    event.add_argument("--rollback-start-ms", dest="rollback_start_time", type=int, help="epoch ms")
    event.add_argument("--rollback-end-ms", dest="rollback_end_time", type=int, help="epoch ms")
    _bool_flag(event, "--rollback-success", "result.is_rollback_success")
    _bool_flag(event, "--monitor-found", "result.is_monitor_found")
    event.add_argument("--phase", help="ticket_info.phase (ticket.update)")
    event.add_argument("--work-flow-status", help="ticket_info.work_flow_status (ticket.update)")


_SEND_TIMEOUT_S = 60.0


def cmd_send(args: argparse.Namespace) -> int:
    import json

    from worker.tools import events, send
    from worker.tracing import parse

    settings = _tool_settings(args)
    flags = events.EventFlags(
        type=args.type,
        ticket_id=args.ticket_id,
        sub_ticket_id=args.sub_ticket_id,
        event_id=args.event_id,
        source=args.source,
        occurred_at=args.occurred_at,
        comment=args.comment,
        change_fail_type=args.change_fail_type,
        is_verified_in_change_time=args.verified,
        verified_docs=args.verified_docs,
        rollback_start_time=args.rollback_start_time,
        rollback_end_time=args.rollback_end_time,
        is_rollback_success=args.rollback_success,
        is_monitor_found=args.monitor_found,
        phase=args.phase,
        work_flow_status=args.work_flow_status,
    )
    if not args.wait_outcome and (args.json or args.timeout_s is not None):
        print("coc-worker send: --json and --timeout-s go with --wait-outcome", file=sys.stderr)
        return send.EXIT_BAD_INPUT
    trace = None
    if args.traceparent is not None:
        trace = parse(args.traceparent)
        if trace is None:
            print("coc-worker send: --traceparent is not a W3C traceparent", file=sys.stderr)
            return send.EXIT_BAD_INPUT
    try:
        base = None
        if args.file is not None:
            base = events.parse_document(events.read_document(args.file, sys.stdin.buffer))
            if not isinstance(base, dict):
                raise InvalidEvent("schema", "$: the file must hold one JSON object")
        obj = events.build(base, flags)
        event = events.validated(obj, settings.max_event_bytes)
    except InvalidEvent as exc:
        print(f"coc-worker send: invalid event: {exc.detail}", file=sys.stderr)
        return send.EXIT_BAD_INPUT
    wait_s = (args.timeout_s or _SEND_TIMEOUT_S) if args.wait_outcome else None
    if not args.json:
        # The id first, before anything can fail: a caller retrying after an error must reuse it.
        # With --json it is in the one document printed (a line before it broke `| jq`).
        print(event.event_id, flush=True)
    try:
        result = asyncio.run(send.send_event(settings, event, obj, trace=trace, wait_outcome_s=wait_s))
    except (Exception, KeyboardInterrupt) as exc:
        if args.json:  # the id even so, in the document; the error goes to stderr as without --json
            failed = {"event_id": event.event_id, "status": "error", "detail": _send_failure(exc)}
            with contextlib.suppress(OSError):
                print(json.dumps(failed), flush=True)
        raise
    if wait_s is not None and args.json:
        print(send.result_json(result, wait_s, settings))
    elif wait_s is not None and result.timed_out:
        print(f"coc-worker send: {send.timeout_detail(result, wait_s, settings)}", file=sys.stderr)
    elif result.outcome is not None:
        print(send.describe_outcome(result.outcome))
    return result.exit_code


def _send_failure(exc: BaseException) -> str:
    """A failed send's error as ``main`` says it (redacted), for ``send --json``'s document."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError):
        return _os_error_text(exc)
    return redact_text(str(exc)) or type(exc).__name__


def cmd_validate(args: argparse.Namespace) -> int:
    from worker.tools.validate import IngressLimits, print_reports, validate_files

    settings = _tool_settings(args)
    ingress = IngressLimits(settings.ingest_max_body_bytes, settings.ingest_max_batch)
    reports = validate_files(args.files, sys.stdin.buffer, settings.max_event_bytes, ingress)
    return print_reports(reports, sys.stdout)


def cmd_ingest(args: argparse.Namespace) -> int:
    from worker.ingest import serve

    settings = _settings_from(args)
    configure(settings.log_level, settings.log_format)  # a server: its logs are its output

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop.set)

        def ready(port: int) -> None:
            print(f"coc-worker ingest listening on http://{settings.http_host}:{port}", flush=True)

        await serve(settings, stop, ready)

    asyncio.run(main())
    return 0


def cmd_outcomes_tail(args: argparse.Namespace) -> int:
    from worker.tools.tail import OutcomeFilter, tail

    settings = _tool_settings(args)
    selection = OutcomeFilter(frozenset(args.ticket), frozenset(OutcomeStatus(s) for s in args.status))
    asyncio.run(
        tail(
            settings,
            selection,
            sys.stdout,
            sys.stderr,
            json_lines=args.json,
            from_beginning=args.from_beginning,
            follow=args.follow,
            max_count=args.max_count,
        )
    )
    return 0


def _selection(args: argparse.Namespace) -> Selection:
    from worker.tools.dlq import Selection

    if args.partition is None and (args.from_offset is not None or args.to_offset is not None):
        # Offsets are a partition's own: applied to every partition, --from-offset 0 selected the
        # whole DLQ, and passed for a selection, `dlq replay --from-offset 0` replayed it all.
        flag = "--from-offset" if args.from_offset is not None else "--to-offset"
        raise ConfigError(f"{flag} needs --partition: offsets are those of one DLQ partition")
    if args.from_offset is not None and args.to_offset is not None and args.from_offset > args.to_offset:
        raise ConfigError(f"--from-offset {args.from_offset} is after --to-offset {args.to_offset}")
    return Selection(
        reasons=frozenset(args.reason),
        statuses=frozenset(args.status),
        tickets=frozenset(args.ticket),
        event_ids=frozenset(args.event_id),
        partition=args.partition,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from worker.tools.dlq import list_dead_letters

    settings = _tool_settings(args)
    shown = asyncio.run(
        list_dead_letters(
            settings, _selection(args), sys.stdout, sys.stderr, json_lines=args.json, limit=args.limit
        )
    )
    print(f"{shown} dead-letter record{'s' if shown != 1 else ''}", file=sys.stderr)
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from worker.tools.dlq import replay

    settings = _tool_settings(args)
    selection = _selection(args)
    if not selection.narrows and not args.all:
        print(
            "coc-worker dlq replay: choose records (--reason, --status, --ticket, --event-id, --partition "
            "with --from-offset and --to-offset) or pass --all",
            file=sys.stderr,
        )
        return 2
    if args.to_topic is not None:
        problem = _replay_target_problem(args.to_topic, settings)
        if problem:
            print(f"coc-worker dlq replay: --to-topic {args.to_topic!r}: {problem}", file=sys.stderr)
            return 2
    report = asyncio.run(
        replay(
            settings,
            selection,
            sys.stdout,
            sys.stderr,
            to_topic=args.to_topic,
            from_any_topic=args.from_any_topic,
            dry_run=args.dry_run,
            limit=args.limit,
        )
    )
    sending = report.selected - report.copies - report.refused
    if report.dry_run:
        summary = f"dry run: {sending} of {report.selected} record(s) would be replayed to {report.target}"
    else:
        summary = f"replayed {report.sent} of {report.selected} record(s) to {report.target}"
    if report.copies:
        summary += f"; {report.copies} later cop{'ies' if report.copies != 1 else 'y'} of an event skipped"
    if report.refused:
        summary += f"; {report.refused} NOT replayable (see those lines)"
    print(summary, file=sys.stderr)
    return 1 if report.refused else 0


def _replay_target_problem(topic: str, settings: WorkerSettings) -> str | None:
    if not _TOPIC_NAME.match(topic):
        return "not a Kafka topic name (1-249 of A-Z a-z 0-9 . _ -)"
    if topic in (settings.dlq_topic, settings.results_topic):
        return "that is the dead-letter or the results topic; replays go to an input topic"
    return None


def _add_dlq_selection(parser: argparse.ArgumentParser) -> None:
    select = parser.add_argument_group("which records (repeat a flag for any of several values)")
    select.add_argument("--reason", action="append", default=[], help="coc-dlq-reason, e.g. api_rejected")
    select.add_argument(
        "--status", action="append", default=[], choices=sorted(s.value for s in DEAD_LETTER_STATUSES)
    )
    select.add_argument("--ticket", action="append", default=[], metavar="ID", help="ticket_id")
    select.add_argument("--event-id", action="append", default=[], metavar="ID")
    select.add_argument("--partition", type=_not_negative, help="only this DLQ partition")
    select.add_argument(
        "--from-offset", type=_not_negative, metavar="N", help="first offset (inclusive) of --partition"
    )
    select.add_argument(
        "--to-offset", type=_not_negative, metavar="N", help="last offset (inclusive) of --partition"
    )
    select.add_argument("--limit", type=_at_least_one, metavar="N", help="stop after N records")


def _add_tool_parsers(sub: Any) -> None:
    send = sub.add_parser(
        "send",
        help="produce one change event (keyed by ticket) and print its event id",
        description="Exit codes: 0 sent (with --wait-outcome: applied or duplicate); "
        "1 rejected, failed, invalid, no outcome in time, or broker failure; 2 bad input.",
    )
    _add_event_flags(send)
    send.add_argument(
        "--wait-outcome", action="store_true", help="wait for the outcome and exit by its status"
    )
    send.add_argument(
        "--timeout-s",
        type=_seconds,
        default=None,
        help="how long the whole send with --wait-outcome may take: connecting, producing, waiting (60)",
    )
    send.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document instead of the lines: the outcome, or the event_id with status "
        "timeout or error",
    )
    send.add_argument("--traceparent", help="continue this W3C trace (default: a new one)")
    _add_settings_flags(send, _KAFKA_SETTINGS, _TOOL_DEFAULTS)
    send.set_defaults(func=cmd_send)

    validate = sub.add_parser("validate", help="check event files against the contract (exit 0 valid, 1 not)")
    validate.add_argument(
        "files", nargs="+", metavar="FILE", help="a JSON event or array of events; - is stdin"
    )
    _add_settings_flags(
        validate,
        ("max_event_bytes", "ingest_max_body_bytes", "ingest_max_batch", "log_level", "log_format"),
        _TOOL_DEFAULTS,
    )
    validate.set_defaults(func=cmd_validate)

    ingest = sub.add_parser(
        "ingest", help="HTTP ingress: POST /v1/events and /v1/alertmanager to the input topic"
    )
    _add_settings_flags(ingest, _INGEST_SETTINGS)
    ingest.set_defaults(func=cmd_ingest)

    outcomes = sub.add_parser("outcomes", help="read the results topic")
    outcomes_sub = outcomes.add_subparsers(dest="outcomes_command", required=True)
    tail = outcomes_sub.add_parser("tail", help="follow outcomes as a live table or JSON lines")
    tail.add_argument(
        "--ticket", action="append", default=[], metavar="ID", help="only this ticket (repeatable)"
    )
    tail.add_argument(
        "--status",
        action="append",
        default=[],
        choices=[s.value for s in OutcomeStatus],
        help="repeatable",
    )
    tail.add_argument("--json", action="store_true", help="one outcome JSON per line")
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest outcome")
    tail.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep waiting for new outcomes (--no-follow: stop at the current end)",
    )
    tail.add_argument("--max-count", type=_at_least_one, metavar="N", help="stop after N outcomes")
    _add_settings_flags(tail, _KAFKA_SETTINGS, _TOOL_DEFAULTS)
    tail.set_defaults(func=cmd_outcomes_tail)

    dlq = sub.add_parser("dlq", help="list and replay dead-letter records")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_sub.add_parser("list", help="dead-letter records with their reasons")
    _add_dlq_selection(listing)
    listing.add_argument("--json", action="store_true", help="one record per line as JSON")
    _add_settings_flags(listing, _KAFKA_SETTINGS, _TOOL_DEFAULTS)
    listing.set_defaults(func=cmd_dlq_list)
    replaying = dlq_sub.add_parser(
        "replay",
        help="send selected records back to the input topic (same key, value, event_id)",
        description="One copy of a message (its key and value bytes) per run; records cut by the dead-letter writer, "
        "not written by the worker, or from another topic than the target (unless --from-any-topic), are not "
        "sent. Exit codes: 0 every "
        "selected record replayed or a skipped copy; 1 a record NOT replayable, or a write failed "
        "(UNKNOWN: sent, not acknowledged); 2 bad input.",
    )
    _add_dlq_selection(replaying)
    replaying.add_argument("--all", action="store_true", help="replay every record (no selection)")
    replaying.add_argument("--dry-run", action="store_true", help="only show what would be replayed")
    replaying.add_argument("--to-topic", help="replay here instead of the input topic")
    replaying.add_argument(
        "--from-any-topic",
        action="store_true",
        help="also send records dead-lettered from another topic than the target (a renamed input topic)",
    )
    _add_settings_flags(replaying, _KAFKA_SETTINGS, _TOOL_DEFAULTS)
    replaying.set_defaults(func=cmd_dlq_replay)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coc-worker", description="Apply Kafka change events to the COC change-ticket API.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="consume change events and apply them (the worker)",
        epilog="Secrets are not flags (a command line shows in `ps` and shell history): set "
        + ", ".join(env_var(name) for name in SECRET_FIELDS)
        + " in the environment, or name a file holding one with the same variable plus _FILE.",
    )
    _add_settings_flags(run)
    run.set_defaults(func=cmd_run)

    schema = sub.add_parser("schema", help="write the JSON Schemas and the AsyncAPI 3.0 document")
    # Required: a default inside the package wrote into site-packages, a read-only image, or the
    # tracked files of a checkout (`make schemas` names schemas/json).
    schema.add_argument("--out", required=True, help="directory to write them to")
    schema.set_defaults(func=cmd_schema)

    demo = sub.add_parser("demo", help="broker + simulator + worker + a scripted scenario, then exit")
    demo.add_argument("--verbose", action="store_true", help="show the worker's log lines")
    demo.set_defaults(func=cmd_demo)

    simulate = sub.add_parser("simulate", help="run the COC API simulator")
    _add_simulator_flags(simulate)
    simulate.set_defaults(func=cmd_simulate)

    _add_tool_parsers(sub)
    return parser


_TOPIC_NAME = re.compile(TOPIC_NAME_PATTERN)


def _at_least_one(text: str) -> int:
    return _at_least(text, 1)


def _not_negative(text: str) -> int:
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Any = args.func(args)
    except ConfigError as exc:  # the messages never hold a value; redacted all the same
        print(f"coc-worker: configuration error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except CocWorkerError as exc:
        print(f"coc-worker: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`| head`): stop quietly, as a shell tool does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a file or port we were given (a seed file, --out, a port in use)
        print(f"coc-worker: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
