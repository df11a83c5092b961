"""The console scripts' entry points: `traind`, `trainctl` and `traind-monitor` start here.

traind's packages are named `daemon` and `monitor`, and other distributions use those names too (python-daemon
installs a regular package `daemon`). A console script runs with its own folder first on the path, so an
installed package of the same name would be imported in place of traind's: this module, which sits beside
traind's packages (the repository in an editable install, site-packages otherwise), puts that folder first
before it imports them. `python -m daemon` from the repository needs no help: the folder is first already, and
`daemon` is a regular package, which a namespace portion elsewhere cannot shadow (tests/test_imports.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HOME = str(Path(__file__).resolve().parent)


def _ours_first() -> None:
    if sys.path[:1] != [_HOME]:
        sys.path.insert(0, _HOME)


def traind() -> int:
    _ours_first()
    from daemon.__main__ import main

    return main()


def trainctl() -> int:
    _ours_first()
    from daemon.cli import main

    return main()


def traind_monitor() -> int:
    _ours_first()
    from monitor.__main__ import main

    return main()
