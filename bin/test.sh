#!/usr/bin/env bash
# Run the whole test suite (installs what it needs first: venv, test tools, Debian's chromium).
#
#   bin/test.sh [pytest args...]        # e.g. bin/test.sh -k queue -x
set -euo pipefail
cd "$(dirname "$0")/.."
bin/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
