"""trainctl config validate, explain, approve: the config file and its locked keys."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
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
    ap = cs.add_parser("approve", parents=[common], help="accept changed locked keys (daemon stopped)")
    ap.add_argument("--from-config-base", action="store_true",
                    help="a new adapter starts on base_model (generation 0), not on the newest consolidated base")
    ap.set_defaults(handler=with_config(cmd_config_approve))


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
    """Every key with its help text, the value the config file gives it and the default, side by side."""
    values, header = _explained_values(args.config)
    out(header)
    for key, default, help_text in explain():
        if values is None:
            out(f"  {key}   (default {json.dumps(default)})")
        else:
            value = values(key, default)
            mark, note = (" ", "default") if _is_default(value, default) else ("*", f"default {json.dumps(default)}")
            out(f"{mark} {key} = {json.dumps(value)}   ({note})")
        out(f"      {help_text}")
    return 0


def _is_default(value: object, default: object) -> bool:
    """2 and 2.0 are the same setting (a float key reads an int as a float); 1 is not true."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def _explained_values(path: str) -> tuple[Callable[[str, object], object] | None, str]:
    """How to read each key's value from the config at `path` (None: defaults only), and the header line.

    A config that loads gives every value as the daemon would use it; one that parses but does not
    validate gives the values it sets, as written; one that does not parse gives none."""
    where = Path(path).expanduser().resolve()
    try:
        cfg = load_config(where)
    except ConfigError as e:
        try:
            raw = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = None
        if not isinstance(raw, dict):
            return None, f"config explain: {where} does not load ({e.problems[0]}): the defaults only"
        header = (f"config explain: {where} does not load ({len(e.problems)} problem(s); `trainctl config validate` "
                  "lists them): the values it sets, where they fit (* where they differ from the default)")
        return (lambda key, default: _raw_value(raw, key, default)), header
    return (lambda key, default: _loaded_value(cfg, key)), f"config explain: {where} (* where it differs from the default)"


def _loaded_value(cfg: Config, key: str) -> object:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name) if name else getattr(cfg, section)


def _raw_value(raw: dict, key: str, default: object) -> object:
    section, _, name = key.partition(".")
    if not name:
        return raw.get(section, default)
    part = raw.get(section)
    return part.get(name, default) if isinstance(part, dict) else default


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
        done = lockedkeys.approve(cfg, from_config_base=args.from_config_base)
    finally:
        os.close(fd)
    for k, old, new in done.changes:
        out(f"approved {k}: {old!r} -> {new!r}")
    for m in done.archived:
        out(f"archived {m}")
    on = done.continues_on
    if on is not None:
        out(f"training continues on generation {on['generation']}'s base {on['base_path']} with a fresh adapter "
            "(the files merged into that base stay learnt; `--from-config-base` would start on base_model instead)")
    elif done.new_adapter:
        out(f"training starts a fresh adapter on base_model {cfg.base_model} (generation 0)")
    else:
        out("the adapter is kept; a file in progress starts again from its beginning on it")
    if done.series is not None:
        out(f"the loss chart starts a new series of steps (series {done.series}); the earlier steps stay in "
            f"history.db (GET /api/history?series={done.series - 1})")
    if done.history_error:
        out(f"config approve: history.db was not updated ({done.history_error}); the approval stands")
    return 0
