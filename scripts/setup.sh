#!/usr/bin/env bash
# Sets up ptcore in a virtual environment (default .venv; VENV=path to change) and builds it.
# Idempotent: a stamp file skips the work when nothing relevant changed.
#  - versions: every package comes through requirements/constraints.txt, the versions the suites
#    were last verified with. PTCORE_CONSTRAINTS=latest takes the newest releases instead
#    (`make test-latest`); PTCORE_CONSTRAINTS=FILE uses another constraints file.
#  - torch: pinned to 2.13.0 (PTCORE_TORCH overrides the requirement). On a machine without a GPU
#    that is the CPU wheel where one is provided locally (pip's find-links); never an unpinned
#    torch, which would pull a multi-GB CUDA build.
#  - the compiled modules: ptcore._C always, ptcore._cuda when nvcc is found (PTCORE_CUDA=0|1).
#  - EXTRAS: extras to add to `test`, e.g. EXTRAS=bench,peers
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_REQ=${PTCORE_TORCH:-torch==2.13.0}
EXTRAS=${EXTRAS:-}
CONSTRAINTS=${PTCORE_CONSTRAINTS:-requirements/constraints.txt}

if [ "$CONSTRAINTS" = latest ]; then
  pin=(--upgrade)
else
  [ -f "$CONSTRAINTS" ] || { echo "setup: constraints file '$CONSTRAINTS' not found" >&2; exit 2; }
  pin=(-c "$CONSTRAINTS")
fi

stamp="$VENV/.ptcore-setup"
want="$(cat pyproject.toml setup.py csrc/build.py | sha1sum | cut -c1-12) $TORCH_REQ extras=$EXTRAS"
want+=" constraints=$([ "$CONSTRAINTS" = latest ] && echo latest || sha1sum < "$CONSTRAINTS" | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import ptcore._C" 2>/dev/null; then
  # Sources of the compiled modules may have changed: ninja rebuilds only what did.
  "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q "${pin[@]}" pip setuptools wheel
pip install -q "${pin[@]}" "$TORCH_REQ" numpy  # numpy with torch: the check below imports torch
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/python" - <<'PYEOF'
import torch, sys
if torch.version.cuda is not None:
    print(f"note: torch {torch.__version__} is a CUDA build on a machine without a GPU "
          "(no local CPU wheel was found); set PTCORE_TORCH to a CPU build to save disk", file=sys.stderr)
PYEOF
fi
# The build needs pybind11 and ninja in the venv (--no-build-isolation: the build sees this torch).
pip install -q "${pin[@]}" pybind11 ninja
pip install -q "${pin[@]}" --no-build-isolation -e ".[test${EXTRAS:+,$EXTRAS}]"
"$VENV/bin/python" -m ptcore models fetch smollm2-135m-instruct || echo "note: SmolLM2 not fetched; the tests marked real will skip (retry: ptcore models fetch smollm2-135m-instruct)" >&2
"$VENV/bin/python" -m pip check
echo "$want" > "$stamp"
"$VENV/bin/python" -m ptcore info
