#!/usr/bin/env bash
# Start the traind daemon in the background, once per instance.
#
#   bin/launch_training_daemon.sh [--config PATH]
#
# --config defaults to $TRAIND_CONFIG, else the repository's config.json; a relative path is taken
# from the current folder. A missing or invalid config is refused with every problem (exit 1).
# Refuses (exit 3, naming the running pid) when a daemon already holds the
# instance's kernel lock (`flock` on <status>/daemon.lock). A pid file left by a
# dead process never blocks: the lock dies with its holder.
set -euo pipefail
# A relative --config (or $TRAIND_CONFIG) names a file in the caller's folder, as it does for trainctl:
# it is made absolute here, before anything changes directory.
CALLER=$PWD
from_caller() { case "$1" in /*) echo "$1" ;; "~"|"~/"*) echo "$HOME${1#"~"}" ;; *) echo "$CALLER/$1" ;; esac; }
cd "$(dirname "$0")/.."
ROOT=$PWD
CONFIG=$(from_caller "${TRAIND_CONFIG:-$ROOT/config.json}")
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || { echo "$0: --config needs a path" >&2; exit 64; }; CONFIG=$(from_caller "$2"); shift 2 ;;
    *) echo "usage: $0 [--config PATH]" >&2; exit 64 ;;
  esac
done
if [ ! -f "$CONFIG" ]; then
  [ -e "$CONFIG" ] && echo "${0##*/}: $CONFIG is not a file" >&2 || echo "${0##*/}: no config file at $CONFIG" >&2
  exit 1
fi
CONFIG=$(realpath "$CONFIG")
PY=${TRAIND_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

paths=$("$PY" - "$CONFIG" <<'PYEOF'
import sys
from daemon.config import load_config
from daemon.errors import ConfigError
try:
    cfg = load_config(sys.argv[1])
except ConfigError as e:
    print(e, file=sys.stderr); sys.exit(1)
print(cfg.path("status")); print(cfg.path("logs"))
PYEOF
) || exit 1
STATUS_DIR=$(echo "$paths" | sed -n 1p)
LOGS_DIR=$(echo "$paths" | sed -n 2p)
LOCK=$STATUS_DIR/daemon.lock
mkdir -p "$STATUS_DIR" "$LOGS_DIR"
touch "$LOCK"

running_pid() { cat "$LOCK" 2>/dev/null | tr -d '[:space:]'; }

if ! flock -n "$LOCK" true; then
  echo "traind is already running for $CONFIG (pid $(running_pid)); refusing to start a second daemon" >&2
  exit 3
fi

OUT=$LOGS_DIR/daemon_stdout.log
nohup "$PY" -m daemon --config "$CONFIG" >>"$OUT" 2>&1 </dev/null &
pid=$!
# Wait until the new daemon holds the lock (or has died: then say why).
for _ in $(seq 1 300); do
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid" && code=0 || code=$?
    if [ "$code" = 3 ]; then
      echo "traind is already running for $CONFIG (pid $(running_pid)); refusing to start a second daemon" >&2
      exit 3
    else
      echo "traind exited at start (code $code); last lines of $OUT:" >&2
      tail -n 20 "$OUT" >&2
    fi
    exit 1
  fi
  if ! flock -n "$LOCK" true && [ "$(running_pid)" = "$pid" ]; then
    echo "traind started (pid $pid, config $CONFIG, log $LOGS_DIR)"
    exit 0
  fi
  sleep 0.1
done
echo "traind (pid $pid) did not take its lock within 30 s; see $OUT" >&2
exit 1
