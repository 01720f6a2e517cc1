#!/usr/bin/env bash
# GPU check for vq-pipeline on a machine with one NVIDIA GPU (H100/H200), offline, in under 5 minutes.
#
#   OUT=/some/empty/dir bash benchmarks/gpu_check.sh [--quick]
#
# 1. Python: a venv (.cache/venv-gpu) that sees the image's torch (--system-site-packages), so CUDA torch is
#    never re-installed; pykeops, keopscore, pybind11 (and pytest, if the image lacks it) come from the
#    wheels carried in benchmarks/wheels/ (--no-index: nothing is downloaded). The project itself is
#    used from the working tree (PYTHONPATH), not pip-installed, so its other dependencies are not
#    pulled in. CUDA headers for KeOps' nvrtc: CUDA_HOME, /usr/local/cuda, or the nvidia-* pip packages.
# 2. KeOps CUDA self-check, then `pytest -m gpu tests/compute/test_gpu.py` (CUDA fits and encodes of both
#    engines checked against the float64 oracle).
# 3. benchmarks/gpu_bench.py: the KeOps tutorial's table (10k x 2 K=50, 1M x 100 K=1000; l2 and
#    cosine; 10 iterations) with the tutorial's code, our keops and torch engines (pruned and not) and a cuBLAS floor.
# Everything lands in $OUT (default benchmarks/results/gpu): gpu_check.log, nvidia-smi.txt, pytest.txt,
# gpu_bench.md/json, summary.txt. Exit status: 0 all passed, 1 some step failed, 2 no CUDA GPU.
#
# Dry run, on any CPU machine (run by tests/test_gpu_check_dry_run.py, so the script cannot rot):
#
#   GPU_CHECK_DRY_RUN=1 OUT=/some/dir [GPU_CHECK_PYTHON=.venv/bin/python] bash benchmarks/gpu_check.sh
#
# The same steps with tiny shapes on the CPU: nvidia-smi and the CUDA checks are skipped ("dry run: no GPU
# needed" in summary.txt); the interpreter GPU_CHECK_PYTHON (default: the first python with torch) is used
# as is instead of the venv, missing packages still come from the carried wheels, and every carried wheel
# must resolve offline (pip --dry-run --no-index); the KeOps self-check compiles one small formula for
# the CPU (cache: VQ_KEOPS_CACHE_DIR, default .cache/keops); the GPU tests run with VQ_TEST_DEVICE=cpu
# (same bodies, same float64 oracle); gpu_bench.py --dry-run (2k x 2 K=16, 5k x 16 K=32, 2 iterations).
# The same files land in $OUT, and the exit status means the same.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
DRY=${GPU_CHECK_DRY_RUN:-0}; [ "$DRY" = 0 ] || DRY=1
GPU_TESTS=(tests/compute/test_gpu.py)  # the -m gpu selection (test_exact_extremes' CUDA test: ~70 s of CPU oracle per engine)
BUDGET=${GPU_CHECK_BUDGET_S:-285}   # the whole script stays under 5 minutes
SECONDS=0
left() { echo $(( BUDGET - SECONDS )); }
STATUS=0
note() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

note "vq-pipeline GPU check in $REPO -> $OUT"
if [ $DRY = 1 ]; then
    summary "dry run: no GPU needed (nvidia-smi and the CUDA checks skipped; tiny shapes on the CPU)"
    echo "dry run: nvidia-smi not called" >"$OUT/nvidia-smi.txt"
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; then
    summary "no CUDA GPU: nvidia-smi is missing or failed"
    exit 2
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
fi

# ---------------------------------------------------------------- 1. Python environment
SYS_PY=""
CANDS=(python3 python /opt/conda/bin/python /usr/bin/python3)
[ $DRY = 1 ] && [ -n "${GPU_CHECK_PYTHON:-}" ] && CANDS=("$GPU_CHECK_PYTHON")  # dry run only
for cand in "${CANDS[@]}"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then SYS_PY=$(command -v "$cand"); break; fi
done
VENV=$REPO/.cache/venv-gpu  # .cache/ is git-ignored
if [ -n "$SYS_PY" ] && [ $DRY = 1 ]; then
    note "dry run: using $SYS_PY as is (no venv)"
elif [ -n "$SYS_PY" ]; then
    note "using the image's torch from $SYS_PY"
    [ -x "$VENV/bin/python" ] || "$SYS_PY" -m venv --system-site-packages "$VENV" || { summary "FAIL: venv"; exit 1; }
else
    summary "FAIL: no python with torch on this image; carry a CUDA torch wheel (pip install torch==2.13.0 needs the network)"
    exit 1
fi
PY=$VENV/bin/python
[ $DRY = 0 ] || PY=$SYS_PY
"$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip >/dev/null 2>&1
WHEELS=$REPO/benchmarks/wheels
need=()
"$PY" -c "import pykeops, keopscore" >/dev/null 2>&1 || need+=(pykeops keopscore)
"$PY" -c "import pybind11" >/dev/null 2>&1 || need+=(pybind11)
"$PY" -c "import pytest" >/dev/null 2>&1 || need+=(pytest)
"$PY" -c "import numpy" >/dev/null 2>&1 || { summary "FAIL: numpy missing from the image (not carried)"; exit 1; }
if [ ${#need[@]} -gt 0 ]; then
    note "installing from carried wheels: ${need[*]}"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${need[@]}" || { summary "FAIL: wheel install"; STATUS=1; }
fi
if [ $DRY = 1 ]; then  # what a bare image would install must resolve from the carried wheels alone, offline
    if "$PY" -m pip install -q --dry-run --ignore-installed --no-deps --no-index --find-links "$WHEELS" \
        pykeops keopscore pybind11 pytest iniconfig pluggy packaging >"$OUT/wheels_check.txt" 2>&1; then
        summary "carried wheels: resolve offline ($(ls "$WHEELS" | wc -l) in benchmarks/wheels)"
    else summary "FAIL carried wheels do not resolve offline (see wheels_check.txt)"; STATUS=1; fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ $DRY = 1 ]; then
    export VQ_KEOPS_CACHE_DIR=${VQ_KEOPS_CACHE_DIR:-$REPO/.cache/keops} VQ_TEST_DEVICE=cpu
    DEV=cpu
else
    export VQ_KEOPS_CACHE_DIR=${VQ_KEOPS_CACHE_DIR:-$REPO/.cache/keops-gpu}
    unset VQ_TEST_DEVICE  # the real run tests on the GPU
    DEV=cuda
fi
export PYKEOPS_VERBOSE=0

# CUDA headers (cuda.h + nvrtc.h in one folder) and libnvrtc for KeOps' runtime compiler.
has_headers() { [ -f "$1/include/cuda.h" ] && [ -f "$1/include/nvrtc.h" ]; }
if [ $DRY = 1 ]; then :;  # KeOps compiles for the CPU with the host compiler
elif [ -n "${CUDA_HOME:-}" ] && has_headers "$CUDA_HOME"; then :;
elif has_headers /usr/local/cuda; then export CUDA_HOME=/usr/local/cuda;
else
    SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    SYS_SITE=$("$SYS_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    SHIM=$REPO/.cache/cuda-shim
    mkdir -p "$SHIM/include" "$SHIM/lib"
    for h in cuda.h nvrtc.h; do
        f=$(find "$SITE/nvidia" "$SYS_SITE/nvidia" /usr/local /usr/include -name "$h" 2>/dev/null | head -1)
        [ -n "$f" ] && ln -sf "$f" "$SHIM/include/$h"
    done
    for l in $(find "$SITE/nvidia" "$SYS_SITE/nvidia" -name "libnvrtc*.so*" 2>/dev/null); do ln -sf "$l" "$SHIM/lib/"; done
    [ -e "$SHIM/lib/libnvrtc.so" ] || { l=$(ls "$SHIM"/lib/libnvrtc.so.* 2>/dev/null | grep -v builtins | head -1); [ -n "$l" ] && ln -sf "$l" "$SHIM/lib/libnvrtc.so"; }
    export CUDA_HOME=$SHIM CUDA_PATH=$SHIM
    export LD_LIBRARY_PATH=$SHIM/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    note "CUDA headers from the nvidia pip packages via $SHIM: $(ls "$SHIM/include" | tr '\n' ' ')"
fi
"$PY" - <<'EOF' | tee -a "$OUT/summary.txt"
import torch, platform
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
EOF
[ $DRY = 1 ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || { summary "no CUDA GPU: torch.cuda.is_available() is False"; exit 2; }

# ---------------------------------------------------------------- 2. KeOps self-check and GPU tests
note "KeOps $DEV self-check"
if DEV=$DEV timeout 60 "$PY" - >"$OUT/keops_check.txt" 2>&1 <<'EOF'
import os
import torch
from vq_pipeline.compute.engines import keops
assert keops.available(), keops.unavailable_reason()
LT = keops._lazy_tensor()
dev = os.environ["DEV"]
x = torch.randn(5000, 3, device=dev); c = torch.randn(40, 3, device=dev)  # (5000, 3), (40, 3)
got = ((LT(x[:, None]) - LT(c[None])) ** 2).sum(-1).argmin(dim=1).view(-1)  # (5000,)
ref = torch.cdist(x.double(), c.double()).argmin(1)  # (5000,) float64 oracle
print(f"keops {dev} argmin mismatches:", int((got.long() != ref).sum()))
EOF
then summary "keops $DEV: $(tail -1 "$OUT/keops_check.txt")"; else summary "FAIL keops $DEV self-check (see keops_check.txt): $(tail -1 "$OUT/keops_check.txt")"; STATUS=1; fi

note "pytest -m gpu ${GPU_TESTS[*]}${VQ_TEST_DEVICE:+ (VQ_TEST_DEVICE=$VQ_TEST_DEVICE)}"
T=$(( $(left) - 150 )); [ $T -lt 30 ] && T=30
timeout "$T" "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" -q -p no:cacheprovider >"$OUT/pytest.txt" 2>&1
rc=$?
summary "pytest -m gpu: rc=$rc $(tail -1 "$OUT/pytest.txt")"
[ $rc -eq 0 ] || STATUS=1

# ---------------------------------------------------------------- 3. the tutorial's table, side by side
T=$(( $(left) - 5 )); [ $T -lt 20 ] && T=20
note "gpu_bench.py (timeout ${T}s)"
BENCH_ARGS=("$@"); [ $DRY = 0 ] || BENCH_ARGS+=(--dry-run)
rm -f "$OUT/gpu_bench.json" "$OUT/gpu_bench.md"  # a file left by an earlier run must not count as this run's
OUT=$OUT timeout "$T" "$PY" benchmarks/gpu_bench.py "${BENCH_ARGS[@]}"
rc=$?
[ $rc -eq 0 ] && ! [ -s "$OUT/gpu_bench.json" ] && rc=3  # no result file: not a pass
if [ $rc -eq 0 ]; then summary "gpu_bench.py: rc=0 $(grep -c '^| [0-9]' "$OUT/gpu_bench.md") rows, $(grep -c 'error:' "$OUT/gpu_bench.md") errors"
else summary "FAIL gpu_bench.py rc=$rc (124 = timed out, 3 = no gpu_bench.json)"; STATUS=1; fi
note "done in ${SECONDS}s, status $STATUS"
exit $STATUS
