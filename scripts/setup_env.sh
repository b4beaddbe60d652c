#!/usr/bin/env bash
# Creates (or brings up to date) the project's virtual environment at .venv with Python 3.10.
# openmind 1.0.0 refuses Python 3.11+, so a Python 3.10 interpreter is required.
# Re-running on an existing .venv only installs what requirements.txt adds or changes.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python310() {
  local candidates=("${PYTHON310:-}")
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)/versions/3.10.13/bin/python3.10")
    for p in "$(pyenv root)"/versions/3.10.*/bin/python3.10; do candidates+=("$p"); done
  fi
  candidates+=(python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10)
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  if ! PY=$(find_python310); then
    echo "error: Python 3.10 not found (openmind 1.0.0 needs Python 3.10)." >&2
    echo "  install it (e.g. 'pyenv install 3.10.13' or 'apt-get install python3.10 python3.10-venv')," >&2
    echo "  or point PYTHON310=/path/to/python3.10 at one, then run this again." >&2
    exit 1
  fi
  # The environment takes ~3.5 GB and pip unpacks wheels beside it: say so up front rather than fail half-way
  # through with pip's "No space left on device".
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((5 * 1024 * 1024)) ]; then
    echo "error: $(pwd) has $((free_kb / 1024)) MB free; the .venv needs about 5 GB while installing. Free some space and run this again." >&2
    exit 2
  fi
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade "pip<27"
fi

echo "[setup] installing pinned requirements into .venv (first time: a few minutes, ~3 GB)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
# openmind 1.0.0 needs adapting at import time (version pin, task name): see research/baichuan2/openmind_compat.py
.venv/bin/python -m baichuan2.openmind_compat --install
# The CPU kernels (C++, research/baichuan2/csrc/) are compiled now rather than on first use. Without
# a compiler it prints one line saying stock MindSpore ops are used; a failed compile warns and set-up goes on.
.venv/bin/python research/baichuan2/kernels.py --build 2>/dev/null ||
  echo "[setup] warning: compiling the CPU kernels failed (see 'python -m baichuan2.kernels --build'); stock MindSpore ops are used" >&2
# The server's browser test drives Debian's chromium (playwright never downloads a browser here).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (apt-get) for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ||
      echo "[setup] warning: 'apt-get install chromium' failed; tests/test_server.py's browser test needs /usr/bin/chromium" >&2
  else
    echo "[setup] warning: /usr/bin/chromium is missing; install Debian's chromium as root (apt-get install chromium) for the browser test" >&2
  fi
fi
touch .venv/.installed
echo "[setup] .venv ready"

# The reference venv .venv-ref: torch (CPU), transformers, peft, gguf and no MindSpore, for the tests that load our
# exports with PyTorch tools (tests/test_export_llama.py runs tools/parity/check_exports.py in it) and for
# tools/parity/. Python 3.11; rebuilt only when tools/parity/requirements.txt changes (its hash is the stamp).
find_python311() {
  local candidates=("${PYTHON311:-}")
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.11.*/bin/python3.11; do candidates+=("$p"); done
  fi
  candidates+=(python3.11 /usr/bin/python3.11 /usr/local/bin/python3.11)
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}
REF_STAMP=.venv-ref/.installed
REF_HASH=$(sha256sum tools/parity/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$REF_STAMP" 2>/dev/null)" != "$REF_HASH" ]; then
  if ! PY311=$(find_python311); then
    echo "error: Python 3.11 not found (the reference venv .venv-ref needs it)." >&2
    echo "  install it (e.g. 'pyenv install 3.11.7' or 'apt-get install python3.11 python3.11-venv')," >&2
    echo "  or point PYTHON311=/path/to/python3.11 at one, then run this again." >&2
    exit 1
  fi
  echo "[setup] creating .venv-ref (torch CPU, transformers, peft) with $PY311"
  [ -x .venv-ref/bin/python ] || "$PY311" -m venv .venv-ref
  .venv-ref/bin/python -m pip install -q --disable-pip-version-check -r tools/parity/requirements.txt
  echo "$REF_HASH" > "$REF_STAMP"
fi
echo "[setup] .venv-ref ready"
