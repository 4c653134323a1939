"""Debian's headless Chromium for the browser tests, driven over the DevTools protocol on a pipe.

Chromium reads commands on file descriptor 3 and writes answers and events on 4 (with
``--remote-debugging-pipe``), each a JSON text ending in a NUL byte. That needs no port, no
WebDriver and no Python package: the standard library speaks it. ``scripts/bootstrap.sh``
installs the browser (``apt-get install chromium``) when /usr/bin/chromium is missing.

A page counts as clean when nothing reached the console as an error or warning, no exception
was thrown, and the browser logged no error (a refused load, a Content-Security-Policy
violation, a failed request).
"""

from __future__ import annotations

import base64
import fcntl
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

CHROMIUM: Final = Path("/usr/bin/chromium")
# As root in a closed network: no sandbox (root), and nothing that calls out on its own
# (without the background-networking flags the network refuses its connections).
FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)
BLANK: Final = "about:blank"  # the first tab's page (not the new-tab page, which loads more)
CONSOLE_PROBLEMS: Final = frozenset({"error", "assert", "warning"})


class BrowserError(AssertionError):
    """The browser failed, answered with an error, or did not answer in time."""


@dataclass
class Problems:
    """What a page reported that a clean page does not."""

    console: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for

    def errors(self) -> list[str]:
        return [*self.console, *self.exceptions, *self.log]


class DevTools:
    """One pipe to the browser: numbered commands, their answers, and the events between."""

    def __init__(self, commands: int, answers: int) -> None:
        self.commands, self.answers = commands, answers
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, orjson.dumps(message) + b"\0")
        while True:
            reply = self._read(deadline=time.monotonic() + 30)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_for(self, method: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The first event `method` (already received or still to come)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.answers], [], [], max(0.0, left))
            if not ready:
                raise BrowserError("the browser did not answer in time")
            chunk = os.read(self.answers, 1 << 20)
            if not chunk:
                raise BrowserError("the browser closed its DevTools pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        decoded: dict[str, Any] = orjson.loads(message)
        return decoded


class Page:
    """One tab: load a URL, then read its DOM and what it reported."""

    def __init__(self, tools: DevTools, session: str) -> None:
        self.tools, self.session = tools, session
        self.loader = ""  # the document loaded last: requests of others are not its own

    def load(self, url: str, timeout_s: float = 30.0) -> None:
        self.tools.events.clear()
        answer = self.tools.call("Page.navigate", {"url": url}, session=self.session)
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")
        self.loader = answer.get("loaderId", "")
        self.tools.wait_for("Page.loadEventFired", timeout_s)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values only)."""
        answer = self.tools.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def problems(self) -> Problems:
        """What the page reported since it was loaded (a round trip first, so nothing that
        was already sent is missed)."""
        self.evaluate("1")
        found = Problems()
        for event in self.tools.events:
            if event.get("sessionId") == self.session:
                _classify(event, found, self.loader)
        return found

    def screenshot(self, path: Path, width: int = 1100) -> None:
        """A PNG of the whole page, `width` CSS pixels wide."""
        height = self.evaluate("document.documentElement.scrollHeight")
        self.tools.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": int(height), "deviceScaleFactor": 1, "mobile": False},
            session=self.session,
        )
        shot = self.tools.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
            session=self.session,
        )  # fmt: skip
        path.write_bytes(base64.b64decode(shot["data"]))


def _classify(event: dict[str, Any], found: Problems, loader: str) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in CONSOLE_PROBLEMS:
        texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
        found.console.append(f"console.{params['type']}: {' '.join(texts)}")
    elif method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        found.exceptions.append(str(details.get("exception", {}).get("description", details)))
    elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
        entry = params["entry"]
        found.log.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
    elif method == "Network.requestWillBeSent" and params.get("loaderId") == loader:
        found.requests.append(params["request"]["url"])


@contextmanager
def chromium(binary: Path = CHROMIUM) -> Iterator[Page]:
    """A fresh headless Chromium (own empty profile) with one tab, closed afterwards."""
    if not binary.exists():
        raise BrowserError(
            f"{binary} is missing: run scripts/bootstrap.sh (apt-get install chromium)"
        )
    profile = Path(tempfile.mkdtemp(prefix="stream-app-chromium-"))
    commands_r, commands_w = os.pipe()
    answers_r, answers_w = os.pipe()
    # The browser's ends, moved above 9 so that putting them on 3 (commands) and 4 (answers)
    # cannot overwrite one with the other; bash does that (dash takes single-digit fds only).
    theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_r, answers_w)]
    for fd in (commands_r, answers_w):
        os.close(fd)
    wiring = f'exec "$0" "$@" 3<&{theirs[0]} 4>&{theirs[1]} {theirs[0]}<&- {theirs[1]}>&-'
    process = subprocess.Popen(
        ["/bin/bash", "-c", wiring, str(binary), *FLAGS, f"--user-data-dir={profile}", BLANK],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=theirs,
    )
    for fd in theirs:
        os.close(fd)
    tools = DevTools(commands_w, answers_r)
    try:
        yield _open_tab(tools)
    finally:
        _close(tools, process)
        os.close(commands_w)
        os.close(answers_r)
        shutil.rmtree(profile, ignore_errors=True)


def _open_tab(tools: DevTools) -> Page:
    targets = tools.call("Target.getTargets")["targetInfos"]
    tab = next(t for t in targets if t["type"] == "page")
    session = tools.call("Target.attachToTarget", {"targetId": tab["targetId"], "flatten": True})
    page = Page(tools, session["sessionId"])
    for domain in ("Page", "Runtime", "Log", "Network"):
        tools.call(f"{domain}.enable", session=page.session)
    return page


def _close(tools: DevTools, process: subprocess.Popen[bytes]) -> None:
    with suppress(BrowserError, OSError):
        tools.call("Browser.close")
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
