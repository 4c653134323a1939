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
