"""The `stream-app` command line. Thin: parse, call into the package, print.

Mistakes print one line on stderr and exit 2; nothing prints a traceback for a user error.
They are found before long work starts: settings when they are loaded, output paths and the
worker's port (`stream_app.tools.preflight`) before a command reads, connects or replays.
Heavy imports (Faust, River) happen inside the handlers so `stream-app --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from stream_app.errors import UserError
from stream_app.settings import Settings, env_name, load_settings
from stream_app.tools import preflight

Handler = Callable[[argparse.Namespace, Settings], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _config(_: argparse.Namespace, settings: Settings) -> int:
    sys.stdout.write(settings.to_json().decode() + "\n")
    return 0


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.kafka.local import run_kafka_command

    if args.action == "start":
        preflight.require_writable_dir(settings.state_dir, env_name("state_dir"))
    return run_kafka_command(args.action, settings)


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.kafka.topics import create_topics

    for topic, outcome in create_topics(settings).items():
        print(f"{topic}: {outcome}")
    return 0


def _schemas(args: argparse.Namespace, _: Settings) -> int:
    from stream_app.contracts.schemas import stale_schemas, write_schemas

    directory = Path(args.dir)
    if args.check:
        stale = stale_schemas(directory)
        if stale:
            raise UserError(
                f"schemas out of date in {directory}: {', '.join(stale)} (run `stream-app schemas`)"
            )
        print(f"schemas in {directory} match the models")
        return 0
    preflight.require_writable_dir(directory, "--dir")
    for path in write_schemas(directory):
        print(f"wrote {path}")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    preflight.require_worker_can_start(settings)
    from stream_app.live.app import run_worker

    return run_worker(settings)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.tools.replay import run_replay_command

    return run_replay_command(args, settings)


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.tools.report_cli import run_report_command

    return run_report_command(args, settings)


def _bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.tools.bootstrap import BootstrapRequest, render_summary, run_bootstrap
    from stream_app.tools.replay import parse_instant

    request = BootstrapRequest(
        path=args.file,
        fmt=args.format,
        until=parse_instant(args.until, "--until") if args.until else None,
        emit=args.emit,
        force=args.force,
        show_progress=not args.no_progress,
    )
    summary = run_bootstrap(settings, request)
    print(render_summary(summary, settings, request))
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.tools.models_cli import run_models_command

    if args.action in ("show", "pin") and not args.version:
        raise UserError(f"models {args.action} needs a VERSION (see `stream-app models list`)")
    if args.action in ("list", "unpin") and args.version:
        raise UserError(f"models {args.action} takes no VERSION")
    if args.force and args.action != "pin":
        raise UserError("--force is for models pin only")
    return run_models_command(args.action, args.version, args.json, settings, args.force)


def _shadow(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from stream_app.kafka.ranges import Bounds, parse_offsets
    from stream_app.tools.replay import parse_instant
    from stream_app.tools.shadow import ShadowRequest, delete_shadow, run_shadow

    if args.delete:
        deleted = delete_shadow(settings, args.name)
        print(orjson.dumps({"deleted_topics": deleted}, option=orjson.OPT_INDENT_2).decode())
        return 0
    preflight.require_writable_dir(settings.state_dir, env_name("state_dir"))  # worker log, state

    if args.start and args.from_offsets:
        raise UserError("give --from or --from-offsets, not both")
    if args.until and args.until_offsets:
        raise UserError("give --until or --until-offsets, not both")
    bounds = Bounds(
        start_time=parse_instant(args.start, "--from") if args.start else None,
        end_time=parse_instant(args.until, "--until") if args.until else None,
        start_offsets=parse_offsets(args.from_offsets, "--from-offsets")
        if args.from_offsets
        else None,
        end_offsets=parse_offsets(args.until_offsets, "--until-offsets")
        if args.until_offsets
        else None,
    )
    request = ShadowRequest(
        name=args.name,
        bounds=bounds,
        run_worker=not args.copy_only,
        timeout_s=args.timeout,
        show_progress=not args.no_progress,
    )
    print(orjson.dumps(run_shadow(settings, request), option=orjson.OPT_INDENT_2).decode())
    return 0


def _compare(args: argparse.Namespace, settings: Settings) -> int:
    if args.out is not None:
        preflight.require_writable_file(args.out, "--out")
    from stream_app.tools.compare import run_compare

    return run_compare(args.a, args.b, settings, args.sample, args.out)


def _rewind(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from stream_app.tools.replay import parse_instant
    from stream_app.tools.rewind import run_rewind

    if bool(args.to) == bool(args.to_earliest):
        raise UserError("give exactly one of --to TIME or --to-earliest")
    to = parse_instant(args.to, "--to") if args.to else None
    report = run_rewind(settings, args.group or settings.app_id, to, args.execute)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    if not args.execute:
        print("dry run: nothing changed (add --execute to rewind)", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    preflight.require_worker_can_start(settings)  # before the broker starts
    from stream_app.tools.demo import run_demo

    return run_demo(
        settings,
        dataset=args.dataset,
        limit=args.limit,
        fmt=args.format,
        days_per_second=args.days_per_second,
    )


def _interest(args: argparse.Namespace) -> Any:
    """The subscriber's Interest from its flags; an unknown stage or tier is a UserError."""
    from stream_app.contracts.events import Lifecycle, PropensityTier
    from stream_app.tools.subscriber import Interest

    for flag, given, allowed in (
        ("--lifecycle", args.lifecycle, Lifecycle),
        ("--tier", args.tier, PropensityTier),
    ):
        unknown = sorted(set(given or ()) - {member.value for member in allowed})
        if unknown:
            names = ", ".join(member.value for member in allowed)
            raise UserError(f"{flag} {unknown[0]} is not one of {names}")
    return Interest(
        lifecycle=frozenset(args.lifecycle or ()),
        propensity_tiers=frozenset(args.tier or ()),
        clusters=frozenset(args.cluster or ()),
        include_replay=args.include_replay,
    )


def _subscribe(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from stream_app.tools.subscriber import default_state_path, describe, run_subscriber

    if args.idle_timeout < 0:
        raise UserError("--idle-timeout must be 0 (never stop) or more seconds")
    if args.batch_size < 1:
        raise UserError("--batch-size must be 1 or more")
    interest = _interest(args)
    state = args.state or default_state_path(settings, args.group)
    if args.state is not None:
        preflight.require_writable_file(args.state, "--state")
    else:
        preflight.require_writable_dir(state.parent, env_name("state_dir"))
    stopping = threading.Event()  # SIGTERM or Ctrl-C: finish the batch, print the summary
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    tally = run_subscriber(
        settings,
        args.group,
        interest,
        lambda change: print(describe(change), flush=True),
        state_path=state,
        idle_timeout_s=args.idle_timeout or None,
        stop=stopping.is_set,
        report=lambda line: print(line, file=sys.stderr, flush=True),
        batch_size=args.batch_size,
    )
    print(tally.summary(), flush=True)
    return 0


def _add_replay_tools(sub: Any) -> None:
    """Shadow runs, comparisons and rewinds: the engineers' side of replay."""
    shadow = sub.add_parser(
        "shadow",
        help="re-process a range of the live inputs in a separate app id (live group untouched)",
    )
    shadow.add_argument("name", help="names the shadow's app id and topics: shadow-NAME-*")
    shadow.add_argument(
        "--from", dest="start", metavar="TIME", help="Kafka timestamp (arrival) to start at"
    )
    shadow.add_argument("--until", metavar="TIME", help="Kafka timestamp to stop before")
    shadow.add_argument("--from-offsets", metavar="T:P=O,...", help="start offsets")
    shadow.add_argument("--until-offsets", metavar="T:P=O,...", help="end offsets (exclusive)")
    shadow.add_argument("--copy-only", action="store_true", help="copy, do not run a worker")
    shadow.add_argument("--delete", action="store_true", help="delete the shadow's topics, state")
    shadow.add_argument("--timeout", type=float, default=1800.0, help="max seconds to process")
    shadow.add_argument("--no-progress", action="store_true", help="no progress bar")
    shadow.set_defaults(handler=_shadow)

    compare = sub.add_parser("compare", help="diff two segment-change outputs")
    compare.add_argument("a", help="changes.jsonl or kafka:TOPIC")
    compare.add_argument("b", help="changes.jsonl or kafka:TOPIC")
    compare.add_argument("--sample", type=int, default=10, help="differing customers shown")
    compare.add_argument("--out", type=Path, help="write the JSON report here")
    compare.set_defaults(handler=_compare)

    rewind = sub.add_parser(
        "rewind", help="move the live group's input offsets back (dry run unless --execute)"
    )
    rewind.add_argument("--to", metavar="TIME", help="Kafka timestamp (arrival) to rewind to")
    rewind.add_argument("--to-earliest", action="store_true", help="to the start of retention")
    rewind.add_argument("--group", help="consumer group (default: the app id)")
    rewind.add_argument("--execute", action="store_true", help="really move the offsets")
    rewind.set_defaults(handler=_rewind)


def _add_models(sub: Any) -> None:
    """Model operations (shared learning): the versions on the models topic, and a pin."""
    models = sub.add_parser(
        "models",
        help="model versions on the models topic: list, show one, pin scoring to one, unpin",
    )
    models.add_argument("action", choices=["list", "show", "pin", "unpin"])
    models.add_argument("version", nargs="?", help="a version id (or its end) for show and pin")
    models.add_argument("--json", action="store_true", help="list and show: JSON")
    models.add_argument(
        "--force",
        action="store_true",
        help="pin: also a version before the tier or cluster warm-up (every customer changes)",
    )
    models.set_defaults(handler=_models)


def _add_report(sub: Any) -> None:
    report = sub.add_parser(
        "report", help="the segment report: one self-contained HTML page from segment changes"
    )
    report.add_argument(
        "changes", help="changes.jsonl, or kafka:TOPIC (e.g. kafka:segment-changes)"
    )
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    report.add_argument("--dataset", type=Path, help="the events that judge the emitted scores")
    report.add_argument(
        "--format", choices=["events", "online-retail", "rees46"], help="--dataset's format"
    )
    report.add_argument(
        "--replay-report", type=Path, help="replay --offline --report JSON (cluster centres)"
    )
    report.add_argument("--title", default="Segment report", help="the page's title")
    report.add_argument("--no-progress", action="store_true", help="no progress line")
    report.set_defaults(handler=_report)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="broker + worker + a replayed stream, end to end")
    demo.add_argument("--dataset", type=Path, default=None)
    demo.add_argument(
        "--format",
        choices=["online-retail", "rees46", "events"],
        default="online-retail",
        help="the dataset's format (online-retail: bootstrapped up to 2011-11-01 first)",
    )
    demo.add_argument("--limit", type=int, default=None, help="at most N live events")
    demo.add_argument(
        "--days-per-second",
        type=float,
        default=1.0,
        help="how fast the live part plays event time (default: a day per second)",
    )
    demo.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stream-app", description="Real-time behavioural customer segmentation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("config", help="print the effective settings as JSON").set_defaults(
        handler=_config
    )

    kafka = sub.add_parser("kafka", help="run the local single-node Kafka broker (KRaft)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.set_defaults(handler=_kafka)

    topics = sub.add_parser("topics", help="manage the application's topics")
    topics.add_argument("action", choices=["create"])
    topics.set_defaults(handler=_topics)

    schemas = sub.add_parser("schemas", help="write (or --check) the JSON Schema files")
    schemas.add_argument("--dir", default="schemas", help="folder of the schema files")
    schemas.add_argument("--check", action="store_true", help="fail if the files differ")
    schemas.set_defaults(handler=_schemas)

    sub.add_parser("worker", help="run the Faust worker").set_defaults(handler=_worker)

    replay = sub.add_parser("replay", help="replay a dataset through the segmentation core")
    replay.add_argument("file", type=Path)
    replay.add_argument("--format", choices=["events", "online-retail", "rees46"], required=True)
    mode = replay.add_mutually_exclusive_group(required=True)
    mode.add_argument("--offline", action="store_true", help="in-process, no Kafka")
    mode.add_argument("--to-kafka", action="store_true", help="publish into the input topics")
    replay.add_argument("--out", type=Path, help="segment changes as JSON Lines (offline)")
    replay.add_argument("--report", type=Path, help="report JSON (offline)")
    replay.add_argument(
        "--speed",
        default="max",
        help="with --to-kafka: 'max' (as fast as the broker takes it) or a factor (60 = an hour "
        "of history per minute)",
    )
    replay.add_argument(
        "--from", dest="start", metavar="TIME", help="first event time to replay (ISO 8601, UTC)"
    )
    replay.add_argument("--until", metavar="TIME", help="replay events before this time (ISO 8601)")
    replay.add_argument("--limit", type=int, default=None, help="stop after N events")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.set_defaults(handler=_replay)

    _add_report(sub)

    bootstrap = sub.add_parser(
        "bootstrap",
        help="warm start: run history through the models and write the customers' states to "
        "the state changelog (before the workers start)",
    )
    bootstrap.add_argument("file", type=Path)
    bootstrap.add_argument("--format", choices=["events", "online-retail", "rees46"], required=True)
    bootstrap.add_argument(
        "--until", metavar="TIME", help="only events before this time (ISO 8601)"
    )
    bootstrap.add_argument(
        "--emit", action="store_true", help="also send the history's changes (origin replay)"
    )
    bootstrap.add_argument(
        "--force", action="store_true", help="write even if the state changelog holds state"
    )
    bootstrap.add_argument("--no-progress", action="store_true", help="no progress bar")
    bootstrap.set_defaults(handler=_bootstrap)

    subscribe = sub.add_parser(
        "subscribe",
        help="reference email/push subscriber: act exactly once on entries into chosen segments",
    )
    subscribe.add_argument("--group", default="example-email-campaigns", help="consumer group")
    subscribe.add_argument("--lifecycle", action="append", help="e.g. at_risk (repeatable)")
    subscribe.add_argument("--tier", action="append", help="e.g. high (repeatable)")
    subscribe.add_argument("--cluster", action="append", type=int, help="cluster id (repeatable)")
    subscribe.add_argument("--include-replay", action="store_true", help="also act on backfill")
    subscribe.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        help="stop after N seconds with no change (0: follow until Ctrl-C or SIGTERM)",
    )
    subscribe.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="SQLite file of its dedupe and queued actions (default: "
        "STATE_DIR/subscribers/GROUP@TOPIC.sqlite3)",
    )
    subscribe.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="changes per SQLite transaction and offset commit",
    )
    subscribe.set_defaults(handler=_subscribe)

    _add_models(sub)
    _add_replay_tools(sub)

    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        settings = load_settings()
        handler: Handler = args.handler
        return handler(args, settings)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # settings a handler derived (load_settings raises UserError)
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"error: invalid setting {where}: {first['msg']}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"error: invalid setting: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
