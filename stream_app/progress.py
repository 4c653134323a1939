"""A one-line progress bar for long commands (replays, shadow copies): count, rate and ETA.

It only draws on a terminal; in a pipe or a CI log it stays silent, so logs are not flooded with
carriage returns. The arithmetic (``render``) is separate from the drawing so tests can check it.
"""

from __future__ import annotations

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
        self.stream, self.verb, self.total, self.clock = stream, verb, total, clock
        self.enabled = enabled and stream.isatty()
        self.start = self.last = clock()

    def update(self, done: int, *, fraction: float | None = None, final: bool = False) -> None:
        now = self.clock()
        if not self.enabled or (not final and now - self.last < REDRAW_EVERY_S):
            return
        self.last = now
        line = render(self.verb, done, now - self.start, self.total, fraction)
        self.stream.write("\r" + line + ("\n" if final else ""))
        self.stream.flush()

    def finish(self, done: int) -> None:
        self.update(done, fraction=1.0 if self.total is None else None, final=True)
