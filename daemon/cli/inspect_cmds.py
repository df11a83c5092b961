"""trainctl sample / eval: look at what the adapter learnt, in this process, beside a running daemon.

The torch side (daemon/train/inspect.py) is imported only when one of these runs, so every other
command stays as light as before.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.cli.shared import out, with_config
from daemon.config import Config

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    s = subparsers.add_parser("sample", parents=[common], help="generate from base + adapter (chat template)")
    s.add_argument("prompt")
    s.add_argument("--adapter", default="current", help="current (default), none, or a version number")
    s.add_argument("--max-new-tokens", type=_positive, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--local", action="store_true",
                   help="load the model in this process even where traind serve runs (which answers at once otherwise)")
    s.set_defaults(handler=with_config(cmd_sample))
    e = subparsers.add_parser("eval", parents=[common], help="loss and token accuracy of base vs adapter on FILE")
    e.add_argument("file")
    e.add_argument("--adapter", default="current", help="current (default), none, or a version number")
    e.add_argument("--max-examples", type=_positive, default=0, help="score only the first N examples")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(handler=with_config(cmd_eval))


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _quiet() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


def cmd_sample(cfg: Config, args: argparse.Namespace) -> int:
    if not args.local and args.device == "cpu":
        answered = _sample_via_serve(cfg, args)
        if answered is not None:
            return answered
    from daemon.train.inspect import load_view, sample

    _quiet()
    view = load_view(cfg, args.adapter, args.device)
    out(f"[{view.label}]")
    out(sample(view, args.prompt, args.max_new_tokens, args.temperature))
    return 0


def _sample_via_serve(cfg: Config, args: argparse.Namespace) -> int | None:
    """Ask a running `traind serve` (its model is loaded already: an answer in a moment, not a model load per
    call); None where none runs or it cannot be reached, and the model is loaded here instead."""
    import urllib.error
    import urllib.request

    from daemon import serve_view
    info = serve_view.read_serve(cfg.path("status"))
    if info is None or not info["running"] or info.get("state") != "ready":
        return None
    which = args.adapter.lower()
    model = {"current": "traind", "none": "traind:base"}.get(which, f"traind:v{which.removeprefix('v')}")
    body = {"model": model, "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_new_tokens, "temperature": args.temperature}
    try:
        token = (cfg.path("status") / "monitor_token").read_text(encoding="ascii").strip()
        request = urllib.request.Request(f"{serve_view.url(info)}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        if e.code in (400, 404):  # the question or the version is wrong: loading the model here would not help
            print(f"trainctl sample: {message}", file=sys.stderr)
            return 1
        print(f"trainctl sample: traind serve said {e.code} ({message}); loading the model here instead", file=sys.stderr)
        return None
    except (OSError, ValueError) as e:
        print(f"trainctl sample: traind serve did not answer ({e}); loading the model here instead", file=sys.stderr)
        return None
    name = answer["model"]
    out(f"[{'base' if name == 'traind:base' else 'adapter ' + name.removeprefix('traind:')}, answered by traind serve]")
    out(answer["choices"][0]["message"]["content"])
    return 0


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as a data file, in a few words; None when it can."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a directory"
    if not path.is_file():
        return "not a regular file"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return (e.strerror or str(e)).lower()
    return None


def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    # Checked before anything loads: a typo costs no model load and no traceback.
    why = unreadable(Path(args.file))
    if why is not None:
        out(f"trainctl: eval: {args.file}: {why}")
        return 1
    from daemon.train.inspect import compare_on_file, load_view

    _quiet()
    view = load_view(cfg, args.adapter, args.device)
    figures = compare_on_file(cfg, view, Path(args.file), args.max_examples)
    if args.json:
        out(json.dumps(figures, indent=2))
        return 0
    out(f"{figures['file']}: {figures['examples']} examples ({figures['format']}), {figures['base']['tokens']:,} scored tokens")
    rows = [(figures[key].get("label", key), figures[key]) for key in ("base", "adapter") if key in figures]
    width = max(len(label) for label, _ in rows)
    out(f"  {'':<{width}} {'loss':>8} {'token acc':>10}")
    for label, f in rows:
        out(f"  {label:<{width}} {f['loss']:>8.4f} {f['token_accuracy']:>9.1%}")
    if "adapter" in figures:
        out(f"  the adapter changes the loss by {figures['adapter']['loss'] - figures['base']['loss']:+.4f}")
    return 0
