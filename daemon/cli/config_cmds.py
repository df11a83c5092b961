"""trainctl config validate, explain, approve: the config file and its locked keys."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from daemon import lockedkeys
from daemon.cli.shared import lock_path, out, with_config
from daemon.config import Config, explain, load_config
from daemon.errors import ConfigError, TraindError
from daemon.lock import acquire

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    c = subparsers.add_parser("config", parents=[common], help="check, explain, approve the config")
    cs = c.add_subparsers(dest="ccmd", required=True)
    # validate and explain must work on a config that does not load, so they take no Config
    cs.add_parser("validate", parents=[common], help="list every problem at once").set_defaults(handler=cmd_config_validate)
    cs.add_parser("explain", parents=[common], help="every key with its default and meaning").set_defaults(handler=cmd_config_explain)
    cs.add_parser("approve", parents=[common], help="accept changed locked keys (daemon stopped)").set_defaults(
        handler=with_config(cmd_config_approve))


def cmd_config_validate(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        out(str(e))
        return 1
    changes = lockedkeys.check(cfg)
    if changes:
        out(f"{args.config}: valid, but {len(changes)} locked key(s) differ from the adapter's:")
        for k, old, new in changes:
            out(f"  - {k}: adapter was trained with {old!r}, config says {new!r}")
        out("the daemon will refuse to start until you restore them or run `trainctl config approve`")
        return 1
    out(f"{args.config}: valid")
    return 0


def cmd_config_explain(args: argparse.Namespace) -> int:
    for key, default, help_text in explain():
        out(f"{key} = {json.dumps(default)}\n    {help_text}")
    return 0


def cmd_config_approve(cfg: Config, args: argparse.Namespace) -> int:
    changes = lockedkeys.check(cfg)
    if not changes:
        out("config approve: no locked key differs; nothing to approve")
        return 0
    try:
        fd = acquire(lock_path(cfg))
    except TraindError as e:
        out(f"config approve: stop the daemon first ({e})")
        return 1
    try:
        moved = lockedkeys.approve(cfg)
    finally:
        os.close(fd)
    for k, old, new in changes:
        out(f"approved {k}: {old!r} -> {new!r}")
    for m in moved:
        out(f"archived {m}")
    return 0
