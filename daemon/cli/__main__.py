"""`python -m daemon.cli ...`: the same as the `trainctl` console script."""

import sys

from daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
