#!/usr/bin/env bash
# Creates .venv-ms210: the project's environment with MindSpore 2.10.0 instead of requirements.txt's 2.7.2, the
# second MindSpore / MindFormers pair the suite is tested with (`make venv-ms210`, then
# `.venv-ms210/bin/python -m pytest tests -m "not slow and not perf" -n 2 --dist loadfile`).
# Everything else is requirements.txt's exact pins. mindformers stays 1.6.0, the newest beside openmind 1.0.0
# (1.7+ need datasets>=4, openmind needs <=2.21; 2.1.0 needs mindspore 2.11, not on PyPI), and is installed without
# its dependencies: its metadata asks for mindspore~=2.7.0rc1, which pip would otherwise refuse (so `pip check`
# names that one mismatch). CI's `make test` does not build this environment (time budget).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-ms210
MINDSPORE=2.10.0
if [ ! -x .venv/bin/python ]; then  # the Python 3.10 search, free-space check and first set-up live there
  bash scripts/setup_env.sh
fi
if [ ! -x "$VENV/bin/python" ]; then
  # the interpreter .venv was made from (not .venv's own python: a venv made from a venv depends on it)
  PY=$(.venv/bin/python -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3.10"))')
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip<27"
fi
MINDFORMERS=$(sed -n 's/^mindformers==//p' requirements.txt)
sed -e "s/^mindspore==.*/mindspore==$MINDSPORE/" -e '/^mindformers==/d' requirements.txt > "$VENV/requirements-ms210.txt"
echo "[setup] installing requirements.txt with mindspore==$MINDSPORE into $VENV (first time: a few minutes, ~3 GB)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/requirements-ms210.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "mindformers==$MINDFORMERS"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
"$VENV/bin/python" -m baichuan2.openmind_compat --install
"$VENV/bin/python" research/baichuan2/kernels.py --build 2>/dev/null ||
  echo "[setup] warning: compiling the CPU kernels failed; stock MindSpore ops are used" >&2
"$VENV/bin/python" -c 'import mindspore, mindformers; print(f"[setup] {mindspore.__version__=} {mindformers.__version__=}")'
echo "[setup] $VENV ready"
