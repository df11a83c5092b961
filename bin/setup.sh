#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent, quick when nothing changed).
#
#   bin/setup.sh            # runtime dependencies
#   bin/setup.sh --test     # plus the test tools and Debian's chromium for the browser tests
#
# Where no NVIDIA GPU is present, torch is installed first as the CPU build
# (torch==2.13.0), so the project's `torch>=2.4` is already met and pip does not
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${TRAIND_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

extras=""
stamp="$VENV/.traind-installed"
if [ $want_test = 1 ]; then
  extras="[test]"
  stamp="$stamp-test"
fi
fingerprint=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$fingerprint" ]; then
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "setup: NVIDIA GPU found: installing torch with CUDA"
      "${PIP[@]}" install "torch>=2.4"
    else
      echo "setup: no NVIDIA GPU: installing the CPU build of torch"
      "${PIP[@]}" install "torch==2.13.0"
    fi
  fi
  echo "setup: installing traind${extras} into $VENV"
  "${PIP[@]}" install -e ".${extras}"
  echo "$fingerprint" > "$stamp"
fi

if [ $want_test = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get):" \
         "the browser tests will fail. Install it with: sudo apt-get install -y chromium" >&2
  fi
fi
