"""The layering rule, checked: the service, the CLI and the monitor never import the torch stack.

Every module of `daemon/` outside `daemon/train/`, and every module of
`monitor/`, is found on disk (so a new module is covered without editing this
test), imported in one fresh interpreter, and the heavy libraries must then be
absent from `sys.modules`. The trainer side is the one place they belong.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "daemon.train")


def light_modules() -> list[str]:
    """Every module of the service, the CLI and the monitor, found on disk."""
    names = []
    for pkg in ("daemon", "monitor"):
        names.append(pkg)
        for mod in pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}."):
            if mod.name == "daemon.train" or mod.name.startswith("daemon.train."):
                continue
            names.append(mod.name)
    return sorted(names)


def imported_after(modules: list[str]) -> dict[str, list[str]]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps({{h: sorted(m for m in sys.modules if m == h or m.startswith(h + '.')) for h in {HEAVY!r}}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_walk_finds_the_service_cli_and_monitor() -> None:
    names = light_modules()
    for expected in ("daemon.service", "daemon.__main__", "daemon.cli", "daemon.schema", "monitor.app",
                     "monitor.__main__", "monitor.models"):
        assert expected in names
    assert not any(n.startswith("daemon.train") for n in names)
    assert len(names) > 40, names


def test_service_cli_and_monitor_import_no_torch_stack() -> None:
    found = imported_after(light_modules())
    assert found == {h: [] for h in HEAVY}, {h: m[:5] for h, m in found.items() if m}


def test_the_check_sees_a_heavy_import() -> None:
    """The same probe flags the trainer side, which does import torch: the check can fail."""
    found = imported_after(["daemon.train.loop"])
    assert found["torch"] and found["daemon.train"]


def decoy(tmp_path: Path) -> Path:
    """A regular package named `daemon` (and one named `monitor`), as python-daemon installs one: importing
    either fails loudly."""
    for name in ("daemon", "monitor"):
        (tmp_path / "decoy" / name).mkdir(parents=True)
        (tmp_path / "decoy" / name / "__init__.py").write_text(f"raise ImportError('the decoy {name} was imported')\n")
    return tmp_path / "decoy"


def test_traind_wins_over_another_installed_package_named_daemon(tmp_path: Path) -> None:
    """Another distribution's `daemon` (or `monitor`) earlier on the path than site-packages: traind's own are
    imported, from the repository (how bin/, the systemd unit and the tests run it) and through the console
    scripts run from anywhere (#27: a namespace package lost to it)."""
    import os

    env = dict(os.environ, PYTHONPATH=str(decoy(tmp_path)))
    bin_dir = Path(sys.executable).parent
    runs = [
        ([sys.executable, "-m", "daemon", "--help"], REPO, "traind"),
        ([sys.executable, "-m", "daemon.cli", "--help"], REPO, "trainctl"),
        ([sys.executable, "-m", "monitor", "--help"], REPO, "traind-monitor"),
        ([str(bin_dir / "trainctl"), "--help"], tmp_path, "trainctl"),
        ([str(bin_dir / "traind"), "--help"], tmp_path, "traind"),
        ([str(bin_dir / "traind-monitor"), "--help"], tmp_path, "traind-monitor"),
    ]
    for argv, cwd, prog in runs:
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"usage: {prog}" in out.stdout, (argv, cwd, out.stderr[-400:])
    assert (REPO / "daemon" / "__init__.py").is_file()  # a regular package: a namespace one loses to the decoy


def imports_of(path: Path) -> set[str]:
    """The modules a file imports (at any depth in it: lazy imports count), as written."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def reaching_into(folder: Path, forbidden: str, root: Path = REPO) -> dict[str, list[str]]:
    """Each module of `folder` (its path from `root`) that imports `forbidden` or a module under it: what."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        bad = sorted(m for m in imports_of(path) if m == forbidden or m.startswith(forbidden + "."))
        if bad:
            found[str(path.relative_to(root))] = bad
    return found


def test_the_trainer_and_the_shared_modules_never_import_the_service() -> None:
    """docs/internals.md's layout: `daemon/service/` is the daemon process alone. The trainer child talks to it
    only through `daemon.protocol`; the shared modules (`daemon/*.py`) are used by all four parts, so one that
    reached into the service would drag it into the CLI, the monitor and the trainer. `daemon/__main__.py`
    starts the service: the one exception."""
    assert reaching_into(REPO / "daemon" / "train", "daemon.service") == {}
    shared = reaching_into(REPO / "daemon", "daemon.service")
    assert shared == {"daemon/__main__.py": ["daemon.service", "daemon.service.EXIT_ALREADY_RUNNING",
                                             "daemon.service.Service"]}


def test_the_layering_check_sees_an_import(tmp_path: Path) -> None:
    (tmp_path / "leaky.py").write_text("def f():\n    from daemon.service.tracker import JobTracker\n")
    assert reaching_into(tmp_path, "daemon.service", root=tmp_path) == {
        "leaky.py": ["daemon.service.tracker", "daemon.service.tracker.JobTracker"]}
