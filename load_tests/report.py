"""The report of a load run: report.json (every figure), report.md (pass/fail per objective, the
machine, who used how much CPU) and PNG charts (throughput, latency percentiles, lag, CPU/RSS)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import orjson

from load_tests.objectives import Status, Verdict
from load_tests.systems import DESCRIPTIONS, SystemKind

PROCESS_LABELS = {
    "system": "system under test",
    "broker": "Kafka broker (JVM)",
    "generator": "traffic generator",
    "harness": "harness (subscriber, probes)",
    "others": "other work on the machine",
}


def machine() -> dict[str, Any]:
    import psutil  # type: ignore[import-untyped]

    cpus = os.cpu_count() or 1
    return {
        "cpu_count": cpus,
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "shared": (
            f"generator, broker, system under test and harness all run on these {cpus} "
            "vCPUs; per-process CPU is in the report"
        ),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Compact (a long run has thousands of rows); ``jq . report.json`` to read it."""
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS) + b"\n")


def _n(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}{unit}"
    return str(value)


def render_markdown(data: dict[str, Any]) -> str:
    lines = _header(data)
    lines += _runs(data)
    lines += _resources(data)
    lines += _warnings(data)
    lines += _capacity(data)
    for run in data["runs"]:
        lines += _scenario_details(run)
    lines += _worker_metrics(data)
    lines += [
        "",
        "## Charts",
        "",
        *[f"![{chart}]({chart})" for chart in data.get("charts", [])],
        "",
        "Every figure, per second, is in `report.json`.",
        "",
    ]
    return "\n".join(lines)


def _header(data: dict[str, Any]) -> list[str]:
    options, mach = data["options"], data["machine"]
    shared = mach["shared"][0].upper() + mach["shared"][1:]
    load = ", ".join(str(x) for x in mach["load_average_at_start"])
    lines = [
        f"# Load test: {options['scenario']}",
        "",
        f"Started {data['started_at']}, took {data['elapsed_s']:,.0f} s. "
        f"Command: `{data['command']}`",
        "",
        f"**Machine:** {mach['cpu_count']} vCPU ({mach['cpu_model']}), {mach['memory_gb']} GB, "
        f"Python {mach['python']}. {shared}. Load average at start: {load} (work of other "
        "processes on the machine competes too; see the CPU table).",
        "",
        "## Objectives",
        "",
        "| objective | target | measured | result | note |",
        "|---|---|---|---|---|",
    ]
    for v in data["verdicts"]:
        mark = {"pass": "PASS", "fail": "**FAIL**", "not measured": "not measured"}[v["status"]]
        lines.append(
            f"| {v['objective']} | {v['target']} | {v['measured']} | {mark} | {v['note']} |"
        )
    return lines


def _runs(data: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Runs",
        "",
        "| system | target/s | in/s (sent) | processed/s | changes/s | p50 ms | p95 ms | "
        "p99 ms | max ms | max lag | backlog at end | drained after | dead letters / malformed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        s = run["summary"]
        lat = s["latency"]
        drained = f"{s['drain_s']} s" if s.get("drained") else "not drained"
        lines.append(
            f"| {run['system']} | {_n(s['target_rate'])} | {_n(s['input_rate'])} | "
            f"{_n(s['processed_rate'])} | {_n(s['changes_rate'])} | {_n(lat['p50_ms'], '', 1)} | "
            f"{_n(lat['p95_ms'], '', 1)} | {_n(lat['p99_ms'], '', 1)} | {_n(lat['max_ms'], '', 1)}"
            f" | {_n(s['lag_max'])} | {_n(s['backlog_end_of_schedule'])} | {drained} | "
            f"{_n(s['dead_letters_received'])} / {_n(s['malformed_sent'])} |"
        )
    warmup = data["options"]["warmup"]
    lines += [
        "",
        f"Figures are over the measured window of each run (after a {warmup:g} s warm-up). "
        "Latency runs from the event's produce time to the segment change's arrival at a "
        "subscriber, over every change an event of the run triggered. Lag is the consumer "
        "group's committed lag; backlog is input not yet processed.",
    ]
    return lines


def _resources(data: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### CPU and memory per process",
        "",
        "Mean (max) % of one core over the measured window, and peak RSS. 'Other work' is the "
        "machine's busy time not spent in these processes.",
        "",
        "| system run | " + " | ".join(PROCESS_LABELS.values()) + " | machine busy % |",
        "|---|" + "---|" * (len(PROCESS_LABELS) + 1),
    ]
    for run in data["runs"]:
        s = run["summary"]
        cells = []
        for name in PROCESS_LABELS:
            cpu = s["cpu"].get(name, {})
            cell = f"{_n(cpu.get('mean_percent'), '%')} ({_n(cpu.get('max_percent'), '%')})"
            peak = s["rss"].get(name, {}).get("max_mb")
            cells.append(cell if peak is None else f"{cell}, {_n(peak, ' MB')}")
        busy = _n(s["machine_cpu_mean_percent"], "%")
        lines.append(f"| {run['system']} | " + " | ".join(cells) + f" | {busy} |")
    return lines


def _warnings(data: dict[str, Any]) -> list[str]:
    warnings = []
    for run in data["runs"]:
        s = run["summary"]
        if not s.get("generator_kept_up"):
            warnings.append(
                f"{run['system']}: the generator delivered "
                f"{_n((s.get('generator_accuracy') or 0) * 100, '%', 1)} of the target rate "
                f"({s.get('generator_behind_seconds', 0)} s more than 0.5 s behind): the input "
                "was lower than asked, so the machine, not only the system, was the limit."
            )
        if s.get("delivery_errors"):
            warnings.append(f"{run['system']}: {s['delivery_errors']} produce errors.")
        if s.get("sequence_gaps_seen"):
            warnings.append(f"{run['system']}: {s['sequence_gaps_seen']} sequence gaps seen.")
        if s.get("exit_code") not in (0, None):
            warnings.append(f"{run['system']}: exited with {s['exit_code']} on SIGTERM.")
    return ["", "### Warnings", "", *[f"* {w}" for w in warnings]] if warnings else []


def _capacity(data: dict[str, Any]) -> list[str]:
    if not data.get("capacity"):
        return []
    lines = [
        "",
        "## Side by side: capacity from a backlog",
        "",
        f"Each system processed the same pre-published backlog of "
        f"{data['options']['capacity_events']:,} events (same seed), timed from 10% to 90% "
        f"done; median of {data['options'].get('capacity_repeats', 1)} interleaved repeat(s). "
        "The objectives use events/s. Events per CPU-second is the same work divided by the CPU "
        "the system got: on a shared machine it shows how much of a wall-time ratio is "
        "starvation rather than cost.",
        "",
        "| system | events/s | CPU % | events per CPU-s | ratio worker / this (wall) | "
        "ratio worker / this (per CPU-s) | repeats (events/s) | what it is |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worker = data["capacity"].get("worker", {})
    for name, cap in data["capacity"].items():
        cells = []
        for key in ("events_per_s", "events_per_cpu_s"):
            mine, theirs = worker.get(key), cap.get(key)
            cells.append(f"{mine / theirs:.2f}x" if mine and theirs else "-")
        repeats = ", ".join(_n(r.get("events_per_s")) for r in cap.get("repeats", []))
        lines.append(
            f"| {name} | {_n(cap.get('events_per_s'))} | {_n(cap.get('cpu_mean_percent'), '%')} "
            f"| {_n(cap.get('events_per_cpu_s'))} | {cells[0]} | {cells[1]} | {repeats} | "
            f"{DESCRIPTIONS[SystemKind(name)]} |"
        )
    return lines


def _scenario_details(run: dict[str, Any]) -> list[str]:
    s, lines = run["summary"], []
    if run.get("ramp"):
        lines += [
            "",
            f"## Ramp steps ({run['system']})",
            "",
            "| rate/s | in/s | processed/s | p99 ms | backlog at end | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for step in run["ramp"]:
            lines.append(
                f"| {_n(step['rate'])} | {_n(step['input_rate'])} | "
                f"{_n(step['processed_rate'])} | {_n(step['p99_ms'], '', 1)} | "
                f"{_n(step['backlog_end'])} | {step['reason']} |"
            )
        lines.append(
            f"\nMax sustainable rate: **{_n(s.get('max_sustainable_rate'))} events/s**; "
            f"what broke first: {s.get('ramp_limit')}."
        )
    if s.get("spike"):
        sp = s["spike"]
        drain = f"{sp['drain_s']} s" if sp["drained"] else "did not drain within the run"
        lines += [
            "",
            f"## Spike ({run['system']})",
            "",
            f"{_n(sp['spike_rate_target'])}/s asked from {sp['spike_start_s']:g} s to "
            f"{sp['spike_end_s']:g} s, {_n(sp['spike_rate_sent'])}/s sent. Backlog peak "
            f"{_n(sp['backlog_peak'])}; back under {_n(sp['drain_threshold'])} "
            f"(pre-spike level) after: **{drain}**. Peak per-second p99: "
            f"{_n(sp['latency_peak_p99_ms'])} ms.",
        ]
    if s.get("soak"):
        so = s["soak"]
        lines += [
            "",
            f"## Soak ({run['system']})",
            "",
            f"RSS {_n(so['rss_after_warmup_mb'], ' MB', 1)} after warm-up, "
            f"{_n(so['rss_end_mb'], ' MB', 1)} at the end ({so['rss_growth_mb']:+.1f} MB) "
            f"while {so['new_customers']:,} more customers were seen (fitted: "
            f"{_n(so.get('rss_bytes_per_customer_fitted'), ' B')} per customer); slope over the "
            f"second half {_n(so['rss_slope_second_half_mb_per_min'], ' MB/min', 2)}. The RSS "
            "includes RocksDB memtables (up to write_buffer_size x max_write_buffer_number per "
            "partition) and in-memory state caches, which fill before they level off. Median "
            f"per-second p99: {_n(so['p99_first_quarter_median_ms'])} ms in the first "
            f"quarter, {_n(so['p99_last_quarter_median_ms'])} ms in the last.",
        ]
    return lines


def _worker_metrics(data: dict[str, Any]) -> list[str]:
    metrics = next((r["metrics"] for r in data["runs"] if r["system"] == "worker"), None)
    if not metrics:
        return []
    lines = ["", "## Worker metrics (Prometheus, at the end of the run)", ""]
    for name in (
        "stream_app_events_in",
        "stream_app_dead_letters",
        "stream_app_segment_changes",
        "stream_app_processing_seconds",
        "stream_app_event_to_emit_seconds",
        "stream_app_batch_events",
    ):
        if name in metrics:
            lines.append(f"* `{name}`: `{orjson.dumps(metrics[name]).decode()}`")
    return lines


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in rows if r.get(key) is not None]
    return [r["t"] for r in kept], [float(r[key]) for r in kept]


def _rolling(values: list[float], window: int) -> list[float]:
    out: list[float] = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _nested(rows: list[dict[str, Any]], key: str, name: str) -> tuple[list[int], list[float]]:
    kept = [r for r in rows if r[key].get(name) is not None]
    return [r["t"] for r in kept], [float(r[key][name]) for r in kept]


def write_charts(directory: Path, runs: list[dict[str, Any]]) -> list[str]:
    """throughput.png, latency.png, lag.png and resources.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(runs)
    fig, axes = plt.subplots(count, 1, figsize=(10, 3.2 * count), squeeze=False, sharex=True)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        for key, label in (
            ("target", "target"),
            ("sent", "sent (generator)"),
            ("changes", "segment changes out"),
        ):
            ax.plot(*_series(run["rows"], key), label=label, linewidth=1)
        # The worker counts a batch at a time, so per-second counts alias; 5 s mean.
        xs, ys = _series(run["rows"], "processed")
        ax.plot(xs, _rolling(ys, 5), label="processed (5 s mean)", linewidth=1.5)
        ax.set(title=f"{run['system']}: events/s", ylabel="events/s")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds")
    _save(fig, directory / "throughput.png")

    fig, axes = plt.subplots(count, 1, figsize=(10, 3.2 * count), squeeze=False, sharex=True)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            ax.plot(*_series(run["rows"], key), label=key.removesuffix("_ms"), linewidth=1)
        ax.set_yscale("log")
        ax.set(title=f"{run['system']}: end-to-end latency of changes arriving each second")
        ax.set_ylabel("ms")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds")
    _save(fig, directory / "latency.png")

    fig, ax = plt.subplots(figsize=(10, 3.5))
    for run in runs:
        ax.plot(*_series(run["rows"], "lag"), label=f"{run['system']} committed lag", lw=1)
        ax.plot(*_series(run["rows"], "backlog"), label=f"{run['system']} backlog", lw=1, ls="--")
    ax.set(title="consumer lag (committed) and backlog (not yet processed)")
    ax.set(xlabel="seconds", ylabel="messages")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, directory / "lag.png")

    fig, axes = plt.subplots(count, 2, figsize=(12, 3.0 * count), squeeze=False, sharex=True)
    for (cpu_ax, rss_ax), run in zip(axes, runs, strict=True):
        for name, label in PROCESS_LABELS.items():
            cpu_ax.plot(*_nested(run["rows"], "cpu", name), label=label, linewidth=1)
            rss_ax.plot(*_nested(run["rows"], "rss_mb", name), label=label, linewidth=1)
        cpu_ax.set(title=f"{run['system']}: CPU % of one core")
        rss_ax.set(title=f"{run['system']}: RSS MB")
        cpu_ax.legend(loc="upper left", fontsize=7)
        cpu_ax.grid(alpha=0.3)
        rss_ax.grid(alpha=0.3)
    _save(fig, directory / "resources.png")
    return ["throughput.png", "latency.png", "lag.png", "resources.png"]


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def write_report(directory: Path, data: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data["charts"] = write_charts(directory, data["runs"])
    write_json(directory / "report.json", data)
    (directory / "report.md").write_text(render_markdown(data))


def verdict_rows(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    return [v.model_dump(mode="json") for v in verdicts]


def overall(verdicts: list[Verdict]) -> str:
    if any(v.status is Status.FAIL for v in verdicts):
        return "fail"
    if all(v.status is Status.NOT_MEASURED for v in verdicts):
        return "not measured"
    return "pass"
