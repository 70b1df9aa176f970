#!/usr/bin/env bash
# One GPU session's checks of issue 7 in one run (the device tool's `run`, carrying .whl from
# bench/gpu/fetch_wheels.sh): the GPU tests, then the kernel benchmark, then (with TUNE=1) the tuner.
# Logs and results go to $OUT (or ./gpu-out). Each part is bounded; a failed part does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# The repository root is the `moecluster` package.
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moecluster && export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, grpc; print(torch.__version__, triton.__version__, transformers.__version__, grpc.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels_triton.py tests/test_devices.py 2>&1 | tee "$OUT/tests.log"
timeout 240 python3 bench/kernels_gpu.py 2>&1 | tee "$OUT/kernels_gpu.log"
if [ "${TUNE:-0}" = 1 ]; then
  timeout 300 python3 bench/tune_kernels_gpu.py --shape mixtral qwen3 2>&1 | tee "$OUT/tune.log"
  cp workers/tuned/*.json "$OUT/" 2>/dev/null || true
fi
