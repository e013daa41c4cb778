#!/usr/bin/env bash
# GPU check for a lent GPU machine (one H200, started bare; its python3 already has torch, triton,
# pytest, matplotlib, tqdm, psutil). Run from the ptcore source tree:  bash bench/gpu_check.sh
# Steps, each under its own timeout, all within DEADLINE seconds (default 470: under 8 minutes):
#   1. install: the peers (Cut Cross-Entropy, Liger) and any missing bench tools; ptcore with its
#      CUDA part (PTCORE_CUDA=1). The machine cannot reach a package index: peers come from the
#      wheels in $WHEELS (default .whl/), made beforehand on a machine that can, e.g.
#        pip download --no-deps -d .whl cut-cross-entropy liger-kernel     (both pure Python)
#        pip download -d .whl transformers      (the HF patch, loops and engine; no torch inside)
#        pip download --no-deps -d .whl trl accelerate datasets   (the TRL rows of the loop benchmarks)
#      Without them the benchmark prints "skipped: <package> not installed" for those rows.
#   2. pytest tests/test_gpu.py: every op on CUDA tensors on each GPU backend against the float64
#      oracle (paged decode/extend/write_kv/copy_pages, speculative verify chain and tree, the
#      LM-head ops and fused losses), first, so that a short run still answers "is it right"
#   3. python -m ptcore info          4. pytest -q tests -k "cuda or triton or gpu" (the rest)
#   5. `ptcore bench --device cuda`: the quick profile of every benchmark with its scoreboard, then
#      the full tables of the LM head, GRPO and paged decode (CUDA defaults: N=8192 H=2048
#      V=131072 bf16 for the LM heads), each table printed as soon as its cases are done (so a
#      run cut by the deadline still prints the tables it finished).
# Exit status: 0 when every step passed, else 1 (later steps still run). Where $OUT is set (the
# device tool's output folder), the benchmarks' JSON and PNG files are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
DEADLINE=${DEADLINE:-470}
export PYTHONUNBUFFERED=1
failed=()

section() { printf '\n==================== %s ====================\n' "$*"; }
# step SECONDS NAME CMD...: runs CMD under a timeout (cut to what is left before DEADLINE) and
# records a failure without stopping.
step() {
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "-- $name: NOT RUN (out of time)"; failed+=("$name"); return 1; fi
  timeout --kill-after=15 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then echo "-- $name: ok ($((SECONDS - t0)) s)"; return 0; fi
  [ $rc -eq 124 ] && echo "-- $name: TIMED OUT after $limit s" || echo "-- $name: FAILED (exit $rc)"
  failed+=("$name"); return $rc
}

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"

section "install"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  step 60 "install peers" $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
else
  echo "no wheels in $WHEELS/: trying the package index for the peers (fails offline; not fatal)"
  timeout 30 $PY -m pip install -q --retries 0 --timeout 5 --no-deps cut-cross-entropy liger-kernel || echo "-- peers not installed"
fi
$PY -c "import matplotlib, tqdm, psutil, pytest, pytest_benchmark" 2>/dev/null \
  || step 60 "install bench tools" $PY -m pip install -q matplotlib tqdm psutil pytest pytest-benchmark
# --no-deps: torch, triton and numpy are the machine's own; never let pip replace them.
step 180 "build ptcore (CUDA)" env PTCORE_CUDA=1 $PY -m pip install -q --no-deps --no-build-isolation -e .

section "GPU oracle tests (tests/test_gpu.py)"
# -rs prints why anything skipped (flash-attn not installed, say); the first call of each Triton
# kernel shape compiles and autotunes its configs, most of this step's time on a bare machine.
step 240 "GPU oracle tests" $PY -m pytest -q -rs tests/test_gpu.py

section "ptcore info"
step 60 "ptcore info" $PY -m ptcore info

section "GPU tests"
step 120 "GPU tests" $PY -m pytest -q tests -k "cuda or triton or gpu" --ignore tests/test_gpu.py

section "benchmark suite: quick profile on CUDA, then the full LM-head tables"
# ptcore bench --device cuda: every benchmark's quick profile (CUDA-event timing, L2 flushed before
# each step), ending with the scoreboard; --timeout: a hung case is reported as failed and the suite
# goes on. Then, with what time is left, the full tables of the GPU kernels' benchmarks.
step 300 "ptcore bench --device cuda (quick)" $PY -m ptcore bench --device cuda --timeout 120 --out bench/results/gpu-quick
for b in linear_cross_entropy linear_policy_loss paged_attention_decode; do
  step 120 "full $b" $PY -m ptcore bench --device cuda --full --only "$b" --timeout 100 --out bench/results/gpu-full
done
if [ -n "${OUT:-}" ]; then cp -r bench/results/. "$OUT"/ && echo "results copied to \$OUT"; fi

section "summary"
if [ ${#failed[@]} -eq 0 ]; then echo "all steps passed"; exit 0; fi
printf 'failed: %s\n' "${failed[@]}"; exit 1
