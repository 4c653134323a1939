"""The browser tests' own check: a page with a console error, an exception, a refused load or a
request elsewhere is caught, so a clean page really is clean."""

from __future__ import annotations

from pathlib import Path

import pytest
from headless_chromium import chromium

pytestmark = pytest.mark.integration

CSP = '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'


def test_console_errors_exceptions_and_refused_loads_are_caught(tmp_path: Path) -> None:
    noisy = tmp_path / "noisy.html"
    noisy.write_text(
        "<p id=x data-value=7>7</p><script>console.error('boom'); console.warn('careful');"
        "throw new Error('bad')</script><img src='http://127.0.0.1:9/x.png'>"
    )
    refused = tmp_path / "refused.html"
    refused.write_text(f"{CSP}<img src='logo.png'><p>hi</p>")
    clean = tmp_path / "clean.html"
    clean.write_text(f"{CSP}<p id=x data-value=7>seven</p>")
    with chromium() as page:
        page.load(noisy.as_uri())
        found = page.problems()
        assert found.console == ["console.error: boom", "console.warning: careful"]
        assert len(found.exceptions) == 1 and "Error: bad" in found.exceptions[0]
        assert any("127.0.0.1:9/x.png" in line for line in found.log)
        assert found.requests == [noisy.as_uri(), "http://127.0.0.1:9/x.png"]
        assert page.evaluate("document.getElementById('x').dataset.value") == "7"

        page.load(refused.as_uri())
        (violation,) = page.problems().errors()
        assert "Content Security Policy" in violation and "logo.png" in violation

        page.load(clean.as_uri())  # the events of the pages before are not this one's
        assert page.problems().errors() == []
        assert page.problems().requests == [clean.as_uri()]
        assert page.evaluate("document.getElementById('x').textContent") == "seven"
