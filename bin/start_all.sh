#!/usr/bin/env bash
# Start the whole traind stack: environment, daemon, monitor.
#
#   bin/start_all.sh [--config PATH] [--no-examples] [--port N]
#   bin/start_all.sh --model smollm2          # a real pretrained model in its own instance (README, Real models)
#
# --config defaults to $TRAIND_CONFIG, else the repository's config.json (with --model NAME:
# instances/NAME/config.json); a relative path is taken from the current folder. The monitor's port:
# --port, else $TRAIND_MONITOR_PORT, else the port this instance's monitor last started on
# (status/monitor.port), else 8080 (8081 for --model). A config that does not load, or a port that
# another program holds, is refused before anything starts.
#
# With serve.enabled (the default) it also starts `traind serve`, an OpenAI-compatible endpoint on the model as it
# learns (serve.port, 8090), whose port, when taken, is said and left out.
#
# On the first start of an instance the bundled example data is dropped into
# its inbox, so training begins at once on the embedded tiny model (built
# locally on first use; nothing is downloaded). Stop everything with bin/stop_all.sh.
set -euo pipefail
# A relative --config (or $TRAIND_CONFIG) names a file in the caller's folder, as it does for trainctl:
# it is made absolute here, before anything changes directory.
CALLER=$PWD
from_caller() { case "$1" in /*) echo "$1" ;; "~"|"~/"*) echo "$HOME${1#"~"}" ;; *) echo "$CALLER/$1" ;; esac; }
cd "$(dirname "$0")/.."
ROOT=$PWD
CONFIG=$(from_caller "${TRAIND_CONFIG:-$ROOT/config.json}")
EXAMPLES=1
PORT=${TRAIND_MONITOR_PORT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || { echo "$0: --config needs a path" >&2; exit 64; }; CONFIG=$(from_caller "$2"); shift 2 ;;
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
  [ -n "$PORT" ] || [ -e "$(dirname "$CONFIG")/status/monitor.port" ] || PORT=8081
  EXAMPLES=0
fi

if [ ! -f "$CONFIG" ]; then
  [ -e "$CONFIG" ] && echo "${0##*/}: $CONFIG is not a file" >&2 || echo "${0##*/}: no config file at $CONFIG" >&2
  exit 1
fi
CONFIG=$(realpath "$CONFIG")
if [ -n "$PORT" ] && ! { [[ $PORT =~ ^[0-9]{1,5}$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ]; }; then
  echo "${0##*/}: the port must be a number from 1 to 65535, got '$PORT'" >&2
  exit 64
fi

bin/setup.sh
PY=$ROOT/.venv/bin/python

paths=$("$PY" - "$CONFIG" <<'PYEOF'
import shlex, sys
from daemon.config import load_config
from daemon.errors import ConfigError
try:
    cfg = load_config(sys.argv[1])
except ConfigError as e:  # every problem, as `trainctl config validate` lists them
    print(e, file=sys.stderr)
    sys.exit(1)
for name in ("inbox", "status", "logs"):
    print(f"{name.upper()}_DIR={shlex.quote(str(cfg.path(name)))}")
print(f"SERVE_ENABLED={int(cfg.serve.enabled)}")
print(f"SERVE_URL={shlex.quote(f'http://{cfg.serve.host}:{cfg.serve.port}/v1')}")
PYEOF
) || exit 1
eval "$paths"
MON_PID_FILE=$STATUS_DIR/monitor.pid
MON_PORT_FILE=$STATUS_DIR/monitor.port  # the port the monitor last started on: the next start uses it again
if [ -z "$PORT" ]; then
  PORT=$(tr -dc '0-9' 2>/dev/null <"$MON_PORT_FILE" || true)
  PORT=${PORT:-8080}
fi

# The monitor of this instance may run already; otherwise its port must be free before anything
# starts, so that a port held by another program never leaves a daemon without its monitor.
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
  mon_pid=""
  if ! "$PY" -m monitor --config "$CONFIG" --port "$PORT" --check-port; then
    echo "start_all: nothing was started" >&2
    exit 1
  fi
fi
mkdir -p "$INBOX_DIR" "$STATUS_DIR" "$LOGS_DIR"

if [ $EXAMPLES = 1 ] && [ ! -e "$STATUS_DIR/.examples_seeded" ]; then
  cp examples/chat.jsonl "$INBOX_DIR/example_chat.jsonl.part"
  mv "$INBOX_DIR/example_chat.jsonl.part" "$INBOX_DIR/example_chat.jsonl"
  touch "$STATUS_DIR/.examples_seeded"
  echo "start_all: dropped the bundled example data (examples/chat.jsonl) into $INBOX_DIR"
fi

launch=0
launch_out=$(bin/launch_training_daemon.sh --config "$CONFIG" 2>&1) || launch=$?
if [ $launch = 3 ]; then
  echo "start_all: the daemon is already running (pid $(tr -d '[:space:]' < "$STATUS_DIR/daemon.lock"))"
else
  echo "$launch_out"
  [ $launch = 0 ] || echo "start_all: the daemon did not start (see above); the monitor is started anyway"
fi

if [ -z "$mon_pid" ]; then
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
      daemon_pid=$("$PY" -c 'import sys; from daemon.lock import holder_pid; print(holder_pid(sys.argv[1]) or "")' "$STATUS_DIR/daemon.lock")
      if [ -n "$daemon_pid" ]; then
        echo "start_all: the daemon runs on without a monitor (pid $daemon_pid); bin/stop_all.sh stops it" >&2
      fi
      exit 1
    fi
    if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/health", timeout=1)' "$PORT" 2>/dev/null; then
      up=1; break
    fi
    sleep 0.2
  done
  [ $up = 1 ] || echo "start_all: the monitor (pid $mon_pid) is not answering on port $PORT yet; see $LOGS_DIR/monitor_stdout.log" >&2
fi
echo "$PORT" > "$MON_PORT_FILE"

# traind serve (serve.enabled): the model as an OpenAI-compatible endpoint, and the dashboard's playground. An add-on:
# a port another program holds is said, with the way out, and the rest of the stack runs without it.
SERVE_LINE=""
if [ "$SERVE_ENABLED" = 1 ]; then
  SERVE_PID_FILE=$STATUS_DIR/serve.pid
  serve_pid=$(cat "$SERVE_PID_FILE" 2>/dev/null || true)
  if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null && grep -q serve "/proc/$serve_pid/cmdline" 2>/dev/null; then
    echo "start_all: traind serve already running (pid $serve_pid)"
    SERVE_LINE="start_all: OpenAI API $SERVE_URL  (model traind; api key: the token in $STATUS_DIR/monitor_token)"
  elif serve_err=$("$PY" -m daemon serve --config "$CONFIG" --check-port 2>&1); then
    nohup "$PY" -m daemon serve --config "$CONFIG" >>"$LOGS_DIR/serve_stdout.log" 2>&1 </dev/null &
    echo $! > "$SERVE_PID_FILE"
    SERVE_LINE="start_all: OpenAI API $SERVE_URL  (model traind; api key: the token in $STATUS_DIR/monitor_token; loading the model)"
  else
    echo "start_all: traind serve not started: ${serve_err#traind serve: } (or set serve.enabled false)" >&2
  fi
fi
TOKEN=$(cat "$STATUS_DIR/monitor_token" 2>/dev/null || true)
echo "start_all: dashboard  http://127.0.0.1:$PORT/#token=$TOKEN"
[ -z "$SERVE_LINE" ] || echo "$SERVE_LINE"
echo "start_all: status     $ROOT/.venv/bin/trainctl --config $CONFIG status --watch"
