#!/usr/bin/env bash
# The run command: install, start a local Kafka broker, run the worker on the real REES46 sample,
# show segment changes arriving at the example email/push subscriber, then stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/stream-app demo "$@"
