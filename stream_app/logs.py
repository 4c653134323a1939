"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import orjson

DEFAULT_REPEAT_INTERVAL_S: Final = 30.0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class RepeatFilter(logging.Filter):
    """Writes a repeated warning or error (same logger, level and message template) once per
    interval, with how many were held back since: a broker outage made aiokafka log each
    reconnect attempt, ~6,000 lines a minute, burying everything else."""

    def __init__(
        self,
        interval_s: float = DEFAULT_REPEAT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        held = 0 if last is None else last[1]
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {self.interval_s:.0f}s]"
        return True


def logging_config(
    level: str, repeat_interval_s: float = DEFAULT_REPEAT_INTERVAL_S
) -> dict[str, Any]:
    """A dictConfig for Faust's worker (mode) so every log line, Faust's included, is JSON,
    and repeated warnings are written once per interval with a count."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "stream_app.logs.JsonFormatter"}},
        "filters": {
            "repeats": {"()": "stream_app.logs.RepeatFilter", "interval_s": repeat_interval_s}
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "level": level,
                "filters": ["repeats"],
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
    }
