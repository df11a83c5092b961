"""Torn status reads: readers hammer `training_status.json` while the service's writer rewrites it.

    .venv/bin/python -m bench.torn_status --seconds 10 --readers 2 --out bench/results/torn-status-<stamp>.json

One process rewrites the status file as fast as it can through the service's own
writer (`daemon.status.StatusWriter`: temp file, fsync, rename, fsync the folder),
each snapshot carrying a sequence number in three fields (`current_step`,
`global_step`, `total_steps`) and a padding string of a length that depends on
it, so a mix of two writes shows; reader processes read it the way the monitor
and `trainctl` do (`daemon.status.read_status`) and also with a plain
open + json.load. A torn read is one that does not parse, comes back empty, or
whose three fields disagree or whose padding does not match. Also counted: the
reads that saw no file at all (there must be none: the rename replaces it).
`--in-place` is the control: the same writes done in place (open, write), as a
writer without the temp-and-rename would; the method must see torn reads there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daemon.schema import TrainingStatus  # noqa: E402
from daemon.status import STATUS_FILE, StatusWriter, read_status  # noqa: E402


def pad(n: int) -> str:
    return "x" * (n % 4000)  # sizes from a few hundred bytes to a few KB: writes of differing length


def writer(folder: str, seconds: float, out: Any, in_place: bool = False) -> None:
    w = StatusWriter(folder)
    if in_place:  # the control: no temp file, no rename
        w.write = lambda status: w.path.write_text(json.dumps(status.to_dict()))  # type: ignore[method-assign]
    st = TrainingStatus()
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        n += 1
        st.current_step = st.global_step = st.total_steps = n
        st.detail = pad(n)
        w.write(st)
    out.put({"writes": n})


def reader(folder: str, seconds: float, out: Any) -> None:
    path = Path(folder) / STATUS_FILE
    counts = {"reads": 0, "torn": 0, "missing": 0, "stale_or_none": 0}
    examples: list[str] = []
    end = time.monotonic() + seconds
    plain = False
    while time.monotonic() < end:
        plain = not plain  # alternate: the product's reader, and a plain json.load
        counts["reads"] += 1
        try:
            if plain:
                with open(path, encoding="utf-8") as f:
                    d = json.load(f)
            else:
                d = read_status(folder)
                if d is None:  # read_status hides a parse error as None: count it as torn if the file exists
                    counts["stale_or_none"] += 1
                    continue
        except FileNotFoundError:
            counts["missing"] += 1
            continue
        except ValueError as e:
            counts["torn"] += 1
            examples.append(f"does not parse: {e}")
            continue
        n = d.get("current_step")
        if not (n == d.get("global_step") == d.get("total_steps") and d.get("detail") == pad(n or 0)):
            counts["torn"] += 1
            examples.append(f"fields disagree: {n}, {d.get('global_step')}, {d.get('total_steps')}")
    out.put({**counts, "examples": examples[:5]})


def measure(seconds: float, readers: int, in_place: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        StatusWriter(folder).write(TrainingStatus())
        q: Any = mp.get_context("spawn").Queue()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=writer, args=(folder, seconds, q, in_place))]
        procs += [ctx.Process(target=reader, args=(folder, seconds, q)) for _ in range(readers)]
        for p in procs:
            p.start()
        results = [q.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join()
    w = next(r for r in results if "writes" in r)
    rs = [r for r in results if "reads" in r]
    return {"seconds": seconds, "readers": readers, "in_place": in_place, "writes": w["writes"],
            "reads": sum(r["reads"] for r in rs), "torn": sum(r["torn"] for r in rs),
            "missing": sum(r["missing"] for r in rs), "read_status_none": sum(r["stale_or_none"] for r in rs),
            "examples": [e for r in rs for e in r["examples"]][:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.torn_status", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--in-place", action="store_true", help="the control: write in place (torn reads expected)")
    args = ap.parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"stamp": stamp, "command": " ".join(["python -m bench.torn_status", *(argv or sys.argv[1:])]),
              **measure(args.seconds, args.readers, args.in_place)}
    out = args.out or REPO / "bench" / "results" / f"torn-status-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    bad = result["torn"] or result["missing"] or result["read_status_none"]
    return int(not bad) if args.in_place else int(bool(bad))


if __name__ == "__main__":
    sys.exit(main())
