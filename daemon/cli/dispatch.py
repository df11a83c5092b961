"""trainctl's parser and dispatch: the common `--config`, the command groups, errors to exit codes."""

from __future__ import annotations

import argparse
import os
import signal

from daemon.cli import (activity_cmds, adapter_cmds, config_cmds, control_cmds, export_cmds, forgetting_cmds, inspect_cmds,
                        queue_cmds, status_cmds)
from daemon.cli.shared import Handler, out
from daemon.errors import TraindError

# Each group registers its subcommands; this order is the order of `trainctl --help`.
GROUPS = (status_cmds, activity_cmds, forgetting_cmds, control_cmds, queue_cmds, adapter_cmds, export_cmds, inspect_cmds,
          config_cmds)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: $TRAIND_CONFIG or ./config.json)")
    p = argparse.ArgumentParser(prog="trainctl", parents=[common], description="Control and inspect a traind daemon.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in GROUPS:
        group.register(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `trainctl queue list | head` ends quietly
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None) or os.environ.get("TRAIND_CONFIG", "config.json")
    try:
        handler: Handler = args.handler  # set by the group's register()
        return handler(args)
    except TraindError as e:
        out(f"trainctl: {e}")
        return 1
