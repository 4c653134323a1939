"""A one-line progress bar for long commands (replays, shadow copies): count, rate and ETA.

It only draws on a terminal; in a pipe or a CI log it stays silent, so logs are not flooded with
carriage returns. The arithmetic (``render``) is separate from the drawing so tests can check it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import IO, Final

REDRAW_EVERY_S: Final = 0.5


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    whole = max(round(seconds), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render(
    verb: str, done: int, elapsed_s: float, total: int | None, fraction: float | None
) -> str:
    """The progress line. ``fraction`` (0..1) overrides ``done/total`` for the ETA, e.g. the share
    of event time already played back by a paced replay."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    count = f"{done:,}/{total:,}" if total is not None else f"{done:,}"
    line = f"{verb} {count} events ({rate:,.0f}/s)"
    share = fraction if fraction is not None else (done / total if total else None)
    if share is not None and share > 0:
        share = min(share, 1.0)
        eta = elapsed_s * (1 - share) / share
        line += f" {share:.0%} ETA {format_duration(eta)}"
    return line


class StatusLine:
    """One line of status on ``stream``: rewritten in place on a terminal (at most every
    ``redraw_s``); elsewhere (a pipe, a CI log) written as a new line every ``log_every_s``, or
    never when that is None, so logs are not flooded with carriage returns."""

    WIDTH: Final = 200

    def __init__(
        self,
        stream: IO[str],
        *,
        enabled: bool = True,
        redraw_s: float = REDRAW_EVERY_S,
        log_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream, self.clock = stream, clock
        self.tty = stream.isatty()
        self.enabled = enabled and (self.tty or log_every_s is not None)
        self.every = redraw_s if self.tty else (log_every_s or 0.0)
        self.last = -math.inf

    def show(self, text: str, *, final: bool = False) -> None:
        now = self.clock()
        if not self.enabled or (not final and now - self.last < self.every):
            return
        self.last = now
        if self.tty:
            end = "\n" if final else ""
            self.stream.write("\r" + text[: self.WIDTH].ljust(self.WIDTH) + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self, text: str = "") -> None:
        """Wipe the line on a terminal, then write ``text`` (if any) as a line of its own."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * self.WIDTH + "\r")
        if text:
            self.stream.write(text + "\n")
        self.stream.flush()


class Progress:
    """Redraws at most twice a second; ``finish()`` draws the final line and a newline."""

    def __init__(
        self,
        stream: IO[str],
        *,
        enabled: bool = True,
        verb: str = "replayed",
        total: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verb, self.total, self.clock = verb, total, clock
        self.line = StatusLine(stream, enabled=enabled, clock=clock)
        self.line.last = self.start = clock()

    @property
    def enabled(self) -> bool:
        return self.line.enabled

    def update(self, done: int, *, fraction: float | None = None, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = self.clock() - self.start
        self.line.show(render(self.verb, done, elapsed, self.total, fraction), final=final)

    def finish(self, done: int) -> None:
        self.update(done, fraction=1.0 if self.total is None else None, final=True)
