"""trainctl: control and inspect a traind instance.

    trainctl status [--watch [SECONDS]] [--json]
    trainctl health [--deep] [--json] | logs [-f] [-n N] [--trainer]
    trainctl activity [--job NAME] [--top K] [--measure M] [--json]
    trainctl forgetting [--generation G] [--files N] [--json]
    trainctl pause | resume | skip | stop [--no-wait]
    trainctl queue add FILE [--priority high|normal|low] [--force]
    trainctl queue list [--json] | queue status | queue retry NAME [--priority P] | queue remove NAME
    trainctl adapters list [--json] | adapters pin VERSION | adapters unpin VERSION
    trainctl rollback VERSION | consolidate --description TEXT
    trainctl export VERSION --format peft|gguf-lora|merged-hf|merged-gguf|ollama --out DIR [--force]
    trainctl sample PROMPT [--adapter A] | eval FILE [--adapter A] [--json]
    trainctl config validate | config explain | config approve

Every command takes `--config PATH` (default: $TRAIND_CONFIG or ./config.json).
Requests are files the daemon consumes, so they work while the monitor is down
and wait in line while the daemon is down. Exit codes: 0 done, 1 refused or
failed, 2 timed out waiting for the daemon to act.
"""

# Layout, as git and pip lay theirs out: `dispatch` builds the parser and runs the
# chosen command; one module per command group (`status_cmds`, `control_cmds`,
# `queue_cmds`, `activity_cmds`, `forgetting_cmds`, `adapter_cmds`, `export_cmds`, `inspect_cmds`, `config_cmds`), each with one `register(subparsers, common)`; what
# more than one group uses lives in `shared`. A new group is a new module plus one
# entry in `dispatch.GROUPS`. The `_cmds` suffix keeps the names apart from the
# shared modules (`daemon.status`, `daemon.control`, `daemon.config`) and
# from the standard library's `queue`.

from daemon.cli.dispatch import main

__all__ = ["main"]
