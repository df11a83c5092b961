#!/usr/bin/env bash
# Run the whole test suite (installs what it needs first: venv, test tools, Debian's chromium).
#
#   bin/test.sh [pytest args...]        # e.g. bin/test.sh -k queue -x
#
# The suite runs on pytest-xdist workers, one per core between 2 and 4 (TRAIND_TEST_WORKERS=N to choose,
# 0 for one process; an explicit -n in the arguments wins): most of its time is spent waiting on real
# daemons, so two workers take well under half the time of one even on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bin/setup.sh --test
# TRAIND_STRICT: what this script installs (chromium) or needs (a mount) must be there: a test fails, never skips
export TRAIND_STRICT=${TRAIND_STRICT:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
workers=()
case " $* " in
  *" -n "*|*" -n"[0-9]*|*" --numprocesses"*|*"no:xdist"*) ;;
  *) cores=$(nproc 2>/dev/null || echo 2)
     default=$(( cores < 2 ? 2 : (cores > 4 ? 4 : cores) ))
     workers=(-n "${TRAIND_TEST_WORKERS:-$default}") ;;
esac
exec .venv/bin/python -m pytest "${workers[@]}" "$@"
