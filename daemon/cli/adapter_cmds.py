"""trainctl adapters list / pin / unpin / accept / reject: the published adapter versions, which ones retention
keeps, and the version the forgetting gate holds."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from daemon import adapters, control
from daemon.cli.shared import WAIT_SECONDS, daemon_pid, from_history, number, out, with_config
from daemon.config import Config
from daemon.errors import TraindError
from daemon.states import ControlAction

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    a = subparsers.add_parser("adapters", parents=[common], help="the published adapter versions")
    sub = a.add_subparsers(dest="acmd", required=True)
    ls = sub.add_parser("list", parents=[common], help="every kept version: file, steps, losses, size, pinned")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=with_config(cmd_adapters_list))
    for name, what in (("pin", "keep VERSION whatever adapters.keep_last says"), ("unpin", "let retention remove VERSION again")):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("version", type=_version)
        p.set_defaults(handler=with_config(cmd_adapters_pin), pinned=name == "pin")
    for name, what in (("accept", "make the VERSION the forgetting gate holds current (its file is learnt); training resumes"),
                       ("reject", "drop the VERSION the forgetting gate holds (its file fails, reason forgetting); training resumes")):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("version", type=_version)
        p.add_argument("--no-wait", action="store_true", help="leave the request and return")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the result (default 120)")
        p.set_defaults(handler=with_config(cmd_decide_held), accept=name == "accept")
    rb = subparsers.add_parser("rollback", parents=[common],
                               help="make adapter VERSION current again (a file in training starts over on it)")
    rb.add_argument("version", type=_version)
    rb.add_argument("--no-wait", action="store_true", help="leave the request and return")
    rb.set_defaults(handler=with_config(cmd_rollback))
    c = subparsers.add_parser("consolidate", parents=[common],
                              help="merge the adapter into a new base (between files) and train on from it")
    c.add_argument("--description", required=True, help="what was trained (kept in the new base's lineage.json)")
    c.add_argument("--force", action="store_true",
                   help="merge even while a probe is over forgetting.max_probe_increase since the generation began")
    c.add_argument("--no-wait", action="store_true", help="leave the request and return")
    c.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result (default 3600)")
    c.set_defaults(handler=with_config(cmd_consolidate))


def _version(text: str) -> int:
    try:
        v = int(text.lower().removeprefix("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an adapter version: {text!r} (e.g. 12 or v12)") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"adapter versions start at 1, got {v}")
    return v


def rows(cfg: Config) -> list[dict[str, Any]]:
    """Every kept version, oldest first, as `adapters list --json` prints it."""
    folder = cfg.path("adapters")
    current = adapters.peek_current(folder)
    pins = control.read_pins(cfg)
    out_rows = []
    for v in adapters.versions(folder):
        m = v.manifest
        out_rows.append({
            "version": v.version, "current": current is not None and v.version == current.version,
            "pinned": v.version in pins, "file": m.original_name, "job_id": m.job_id, "steps": m.steps,
            "global_step": m.global_step, "final_loss": m.final_loss, "eval_loss": m.eval_loss,
            "created_at": m.created_at, "bytes": adapters.folder_bytes(v.path), "rollback_of": m.rollback_of,
            "path": str(v.path), "generation": m.generation, "consolidated_from": m.consolidated_from,
            "description": m.description, "held": m.held,
            "forgetting": _forgetting_line(m.forgetting),
        })
    return out_rows


def cmd_adapters_list(cfg: Config, args: argparse.Namespace) -> int:
    listed = rows(cfg)
    if args.json:
        out(json.dumps(listed, indent=2))
        return 0
    if not listed:
        out("no adapter yet: the first one is published when the first file is done")
        return 0
    out(f"{'':2}{'version':>7}  {'steps':>6}  {'loss':>7}  {'eval':>7}  {'size':>9}  {'created':<20} file")
    for r in listed:
        mark = ("*" if r["current"] else " ") + ("p" if r["pinned"] else " ")
        what = r["file"] or ""
        steps = number(r["steps"], "d")
        if r["rollback_of"]:
            what = f"rollback to v{r['rollback_of']}"
        if r["held"]:
            mark, what = "h ", f"{what} (held by the forgetting gate: accept or reject it)"
        if r["consolidated_from"] is not None:  # a fresh adapter on a merged base: a start, not a file of 0 steps
            desc = f' ("{r["description"]}")' if r["description"] else ""
            what, steps = f"generation {r['generation']} starts: v{r['consolidated_from']} merged into the base{desc}", "-"
        out(f"{mark}{('v' + str(r['version'])):>7}  {steps:>6}  {number(r['final_loss'], '.4f'):>7}  "
            f"{number(r['eval_loss'], '.4f'):>7}  {r['bytes'] / 1e6:>7.2f}MB  {r['created_at'] or '':<20} {what}")
    keep = cfg.adapters.keep_last
    out(f"* current, p pinned, h held; retention keeps {'every version' if keep == 0 else f'the newest {keep}'}, "
        "the current one and the pinned ones")
    return 0


def cmd_adapters_pin(cfg: Config, args: argparse.Namespace) -> int:
    kept = {v.version for v in adapters.versions(cfg.path("adapters"))}
    if args.pinned and args.version not in kept:
        raise TraindError(f"there is no adapter v{args.version} (kept: {', '.join(f'v{v}' for v in sorted(kept)) or 'none'})")
    pinned = control.read_pins(cfg)
    if not args.pinned and args.version not in pinned:
        raise TraindError(f"adapters: v{args.version} is not pinned (pinned: "
                          f"{', '.join(f'v{v}' for v in sorted(pinned)) or 'none'}); nothing to unpin")
    pins = control.set_pin(cfg, args.version, args.pinned)
    out(f"adapters: v{args.version} {'pinned' if args.pinned else 'unpinned'} (pinned now: "
        f"{', '.join(f'v{v}' for v in sorted(pins)) or 'none'})")
    return 0


def cmd_rollback(cfg: Config, args: argparse.Namespace) -> int:
    folder = cfg.path("adapters")
    why = adapters.rollback_refusal(folder, args.version)
    if why is not None:  # refused before asking the daemon: nothing is interrupted
        out(f"rollback: refused: {why}")
        return 1
    before, asked = adapters.peek_current(folder), time.time()
    req = control.request(cfg, ControlAction.ROLLBACK, by="cli", version=args.version)
    if daemon_pid(cfg) is None:
        out(f"rollback: to v{args.version} requested; the daemon is not running, it acts at its next start")
        return 0
    if args.no_wait:
        out(f"rollback: to v{args.version} requested")
        return 0
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        now = adapters.peek_current(folder)
        if now is not None and now.manifest.rollback_of == args.version and (before is None or now.version > before.version):
            undone = [e.get("original_name") or e["job_id"] for e in now.manifest.undone]
            out(f"rollback: adapter v{args.version} is current again, as v{now.version}")
            if undone:
                out(f"rollback: no longer in the adapter (not retrained; drop them again to train them): {', '.join(undone)}")
            return 0
        refused = None if req.exists() else _refused(cfg, args.version, asked)
        if refused:
            out(f"rollback: refused: {_reason(refused, 'rollback')}")
            return 1
        time.sleep(0.2)
    out("rollback: requested, but the daemon has not acted yet")
    return 2


def _refused(cfg: Config, version: int, since: float) -> str | None:
    """The daemon's reason for refusing the rollback asked at `since`, from its events (None: none yet)."""
    def read(db: Any) -> str | None:
        for e in db.events(limit=20):
            if e["kind"] == "control_refused" and e["t"] >= since and (e["message"] or "").startswith("rollback"):
                return e["message"]
        return None
    return from_history(cfg, read)


def _reason(message: str, action: str) -> str:
    """A refusal event's reason without the action the event names first ("consolidate: ...", "rollback to
    v2: ..."): the CLI says the action itself."""
    head, sep, rest = message.partition(": ")
    return rest if sep and head.split(" ")[0] == action else message


def _forgetting_line(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What `adapters list --json` says of a version's forgetting report: the gate and the worst change."""
    if not report:
        return None
    return {"tripped": (report.get("gate") or {}).get("tripped", False), "worst": report.get("worst"),
            "backward_transfer": report.get("backward_transfer"), "message": (report.get("gate") or {}).get("message")}


def cmd_decide_held(cfg: Config, args: argparse.Namespace) -> int:
    """accept / reject the version the forgetting gate holds."""
    verb = "accept" if args.accept else "reject"
    folder = cfg.path("adapters")
    held = [v.version for v in adapters.held_versions(folder)]
    if args.version not in held:
        out(f"{verb}: refused: adapter v{args.version} is not held"
            + (f" (v{held[0]} is)" if held else " (no version is held)"))
        return 1
    control.request(cfg, ControlAction.ACCEPT if args.accept else ControlAction.REJECT, by="cli", version=args.version)
    if daemon_pid(cfg) is None:
        out(f"{verb}: v{args.version} requested; the daemon is not running, it acts at its next start")
        return 0
    if args.no_wait:
        out(f"{verb}: v{args.version} requested")
        return 0
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        now = adapters.peek_current(folder)
        if args.accept and now is not None and now.version == args.version:
            out(f"accept: adapter v{args.version} is current; training resumes")
            return 0
        if not args.accept and not (folder / adapters.version_dir_name(args.version)).exists():
            out(f"reject: adapter v{args.version} dropped; its file is in failed/ (reason forgetting); training resumes")
            return 0
        time.sleep(0.3)
    out(f"{verb}: requested, but the daemon has not acted yet (see `trainctl status`)")
    return 2


def cmd_consolidate(cfg: Config, args: argparse.Namespace) -> int:
    if not args.description.strip():
        raise TraindError("consolidate: --description must say what was trained")
    current = adapters.peek_current(cfg.path("adapters"))
    if current is None:
        raise TraindError("consolidate: no adapter has been published yet; there is nothing to merge")
    running = daemon_pid(cfg) is not None
    # Down, the daemon merges the current version at its next start (no file starts before it): judged now.
    why = None if running else adapters.nothing_learnt(current)
    if why is not None:
        out(f"consolidate: refused: {why}")
        return 1
    asked = time.time()
    control.request(cfg, ControlAction.CONSOLIDATE, by="cli", description=args.description, force=args.force)
    if not running:
        out("consolidate: requested; the daemon is not running, it acts at its next start")
        return 0
    if args.no_wait:
        out("consolidate: requested; it runs at the next boundary between files")
        return 0
    out("consolidate: requested; waiting for the file in training (if any) to end, then merging")
    deadline = asked + args.timeout
    while time.time() < deadline:
        ended = from_history(cfg, lambda db: next(
            (e for e in db.events(limit=30) if e["t"] >= asked and (e["kind"] == "consolidated" or (
                e["kind"] == "control_refused" and (e["message"] or "").startswith("consolidate")))), None))
        if ended is not None:
            if ended["kind"] == "consolidated":
                out(f"consolidate: {ended['message']}")
                return 0
            out(f"consolidate: refused: {_reason(ended['message'], 'consolidate')}")
            return 1
        time.sleep(0.5)
    out("consolidate: requested, but no result yet (see `trainctl status` and the daemon log)")
    return 2
