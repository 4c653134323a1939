"""The `stream-app` command line. Thin: parse, call into the package, print.

Mistakes print one line on stderr and exit 2; nothing prints a traceback for a user error.
Heavy imports (Faust, River) happen inside the handlers so `stream-app --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from stream_app.errors import UserError
from stream_app.settings import Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _config(_: argparse.Namespace, settings: Settings) -> int:
    sys.stdout.write(settings.to_json().decode() + "\n")
    return 0


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.kafka_local import run_kafka_command

    return run_kafka_command(args.action, settings)


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.topics import create_topics

    for topic, outcome in create_topics(settings).items():
        print(f"{topic}: {outcome}")
    return 0


def _schemas(args: argparse.Namespace, _: Settings) -> int:
    from stream_app.schemas import stale_schemas, write_schemas

    directory = Path(args.dir)
    if args.check:
        stale = stale_schemas(directory)
        if stale:
            raise UserError(
                f"schemas out of date in {directory}: {', '.join(stale)} (run `stream-app schemas`)"
            )
        print(f"schemas in {directory} match the models")
        return 0
    for path in write_schemas(directory):
        print(f"wrote {path}")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.app import run_worker

    return run_worker(settings)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.replay import run_replay_command

    return run_replay_command(args, settings)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.demo import run_demo

    return run_demo(settings, dataset=args.dataset, limit=args.limit)


def _subscribe(args: argparse.Namespace, settings: Settings) -> int:
    from stream_app.subscriber import Interest, describe, run_subscriber

    interest = Interest(
        lifecycle=frozenset(args.lifecycle or ()),
        propensity_tiers=frozenset(args.tier or ()),
        clusters=frozenset(args.cluster or ()),
        include_replay=args.include_replay,
    )
    state = run_subscriber(
        settings,
        args.group,
        interest,
        lambda change: print(describe(change), flush=True),
        idle_timeout_s=args.idle_timeout,
    )
    print(
        f"done: {len(state.seen)} changes, {state.duplicates} duplicates dropped, "
        f"{state.gaps} sequence gaps, {state.invalid} invalid",
        flush=True,
    )
    return 0


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
    replay.add_argument("--limit", type=int, default=None, help="stop after N events")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.set_defaults(handler=_replay)

    subscribe = sub.add_parser(
        "subscribe", help="example email/push subscriber: print entries into chosen segments"
    )
    subscribe.add_argument("--group", default="example-email-campaigns", help="consumer group")
    subscribe.add_argument("--lifecycle", action="append", help="e.g. at_risk (repeatable)")
    subscribe.add_argument("--tier", action="append", help="e.g. high (repeatable)")
    subscribe.add_argument("--cluster", action="append", type=int, help="cluster id (repeatable)")
    subscribe.add_argument("--include-replay", action="store_true", help="also act on backfill")
    subscribe.add_argument("--idle-timeout", type=float, default=10.0, help="stop after N idle s")
    subscribe.set_defaults(handler=_subscribe)

    demo = sub.add_parser("demo", help="broker + worker + a replayed stream, end to end")
    demo.add_argument("--dataset", type=Path, default=None)
    demo.add_argument("--limit", type=int, default=3000)
    demo.set_defaults(handler=_demo)
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
    except ValidationError as exc:
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
