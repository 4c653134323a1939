"""``python -m load_tests run --scenario steady --rate 5000 --duration 60 --report DIR``.

Starts what is missing (a local broker unless ``--bootstrap`` names one, the topics, the system
under test), runs the scenario while measuring from outside, stops everything it started (also on
errors and Ctrl-C) and writes DIR/report.json, DIR/report.md and DIR/*.png.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, get_args

import orjson
from pydantic import BaseModel, ValidationError

from load_tests.objectives import Findings, Objectives, evaluate
from load_tests.report import machine, overall, verdict_rows, write_report
from load_tests.scenarios import (
    SCENARIO_DEFAULTS,
    Flag,
    Progress,
    RunLoop,
    RunOptions,
    ScenarioName,
    SystemRun,
    build_schedule,
    measure_capacity,
    median_capacity,
)
from load_tests.systems import DESCRIPTIONS, SystemKind, broker
from stream_app.errors import UserError

EXIT_OBJECTIVES_MISSED = 3

SCENARIO_HELP = """scenarios:
  steady  a fixed --rate for --duration seconds (latency and throughput at that rate)
  ramp    from --rate up by --step-rate every --step-s seconds until a step is not sustained
          (backlog or p99 objective broken) or --max-rate: the max sustainable rate, and what
          broke first; --duration is ignored
  spike   --rate, then --spike-factor x (10x) for --spike-s seconds, then --rate again: how long
          the backlog takes to drain
  soak    a long steady run (e.g. --duration 1800): RSS and latency drift
  smoke   a short steady run at a low rate (CI: checks the harness, not the speed)

objectives (defaults from issue #6, override with LOADTEST_* variables, e.g. LOADTEST_P99_MS_MAX):
  max sustainable rate >= 10,000/s (ramp); p99 <= 100 ms at 5,000/s (steady);
  >= 3x the naive Faust agent and >= 0.8x the plain confluent-kafka loop (--baseline);
  a 10x spike drains within 30 s (spike); RSS growth explained by new customers (soak)
"""


class _Parser(argparse.ArgumentParser):
    """Mistakes on the command line: one clear line, no usage dump, no traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"load_tests: {message} (see python -m load_tests run --help)\n")


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """An option per field of ``model``: ``--field-name`` or its :class:`Flag`'s spelling, the
    field's type (an enum: its values to choose from; a bool: a switch, ``--no-...`` when on by
    default) and its description as help, with its default (and the scenarios' own). The
    option's value is None when it is not given, so the field's default stands."""
    for name, field in model.model_fields.items():
        flag = next((m for m in field.metadata if isinstance(m, Flag)), Flag())
        kind = _value_type(field.annotation)
        switch_off = kind is bool and field.default is True
        spelled = flag.name or f"--{'no-' if switch_off else ''}{name.replace('_', '-')}"
        about = field.description or ""
        options: dict[str, Any] = {"dest": name, "default": None}
        if kind is bool:
            options["action"] = "store_false" if switch_off else "store_true"
            about = f"without {about}" if switch_off else about
        elif isinstance(kind, type) and issubclass(kind, Enum):
            options["choices"] = [member.value for member in kind]
        else:
            options["type"] = kind
            options["metavar"] = (
                flag.metavar or spelled.removeprefix("--").replace("-", "_").upper()
            )
        if flag.required:
            options["required"] = True
        elif kind is not bool:
            about = _with_defaults(about, name, field.default)
        parser.add_argument(spelled, help=about.replace("%", "%%"), **options)


def _value_type(annotation: Any) -> Any:
    """``float`` of ``float | None``; the annotation itself otherwise."""
    kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 else annotation


def _with_defaults(about: str, name: str, default: Any) -> str:
    if default is None:
        return about
    shown = [_shown(default)]
    shown += [f"{s} {_shown(d[name])}" for s, d in SCENARIO_DEFAULTS.items() if name in d]
    return f"{about} (default {', '.join(shown)})"


def _shown(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m load_tests", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run a load scenario and write a report",
        description="Run a load scenario against one stream_app worker and write a report.",
        epilog=SCENARIO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(run, RunOptions)
    run.add_argument(
        "--fail-on-miss",
        action="store_true",
        help=f"exit {EXIT_OBJECTIVES_MISSED} when a measured objective fails",
    )
    render = sub.add_parser(
        "render", help="write report.md and the charts again from DIR/report.json"
    )
    render.add_argument("report", type=Path, metavar="DIR")
    return parser


def options_from(args: argparse.Namespace) -> RunOptions:
    """RunOptions of the options given (every option left out is None: the default stands)."""
    given = {name: getattr(args, name) for name in RunOptions.model_fields}
    return RunOptions.for_scenario(**{k: v for k, v in given.items() if v is not None})


def run_load(options: RunOptions, objectives: Objectives, command: str = "") -> dict[str, Any]:
    """Run the scenario (and the baselines when asked) and write the report; returns its data."""
    progress = Progress(options.progress)
    started, began = datetime.now(UTC), time.monotonic()
    info = machine()
    systems = [SystemKind.WORKER]
    if options.baseline:
        systems += [SystemKind.PLAIN, SystemKind.NAIVE]
    runs: list[SystemRun] = []
    capacity: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="load-test-") as tmp,
        broker(options.bootstrap, Path(tmp) / "broker") as kafka,
    ):
        for kind in systems:
            loop = RunLoop(
                kind, options, objectives, kafka, Path(tmp), progress, f"{options.scenario}"
            )
            run = loop.run()
            runs.append(run)
            s = run.summary
            progress.done(
                f"{kind}: in {s['input_rate']}/s, processed {s['processed_rate']}/s, "
                f"p99 {s['latency']['p99_ms']} ms, max lag {s['lag_max']}"
            )
        if options.baseline:
            # Interleaved repeats, so a burst of other work on the machine hits every system.
            # The floor runs in the capacity measurement only: it has no segmentation to report.
            measured = [*systems, SystemKind.FLOOR]
            samples: dict[str, list[dict[str, Any]]] = {str(kind): [] for kind in measured}
            for _ in range(options.capacity_repeats):
                for kind in measured:
                    sample = measure_capacity(kind, options, kafka, Path(tmp), progress)
                    samples[str(kind)].append(sample)
                    progress.done(
                        f"capacity {kind}: {sample['events_per_s']} events/s, "
                        f"{sample['events_per_cpu_s']} per CPU-second"
                    )
            capacity = {name: median_capacity(found) for name, found in samples.items()}
        logs = _keep_logs(runs, options.report_dir)
    worker = runs[0]
    ws = worker.summary
    findings = Findings(
        scenario=str(options.scenario),
        target_rate=options.rate,
        input_rate=ws["input_rate"],
        p99_ms=ws["latency"]["p99_ms"],
        p99_at_input_rate=_p99_rate(worker, options),
        max_sustainable_rate=ws.get("max_sustainable_rate"),
        ramp_limit=ws.get("ramp_limit"),
        capacity={k: v["events_per_s"] for k, v in capacity.items() if v.get("events_per_s")},
        spike_drain_s=ws.get("spike", {}).get("drain_s"),
        spike_drained=ws.get("spike", {}).get("drained"),
        soak_rss_growth_mb=ws.get("soak", {}).get("rss_growth_mb"),
        soak_new_customers=ws.get("soak", {}).get("new_customers"),
    )
    if options.scenario is ScenarioName.RAMP:
        findings = _ramp_p99(findings, worker, objectives)
    verdicts = evaluate(objectives, findings)
    schedule = build_schedule(options)
    data: dict[str, Any] = {
        "command": command,
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - began, 1),
        "machine": info,
        "options": {
            **options.model_dump(mode="json"),
            "warmup": options.warmup,
            "schedule": [
                {"start_s": p.start_s, "rate": p.rate, "name": p.name} for p in schedule.phases
            ],
            "schedule_duration_s": schedule.duration_s,
        },
        "objectives": objectives.model_dump(mode="json"),
        "findings": findings.model_dump(mode="json"),
        "verdicts": verdict_rows(verdicts),
        "result": overall(verdicts),
        "systems": {str(k): DESCRIPTIONS[k] for k in systems},
        "capacity": capacity,
        "logs": logs,
        "runs": [
            {
                "system": str(run.kind),
                "settings": run.settings,
                "summary": run.summary,
                "ramp": [vars(step) for step in run.ramp],
                "metrics": run.metrics,
                "rows": run.rows,
            }
            for run in runs
        ],
    }
    write_report(options.report_dir, data)
    return data


def _p99_rate(run: SystemRun, options: RunOptions) -> float | None:
    """The input rate p99 was measured at: the achieved input of a steady-like run."""
    if options.scenario in (ScenarioName.STEADY, ScenarioName.SOAK, ScenarioName.SMOKE):
        rate: float | None = run.summary["input_rate"]
        return rate
    return None


def _ramp_p99(findings: Findings, run: SystemRun, objectives: Objectives) -> Findings:
    """In a ramp, the p99 objective is judged on the step at the objective's rate, if reached."""
    for step in run.ramp:
        if abs(step.rate - objectives.p99_at_rate) < 1e-6:
            return findings.model_copy(
                update={"p99_ms": step.p99_ms, "p99_at_input_rate": step.input_rate}
            )
    return findings.model_copy(update={"p99_ms": None, "p99_at_input_rate": None})


def _keep_logs(runs: list[SystemRun], directory: Path) -> dict[str, str]:
    """Copy the tail of each system's log next to the report (the temp folder goes away)."""
    directory.mkdir(parents=True, exist_ok=True)
    kept: dict[str, str] = {}
    for run in runs:
        source = Path(run.settings.get("log", ""))
        if source.is_file():
            text = source.read_text(errors="replace").replace("\x1b[?25l", "")
            text = text.replace("\x1b[?25h", "")  # Faust's spinner on a non-terminal
            lines = [line[:1000] for line in text.splitlines()[-200:]]
            target = directory / f"{run.kind}.log"
            target.write_text("\n".join(lines) + "\n")
            kept[str(run.kind)] = target.name
            run.settings["log"] = target.name
    return kept


def render(directory: Path) -> int:
    try:
        data = orjson.loads((directory / "report.json").read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"load_tests: cannot read {directory / 'report.json'}: {exc}", file=sys.stderr)
        return 1
    if "findings" in data and "objectives" in data:  # judged again by the current rules
        verdicts = evaluate(Objectives(**data["objectives"]), Findings(**data["findings"]))
        data["verdicts"] = verdict_rows(verdicts)
        data["result"] = overall(verdicts)
    write_report(directory, data)
    print(f"report: {directory / 'report.md'}")
    return 0


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: clean up exactly as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "render":
        return render(args.report)
    try:
        options = options_from(args)
        objectives = Objectives()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        print(f"load_tests: {where + ': ' if where else ''}{message}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    command = "python -m load_tests " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        data = run_load(options, objectives, command)
    except UserError as exc:
        print(f"load_tests: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("load_tests: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"load_tests: {exc}", file=sys.stderr)
        return 1
    for verdict in data["verdicts"]:
        print(
            f"{verdict['status']:>12}  {verdict['objective']}: {verdict['measured']} "
            f"(target {verdict['target']})"
        )
    print(f"report: {options.report_dir / 'report.md'}")
    if args.fail_on_miss and data["result"] == "fail":
        return EXIT_OBJECTIVES_MISSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
