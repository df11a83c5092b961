"""The trainer under torchrun: the command the service runs for several ranks, and `traind worker`.

    python -m daemon.train.launch --config status/running_config.json       # the service, node 0
    traind worker --config config.json --node-rank 1 [--master-addr HOST]   # every other node, in a loop

This module is torch's own launcher (`torch.distributed.run`, the code behind
`torchrun`) run in-process, after asking Linux to kill it with its parent: so a
service that dies takes the whole group with it (each rank asks the same of
the launcher). The launcher starts `distributed.nproc_per_node` ranks of
`python -m daemon.train`, with torchrun's `--max-restarts 0`: a rank that dies
ends the group, the launcher exits non-zero, and the service counts one crash
of the file and starts the group again from the last checkpoint, within its
usual crash limits (`service.max_crashes_per_file`, backoff). Restarts stay the
service's, not the launcher's, so they are counted once, against the file.

One node (`distributed.nnodes` 1) rendezvouses on a free loopback port
(torchrun's --standalone). Several nodes use the static rendezvous at
`distributed.master_addr:master_port`: node 0's launcher hosts it; the others
(`traind worker`) join it, and join again each time the service restarts the
group.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from daemon.config import Config, default_config_path, load_config

log = logging.getLogger(__name__)

WORKER_RETRY_SECONDS = 5.0  # a worker node waits this long before joining the next group


def world_size(cfg: Config) -> int:
    return cfg.distributed.nproc_per_node * cfg.distributed.nnodes


def launcher_dir(cfg: Config) -> Path:
    """torchrun's own folder (it makes one per launch): in logs/, emptied at every launch, so launches
    killed with SIGKILL leave nothing behind (by default it would be a new folder in $TMPDIR each time)."""
    return cfg.path("logs") / "torchrun"


def torchrun_args(cfg: Config, config_path: str, node_rank: int, master_addr: str | None = None) -> list[str]:
    """torchrun's arguments for this node's ranks of `python -m daemon.train --config PATH`."""
    dc = cfg.distributed
    args = [f"--nproc-per-node={dc.nproc_per_node}", "--max-restarts=0", "--monitor-interval=0.5",
            f"--log-dir={launcher_dir(cfg)}"]
    if dc.nnodes == 1:
        args.append("--standalone")
    else:
        args += [f"--nnodes={dc.nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr or dc.master_addr}",
                 f"--master-port={dc.master_port}"]
    return args + ["-m", "daemon.train", "--config", str(config_path)]


def run(cfg: Config, config_path: str, node_rank: int, master_addr: str | None = None) -> int:
    """Run this node's ranks under torch's launcher until the group ends; its exit code."""
    # Each rank sets its own threads (daemon.train.threads); set, this keeps torchrun from warning about it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed.run import get_args_parser, run as torchrun

    args = get_args_parser().parse_args(torchrun_args(cfg, config_path, node_rank, master_addr))
    # One launcher per instance and node (the service's lock; one worker per node): what is there is a
    # predecessor's, killed or done.
    shutil.rmtree(launcher_dir(cfg), ignore_errors=True)
    try:
        torchrun(args)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # ChildFailedError (a rank died) and rendezvous failures
        log.error("the training group ended: %s", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.train.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    from daemon.train import process

    process.die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch %(levelname)s %(message)s")
    cfg = load_config(args.config)
    return run(cfg, args.config, cfg.distributed.node_rank)


def worker_main(argv: list[str]) -> int:
    """`traind worker`: this machine's ranks of a group that node 0's service leads, rejoined after every end."""
    parser = argparse.ArgumentParser(
        prog="traind worker",
        description="Run this machine's trainer ranks for the traind service on node 0 (distributed.nnodes > 1).")
    parser.add_argument("--config", default=default_config_path(),
                        help="this machine's config (same training keys as node 0's; base_model must be here too)")
    parser.add_argument("--node-rank", type=int, required=True, help="this machine's node rank (1 .. nnodes-1)")
    parser.add_argument("--master-addr", help="node 0's address (default: distributed.master_addr)")
    parser.add_argument("--once", action="store_true", help="leave after one group instead of rejoining")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    cfg = load_config(args.config)
    dc = cfg.distributed
    if dc.nnodes < 2:
        parser.error(f"{args.config}: distributed.nnodes is {dc.nnodes}; a worker node needs nnodes >= 2")
    if not 1 <= args.node_rank < dc.nnodes:
        parser.error(f"--node-rank must be between 1 and {dc.nnodes - 1} (node 0 runs the service)")
    os.environ.pop("TRAIND_CONNECT", None)  # only rank 0, on node 0, talks to the service
    while True:
        log.info("joining the group at %s:%d as node %d of %d", args.master_addr or dc.master_addr, dc.master_port,
                 args.node_rank, dc.nnodes)
        code = run(cfg, args.config, args.node_rank, args.master_addr)
        log.info("the group ended (exit %d)", code)
        if args.once:
            return code
        time.sleep(WORKER_RETRY_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
