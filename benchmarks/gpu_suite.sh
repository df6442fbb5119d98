#!/usr/bin/env bash
# Everything fxopt checks and measures on a GPU machine, in one go (logs under $OUT or ./gpu-out).
#   bash benchmarks/gpu_suite.sh [quick|full]
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; mode=${1:-quick}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -15
for k in attention_triton norm_triton rotary_triton activation_triton; do
  timeout 120 python3 -m fxopt.kernels.$k 2>&1 | tee "$OUT/bench-$k.txt" | tail -12
done
if [ "$mode" = quick ]; then
  python3 benchmarks/decode.py --models llama-1b llama2-7b --batches 1 8 --no-compile --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" | grep -v "^{" | tail -30
else
  python3 benchmarks/decode.py --models llama-1b llama2-7b --batches 1 8 32 --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" | grep -v "^{" | tail -40
fi
