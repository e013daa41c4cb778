#!/usr/bin/env bash
# Prints a constraints file of the versions installed in a virtualenv (default .venv): what
# `make constraints` records after the suites passed there. torch is left out (setup.sh pins it).
set -euo pipefail
venv=${1:-.venv}
cat <<'HDR'
# The versions the test suite and the benchmark suite were last verified with (scripts/setup.sh
# installs through this file; PTCORE_CONSTRAINTS=latest or 'make test-latest' ignores it).
# Regenerate with `make constraints` after the suites pass against newer versions (make test-latest).
# torch is pinned by scripts/setup.sh itself (torch==2.13.0; PTCORE_TORCH overrides), so it is not listed here.
HDR
"$venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -v -i -E '^(ptcore|torch)==' |
  LC_ALL=C sort -f
