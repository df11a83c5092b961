#!/usr/bin/env bash
# Stop the traind stack gracefully: the daemon checkpoints and exits, then traind serve and the monitor stop.
#
#   bin/stop_all.sh [--config PATH]
#
# --config defaults to $TRAIND_CONFIG, else the repository's config.json; a relative path is taken
# from the current folder. A config.json broken while the stack runs still stops both (the daemon
# knows the config it runs with).
set -euo pipefail
# A relative --config (or $TRAIND_CONFIG) names a file in the caller's folder, as it does for trainctl:
# it is made absolute here, before anything changes directory.
CALLER=$PWD
from_caller() { case "$1" in /*) echo "$1" ;; "~"|"~/"*) echo "$HOME${1#"~"}" ;; *) echo "$CALLER/$1" ;; esac; }
cd "$(dirname "$0")/.."
ROOT=$PWD
CONFIG=$(from_caller "${TRAIND_CONFIG:-$ROOT/config.json}")
usage() { echo "usage: $0 [--config PATH]" >&2; exit 64; }
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || usage; CONFIG=$(from_caller "$2"); shift 2 ;;
    *) usage ;;
  esac
done
if [ ! -f "$CONFIG" ]; then
  [ -e "$CONFIG" ] && echo "${0##*/}: $CONFIG is not a file" >&2 || echo "${0##*/}: no config file at $CONFIG" >&2
  exit 1
fi
CONFIG=$(realpath "$CONFIG")
PY=${TRAIND_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

# The status folder (the monitor's pid file), found before the stop and also when the config no longer
# loads: then from the file's paths.status, else the default (where trainctl stop finds the daemon too).
STATUS_DIR=$("$PY" -c 'import sys; from daemon.cli.shared import status_folder; print(status_folder(sys.argv[1]))' "$CONFIG")
"$PY" -m daemon.cli --config "$CONFIG" stop || true

SERVE_PID_FILE=$STATUS_DIR/serve.pid
serve_pid=$(cat "$SERVE_PID_FILE" 2>/dev/null || true)
if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null && grep -q serve "/proc/$serve_pid/cmdline" 2>/dev/null; then
  kill -TERM "$serve_pid"  # requests in flight get up to 10 s to finish
  for _ in $(seq 1 150); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 0.1; done
  echo "stop_all: traind serve stopped (pid $serve_pid)"
fi
rm -f "$SERVE_PID_FILE"

MON_PID_FILE=$STATUS_DIR/monitor.pid
mon_pid=$(cat "$MON_PID_FILE" 2>/dev/null || true)
if [ -n "$mon_pid" ] && kill -0 "$mon_pid" 2>/dev/null && grep -q monitor "/proc/$mon_pid/cmdline" 2>/dev/null; then
  kill -TERM "$mon_pid"
  for _ in $(seq 1 100); do kill -0 "$mon_pid" 2>/dev/null || break; sleep 0.1; done
  echo "stop_all: monitor stopped (pid $mon_pid)"
fi
rm -f "$MON_PID_FILE"
