"""traind monitor: a FastAPI server and a static dashboard for a running daemon.

    python -m monitor --config config.json            # http://127.0.0.1:8080/
    traind-monitor --config config.json --host 0.0.0.0 --port 9000

It reads what the service writes (`status/training_status.json`,
`status/history.db`, `queue/**`) and writes only control requests (through
`daemon.control`, like `trainctl`) and uploads into `inbox/` (temp name, then
rename). It never imports torch, so it starts in well under a second, and it
keeps serving (and says so) when the daemon is down.

The access token lives in `status/monitor_token` (0600, made on first start).

Modules: `app` (the FastAPI app), one router per concern (`status_api`, `history`, `activity_api`,
`queue_view`, `resources`, `events`, `metrics`, `control_api`, `upload`), `models` (the response models),
`deps` (per-app state), `auth`, `security`, `settings`, `listen` (its sockets), `liveness` (is the daemon
alive), `host` and `gpu` (the machine's figures), `history_index` (a month of steps downsampled fast).
"""
