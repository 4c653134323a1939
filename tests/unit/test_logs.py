"""Repeated warnings are written once per interval with a count (a broker outage used to write
one line per reconnect attempt)."""

from __future__ import annotations

import logging

from stream_app.logs import RepeatFilter


def record(msg: str, level: int = logging.WARNING, name: str = "aiokafka") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, ("127.0.0.1:9092",), None)


def test_a_repeated_warning_passes_once_per_interval_with_the_count_held_back() -> None:
    now = [0.0]
    repeats = RepeatFilter(interval_s=30.0, clock=lambda: now[0])
    passed = []
    for second in range(0, 95):
        now[0] = float(second)
        for _ in range(100):  # 100 reconnect attempts a second
            r = record("Unable connect to %s")
            if repeats.filter(r):
                passed.append((second, r.getMessage()))
    assert [s for s, _ in passed] == [0, 30, 60, 90]
    assert passed[0][1] == "Unable connect to 127.0.0.1:9092"
    assert passed[1][1].endswith("[2999 more like this in the last 30s]")


def test_other_messages_and_info_lines_are_never_held_back() -> None:
    repeats = RepeatFilter(interval_s=30.0, clock=lambda: 0.0)
    assert repeats.filter(record("a")) and repeats.filter(record("b"))
    assert repeats.filter(record("a", name="faust"))
    assert all(repeats.filter(record("x", level=logging.INFO)) for _ in range(5))
    assert not repeats.filter(record("a"))
