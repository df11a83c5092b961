"""trainctl export: a kept adapter version as a PEFT folder, a merged Hugging Face folder, GGUF files (merged or
LoRA) or an Ollama Modelfile (daemon/train/export.py). Offline; reads the daemon's folders, never writes them, so
it runs whether the daemon runs or not."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.cli.adapter_cmds import _version
from daemon.cli.shared import out, with_config
from daemon.config import Config

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers

FORMATS = ("peft", "gguf-lora", "merged-hf", "merged-gguf", "ollama")  # daemon.train.export.FORMATS, without torch


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    e = subparsers.add_parser("export", parents=[common], help="write adapter VERSION for use outside traind "
                              "(PEFT, merged Hugging Face folder, GGUF, Ollama)")
    e.add_argument("version", type=_version)
    e.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    e.add_argument("--out", required=True, type=Path, help="folder to write (must not exist or be empty)")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out")
    e.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="merged-hf: the saved weights' dtype (default: the base's)")
    e.add_argument("--type", choices=("f16", "q8_0"), default="f16", dest="gguf_type",
                   help="merged-gguf / ollama: the GGUF's tensor type (default f16)")
    e.add_argument("--ollama-from", choices=("auto", "merged", "adapter"), default="auto",
                   help="ollama: FROM the merged GGUF, or FROM the base GGUF + ADAPTER (auto: the adapter where "
                        "the base is a GGUF file)")
    e.add_argument("--json", action="store_true", help="print the export report as JSON")
    e.set_defaults(handler=with_config(cmd_export))


def cmd_export(cfg: Config, args: argparse.Namespace) -> int:
    from daemon.train.export import export

    report = export(cfg, args.version, args.fmt, args.out, force=args.force, dtype=args.dtype,
                    gguf_type=args.gguf_type, ollama_from=args.ollama_from,
                    say=None if args.json else (lambda text: out(f"export: {text}")))
    if args.json:
        out(json.dumps(report.to_dict(), indent=2))
        return 0
    out(f"export: v{report.version} as {report.fmt} in {report.out} ({report.seconds:.1f} s)")
    for name, size in report.files.items():
        out(f"  {name:<28} {size / 2**20:>9.2f} MiB")
    for name, check in report.checks.items():
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items())
        out(f"  check {name}: {figures}")
    for note in report.notes:
        out(f"  note: {note}")
    return 0
