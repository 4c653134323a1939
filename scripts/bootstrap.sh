#!/usr/bin/env bash
# Create .venv (Python 3.11 or 3.12) and install stream_app with its dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)'; then
      PYTHON="$candidate"; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "error: stream_app needs Python 3.11 or 3.12 (set PYTHON=/path/to/python)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev,bench]"
for tool in java mvn; do
  command -v "$tool" >/dev/null 2>&1 || echo "warning: $tool not found; the local Kafka broker needs Java 17+ and Maven (or use docker compose up)" >&2
done
# Headless Chromium from Debian's packages: the browser tests load the report and live pages in
# it (tests/headless_chromium.py drives it over the DevTools pipe, so no driver is needed).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (Debian's package) for the browser tests" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: /usr/bin/chromium not found; the browser tests need it (apt-get install chromium, as root)" >&2
  fi
fi
