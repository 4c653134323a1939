#!/usr/bin/env bash
# The test command: install, lint, type-check, check schemas, run every test (unit + integration
# against a real local Kafka broker that the test session starts and stops itself).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

# The test session records every broker and worker it starts in this run's own folder
# (tests/conftest.py) and removes a record once it has stopped that process itself. So the
# cleanup stops only what a killed session left behind: never a user's worker or broker, nor
# another test run's.
run_dir="$(mktemp -d "${TMPDIR:-/tmp}/stream-app-test.XXXXXX")"
export STREAM_APP_TEST_RUN_DIR="$run_dir"

start_time() { # field 22 of /proc/PID/stat, after "(comm)", which may hold spaces
  local stat fields
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  read -ra fields <<<"${stat##*) }"
  echo "${fields[19]}"
}

runs_kafka() { # PID SERVER_PROPERTIES: the launcher's own check (kafka.local._pid_runs_kafka)
  [[ -d /proc/self ]] || return 0
  local argv
  argv="$(tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
  grep -qxF kafka.Kafka <<<"$argv" && grep -qxF "$2" <<<"$argv"
}

stop() { # PID [group]: SIGTERM (the process group when asked), SIGKILL after 20 s
  local target="$1"
  [[ ${2:-} == group ]] && target="-$1"
  kill -TERM -- "$target" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL -- "$target" 2>/dev/null || true
}

cleanup() {
  set +e
  local record pid start mode target
  for record in "$run_dir"/*.pid; do # workers and other children: "PID START MODE"
    [[ -f $record ]] || continue
    read -r pid start mode <"$record"
    [[ $pid =~ ^[0-9]+$ ]] || continue
    # A different start time means that process is gone and its pid was reused.
    [[ $start == - || "$(start_time "$pid")" == "$start" ]] && stop "$pid" "$mode"
  done
  for record in "$run_dir"/*.kafka; do # links to the pid file a local broker writes itself
    [[ -f $record ]] || continue # a stopped broker removes its pid file
    pid="$(<"$record")"
    target="$(readlink "$record")"
    [[ $pid =~ ^[0-9]+$ ]] || continue
    runs_kafka "$pid" "${target%/kafka.pid}/config/server.properties" && stop "$pid" group
  done
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

without_settings() { # run a command without the developer's STREAM_APP_* settings
  local name
  local -a unset=()
  for name in $(compgen -e); do
    [[ $name == STREAM_APP_* && $name != STREAM_APP_TEST_* ]] && unset+=(-u "$name")
  done
  env ${unset[@]+"${unset[@]}"} "$@"
}

echo "== ruff";   ruff check stream_app tests load_tests && ruff format --check stream_app tests load_tests
echo "== mypy";   mypy stream_app tests load_tests
echo "== schemas"; without_settings stream-app schemas --check
if [[ $# -gt 0 ]]; then # what was asked for, as asked
  echo "== pytest"; pytest -q -p no:cacheprovider "$@"
else # the unit tests on every core (they share nothing), then the integration tests, in order
  echo "== pytest (unit)"; pytest -q -p no:cacheprovider -n auto tests/unit
  echo "== pytest (integration)"; pytest -q -p no:cacheprovider tests/integration
fi
