#!/usr/bin/env bash
# Install traind as a systemd service that starts at boot and restarts on failure.
#
#   bin/install_service.sh [--config PATH] [--user | --system] [--with-monitor [--port N]] [--print]
#
# --config defaults to $TRAIND_CONFIG, else the repository's config.json; a relative path is taken
# from the current folder. --user (default) writes ~/.config/systemd/user/traind.service (enable lingering with
# `loginctl enable-linger $USER` so it runs without a login); --system writes
# /etc/systemd/system/traind.service (as root; the service runs as the invoking user).
# --print only prints the unit(s). The daemon runs in the foreground under systemd with the
# same single-instance guard as the launch script (its kernel lock): a second instance, a bad
# config or changed locked keys exit 3, 1 or 2, and systemd does not restart those; any other
# exit restarts it after 10 s. SIGTERM is traind's warm stop (checkpoint, then exit).
set -euo pipefail
# A relative --config (or $TRAIND_CONFIG) names a file in the caller's folder, as it does for trainctl:
# it is made absolute here, before anything changes directory.
CALLER=$PWD
from_caller() { case "$1" in /*) echo "$1" ;; "~"|"~/"*) echo "$HOME${1#"~"}" ;; *) echo "$CALLER/$1" ;; esac; }
cd "$(dirname "$0")/.."
ROOT=$PWD
CONFIG=$(from_caller "${TRAIND_CONFIG:-$ROOT/config.json}")
MODE=user
PRINT=0
MONITOR=0
PORT=8080
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || { echo "$0: --config needs a path" >&2; exit 64; }; CONFIG=$(from_caller "$2"); shift 2 ;;
    --user) MODE=user; shift ;;
    --system) MODE=system; shift ;;
    --with-monitor) MONITOR=1; shift ;;
    --port) [ $# -ge 2 ] || { echo "$0: --port needs a number" >&2; exit 64; }; PORT=$2; shift 2 ;;
    --print) PRINT=1; shift ;;
    *) echo "usage: $0 [--config PATH] [--user | --system] [--with-monitor [--port N]] [--print]" >&2; exit 64 ;;
  esac
done
if [ ! -f "$CONFIG" ]; then
  [ -e "$CONFIG" ] && echo "${0##*/}: $CONFIG is not a file" >&2 || echo "${0##*/}: no config file at $CONFIG" >&2
  exit 1
fi
CONFIG=$(realpath "$CONFIG")
PY=${TRAIND_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "$0: $PY not found: run bin/setup.sh first" >&2; exit 1; }
if ! verdict=$("$PY" -m daemon.cli --config "$CONFIG" config validate); then
  echo "$verdict" >&2
  exit 1
fi
STOP_TIMEOUT=$("$PY" -c "import sys; from daemon.config import load_config; print(int(load_config(sys.argv[1]).service.stop_timeout_seconds) + 30)" "$CONFIG")
RUN_AS=""
[ "$MODE" = system ] && RUN_AS="User=${SUDO_USER:-$(id -un)}"

daemon_unit() {
  cat <<UNIT
[Unit]
Description=traind: LoRA training daemon for $CONFIG
After=network.target

[Service]
Type=simple
$RUN_AS
WorkingDirectory=$ROOT
Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
ExecStart=$PY -m daemon --config $CONFIG
KillSignal=SIGTERM
# SIGTERM to the service alone: it asks the trainer to checkpoint and waits for it. The default
# (control-group) would signal the trainer too, which must not die before its checkpoint.
KillMode=mixed
TimeoutStopSec=$STOP_TIMEOUT
Restart=on-failure
RestartSec=10
# 1 bad config, 2 locked keys changed, 3 another instance holds the lock: restarting would not help
RestartPreventExitStatus=1 2 3

[Install]
WantedBy=$([ "$MODE" = system ] && echo multi-user.target || echo default.target)
UNIT
}

monitor_unit() {
  cat <<UNIT
[Unit]
Description=traind monitor (dashboard and API) for $CONFIG
After=traind.service

[Service]
Type=simple
$RUN_AS
WorkingDirectory=$ROOT
ExecStart=$PY -m monitor --config $CONFIG --port $PORT
Nice=10
Restart=on-failure
RestartSec=5

[Install]
WantedBy=$([ "$MODE" = system ] && echo multi-user.target || echo default.target)
UNIT
}

if [ "$PRINT" = 1 ]; then
  daemon_unit
  [ "$MONITOR" = 1 ] && { echo; monitor_unit; }
  exit 0
fi
if [ "$MODE" = system ]; then DIR=/etc/systemd/system; CTL="systemctl"; else DIR=$HOME/.config/systemd/user; CTL="systemctl --user"; fi
mkdir -p "$DIR"
daemon_unit > "$DIR/traind.service"
[ "$MONITOR" = 1 ] && monitor_unit > "$DIR/traind-monitor.service"
echo "wrote $DIR/traind.service$([ "$MONITOR" = 1 ] && echo " and $DIR/traind-monitor.service")"
if command -v systemctl >/dev/null 2>&1 && $CTL daemon-reload 2>/dev/null; then
  echo "now: $CTL enable --now traind$([ "$MONITOR" = 1 ] && echo " traind-monitor")"
else
  echo "systemd is not running here; on the target machine: $CTL daemon-reload && $CTL enable --now traind"
fi
