#!/usr/bin/env bash
# Every GPU check of issue #21 in one call, on a bare CUDA machine with no network (a lent device):
#   1. packages the machine lacks, from wheels in .whl/ (see below), into /tmp/site;
#   2. the device, torch and the package versions;
#   3. benchmarks/gpu_table.py: inference table (official vs ours fp32/bf16) and training throughput;
#   4. the tests marked `gpu` (CUDA parity, CPU/CUDA agreement, bf16, training, pretraining, copies);
#   5. the largest single sentence that fits (ours fp32).
# Each stage has its own time limit and writes under $OUT (default ./gpu-out): a stage that fails or
# runs out of time leaves the others' results.
#
# Wheels: the image's Python is 3.12 with torch, lightning, numpy, scipy, h5py, scikit-learn; carry
# the rest (anndata, scvi-tools, scanpy, mudata, cellplm, zarr, ... and pandas 2.3) as cp312 wheels:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl NAME==VERSION
# Data: CELLPLM_SHARED_DATA (default .gpu/shared) holds pbmc3k_raw.h5ad and
# official/cellplm_20230926_85M.config.json, copied from ../shared/data.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"; : >"$OUT/stages.txt"
export PYTHONUNBUFFERED=1 CELLPLM_SHARED_DATA=${CELLPLM_SHARED_DATA:-$PWD/.gpu/shared}
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
PY=${PYTHON:-python3}
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  set -o pipefail
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  set +o pipefail
  echo "=== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.txt"
$PY -c "import sys, torch, numpy, pandas, scipy, lightning, anndata, scvi, CellPLM, scvi_cellplm
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available(), 'numpy', numpy.__version__, 'pandas', pandas.__version__,
      'scipy', scipy.__version__, 'lightning', lightning.__version__, 'anndata', anndata.__version__,
      'scvi-tools', scvi.__version__, 'scvi-cellplm', scvi_cellplm.__version__)" 2>&1 | tee -a "$OUT/env.txt" \
  || { echo "imports failed"; exit 4; }
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu GPU_TABLE_ARGS=--quick: a dry run of this script on a CPU (no GPU figures)
export CELLPLM_GPU_TESTS_DEVICE=$DEVICE
stage table "${TABLE_LIMIT:-240}" $PY benchmarks/gpu_table.py --device "$DEVICE" --skip-search \
  --json "$OUT/gpu.json" ${GPU_TABLE_ARGS:-}
stage tests "${TESTS_LIMIT:-180}" $PY -m pytest -m gpu -rA -p no:cacheprovider tests/test_gpu.py
stage search "${SEARCH_LIMIT:-100}" $PY benchmarks/gpu_table.py --device "$DEVICE" --sizes ${SEARCH_FROM:-48082} --rounds 1 \
  --skip-official --skip-train --time-budget "${SEARCH_BUDGET:-45}" --json "$OUT/gpu_search.json" ${GPU_TABLE_ARGS:-}
cat "$OUT/stages.txt"
