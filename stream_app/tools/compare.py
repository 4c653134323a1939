"""`stream-app compare A B`: diff two segment-change outputs (shadow vs live, two model versions,
offline vs Kafka).

Each side is a JSON Lines file (``replay --offline --out``) or ``kafka:TOPIC`` (a segment-changes
topic read from its start to its current end, without a consumer group). Per side: duplicates
are dropped by ``change_id`` and a customer's final segment is the change with the highest
``sequence``. The report counts changes by component on each side, customers whose final segment
differs (and in which part: cluster, propensity tier, lifecycle stage), customers seen on one
side only, and a sample of differing customers with each side's last change and its reason.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from stream_app.errors import UserError
from stream_app.settings import Settings

KAFKA_PREFIX: Final = "kafka:"
SEGMENT_PARTS: Final = ("cluster", "propensity_tier", "lifecycle")


@dataclass
class Side:
    """One output, reduced to what a comparison needs."""

    source: str
    changes: int = 0
    duplicates: int = 0
    unreadable: int = 0
    by_component: Counter[str] = field(default_factory=Counter)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def add(self, raw: bytes) -> None:
        try:
            change = orjson.loads(raw)
            change_id, customer = change["change_id"], change["customer_id"]
            sequence, component = int(change["sequence"]), str(change["component"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.unreadable += 1
            return
        if change_id in self.seen:
            self.duplicates += 1
            return
        self.seen.add(change_id)
        self.changes += 1
        self.by_component[component] += 1
        last = self.final.get(customer)
        if last is None or sequence > last["sequence"]:
            self.final[customer] = change

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "changes": self.changes,
            "duplicates_dropped": self.duplicates,
            "unreadable": self.unreadable,
            "customers": len(self.final),
            "by_component": dict(sorted(self.by_component.items())),
        }


def read_side(source: str, lines: Iterable[bytes]) -> Side:
    side = Side(source)
    for raw in lines:
        if raw.strip():
            side.add(raw)
    return side


def segment_of(change: dict[str, Any]) -> dict[str, Any]:
    current: dict[str, Any] = change["current"]
    return {part: current.get(part) for part in SEGMENT_PARTS}


def _last_change(change: dict[str, Any]) -> dict[str, Any]:
    reason = change.get("reason") or {}
    return {
        "segment": segment_of(change),
        "sequence": change["sequence"],
        "component": change["component"],
        "event_time": change.get("event_time"),
        "origin": change.get("origin"),
        "model_version": change.get("model_version"),
        "scores": change.get("scores"),
        "trigger_event_type": reason.get("trigger_event_type"),
        "reason": reason.get("summary"),
    }


def compare(a: Side, b: Side, sample_size: int = 10) -> dict[str, Any]:
    """The report; ``identical`` is true when every customer ends in the same segment."""
    both = sorted(a.final.keys() & b.final.keys())
    differs_by: Counter[str] = Counter()
    differing: list[str] = []
    for customer in both:
        seg_a, seg_b = segment_of(a.final[customer]), segment_of(b.final[customer])
        parts = [p for p in SEGMENT_PARTS if seg_a[p] != seg_b[p]]
        if parts:
            differing.append(customer)
            differs_by.update(parts)
    only_a = sorted(a.final.keys() - b.final.keys())
    only_b = sorted(b.final.keys() - a.final.keys())
    sample = [
        {
            "customer_id": customer,
            "differs_in": [
                p
                for p in SEGMENT_PARTS
                if segment_of(a.final[customer])[p] != segment_of(b.final[customer])[p]
            ],
            "a": _last_change(a.final[customer]),
            "b": _last_change(b.final[customer]),
        }
        for customer in differing[:sample_size]
    ]
    return {
        "a": a.summary(),
        "b": b.summary(),
        "customers_in_both": len(both),
        "same_final_segment": len(both) - len(differing),
        "final_segment_differs": len(differing),
        "differs_by": {p: differs_by.get(p, 0) for p in SEGMENT_PARTS},
        "customers_only_in_a": len(only_a),
        "customers_only_in_b": len(only_b),
        "only_in_a_sample": only_a[:sample_size],
        "only_in_b_sample": only_b[:sample_size],
        "sample": sample,
        "identical": not differing and not only_a and not only_b,
    }


def lines_of(source: str, settings: Settings) -> Iterator[bytes]:
    if source.startswith(KAFKA_PREFIX):
        return _topic_lines(source.removeprefix(KAFKA_PREFIX), settings)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"no such file: {source} (use kafka:TOPIC for a topic)")
    return _file_lines(path)


def _file_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        yield from handle


def _topic_lines(topic: str, settings: Settings) -> Iterator[bytes]:
    from stream_app.kafka.ranges import Bounds, range_consumer, read_ranges, resolve
    from stream_app.kafka.topics import wait_for_broker

    wait_for_broker(settings.bootstrap_servers, 10.0)
    consumer = range_consumer(settings, f"{settings.app_id}-compare")
    try:
        for msg in read_ranges(consumer, resolve(consumer, [topic], Bounds())):
            value = msg.value()
            if value is not None:
                yield value
    finally:
        consumer.close()


def run_compare(a: str, b: str, settings: Settings, sample: int, out: Path | None) -> int:
    """Print (or write) the report; exit 0 when identical, 1 when the outputs differ."""
    report = compare(
        read_side(a, lines_of(a, settings)), read_side(b, lines_of(b, settings)), sample
    )
    rendered = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    if out is not None:
        out.write_text(rendered + "\n")
    else:
        print(rendered)
    print(
        f"{report['final_segment_differs']} of {report['customers_in_both']} customers in both "
        f"end in a different segment; {report['customers_only_in_a']} only in A, "
        f"{report['customers_only_in_b']} only in B",
        file=sys.stderr,
    )
    return 0 if report["identical"] else 1
