"""`python -m daemon.train --config PATH`: the trainer child (daemon.train.worker)."""

import sys

from daemon.train.worker import main

if __name__ == "__main__":
    sys.exit(main())
