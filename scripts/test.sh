#!/usr/bin/env bash
# The test command: install, lint, type-check, check schemas, run every test (unit + integration
# against a real local Kafka broker that the test session starts and stops itself).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

cleanup() {
  # The pytest session stops its broker; this catches one left behind by a killed run.
  pkill -f "stream_app.cli worker" 2>/dev/null || true
  for pid in $(pgrep -f "kafka.Kafka .*pytest-of-" 2>/dev/null || true); do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== ruff";   ruff check stream_app tests load_tests && ruff format --check stream_app tests load_tests
echo "== mypy";   mypy stream_app
echo "== schemas"; stream-app schemas --check
echo "== pytest"; pytest -q -p no:cacheprovider "$@"
