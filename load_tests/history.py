"""A generated history, bootstrapped into a system before a load run (issue 16: load on the path
production runs, where the models have learned and customers have a past).

The history is the run's own traffic model (:class:`~load_tests.generator.TrafficGenerator`),
valid events only, spread evenly over ``history_days`` of event time ending before the run's
event clock begins; its returning customers are the run's (a shared customer prefix). It goes
through ``stream-app bootstrap FILE --format events``, as an operator warms a deployment: the
models are published and every customer's state is in the changelog before the worker starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from load_tests.generator import TrafficConfig, TrafficGenerator
from stream_app.live.workerproc import run_cli
from stream_app.settings import Settings

ROOT: Final = Path(__file__).resolve().parents[1]
CUSTOMERS: Final = "lt"  # the customer prefix a history and its run share
DAY: Final = 86400.0


def write_history(path: Path, traffic: TrafficConfig, start: float, end: float, events: int) -> int:
    """`events` valid events of `traffic` (no malformed ones) with event times spread evenly
    over [start, end), one JSON event per line; returns how many were written."""
    generator = TrafficGenerator(
        traffic.model_copy(update={"malformed_rate": 0.0, "run_id": "hist"})
    )
    step = (end - start) / events
    with path.open("wb") as out:
        for i in range(events):
            out.write(generator.next(start + i * step).value + b"\n")
    return events


def bootstrap_history(
    settings: Settings, traffic: TrafficConfig, days: float, events: int, end: float, workdir: Path
) -> dict[str, Any]:
    """Write the history ending at event time `end` and bootstrap `settings`' app with it;
    what it took, for the report."""
    path = workdir / f"history-{settings.app_id}.jsonl"
    started = time.monotonic()
    written = write_history(path, traffic, end - days * DAY, end, events)
    generated_s = time.monotonic() - started
    args = ("bootstrap", str(path), "--format", "events", "--no-progress")
    done = run_cli(settings, *args, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"bootstrap of the generated history failed: {done.stderr.strip()}")
    path.unlink()
    return {
        "days": days,
        "events": written,
        "generate_s": round(generated_s, 1),
        "bootstrap_s": round(time.monotonic() - started - generated_s, 1),
        "summary": done.stdout.strip(),
    }
