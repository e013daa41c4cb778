#!/usr/bin/env bash
# Sets up ptcore in a virtual environment (default .venv; VENV=path to change) and builds it.
# Idempotent: a stamp file skips the work when nothing relevant changed.
#  - torch: pinned to 2.13.0 (PTCORE_TORCH overrides the requirement). On a machine without a GPU
#    that is the CPU wheel where one is provided locally (pip's find-links); never an unpinned
#    torch, which would pull a multi-GB CUDA build.
#  - the compiled modules: ptcore._C always, ptcore._cuda when nvcc is found (PTCORE_CUDA=0|1).
#  - EXTRAS: optional extras to add, e.g. EXTRAS=bench,peers
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_REQ=${PTCORE_TORCH:-torch==2.13.0}
EXTRAS=${EXTRAS:-}

stamp="$VENV/.ptcore-setup"
want="$(cat pyproject.toml setup.py csrc/build.py | sha1sum | cut -c1-12) $TORCH_REQ extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import ptcore._C" 2>/dev/null; then
  # Sources of the compiled modules may have changed: ninja rebuilds only what did.
  "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
pip install -q "$TORCH_REQ" numpy
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/python" - <<'PYEOF'
import torch, sys
if torch.version.cuda is not None:
    print(f"note: torch {torch.__version__} is a CUDA build on a machine without a GPU "
          "(no local CPU wheel was found); set PTCORE_TORCH to a CPU build to save disk", file=sys.stderr)
PYEOF
fi
pip install -q "triton; platform_system == 'Linux'" numpy pybind11 ninja pytest hypothesis psutil \
  pytest-benchmark matplotlib tqdm transformers
pip install -q --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
echo "$want" > "$stamp"
"$VENV/bin/python" -m ptcore info
