#!/usr/bin/env bash
# Everything fxopt checks and measures on a GPU machine, in one go (logs under $OUT or ./gpu-out).
#   bash benchmarks/gpu_suite.sh [quick|full|ab]
# ab: only the A/Bs docs/performance.md lists as not yet measured, most wanted first, each under a
# time limit (about nine minutes in all), then their tables.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; mode=${1:-quick}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$mode" = ab ]; then
  timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_pdl.py tests/test_quant_triton.py \
    tests/test_sampling_triton.py tests/test_generate.py -k "pdl_knobs or residual_batched or sampling or greedy" \
    2>&1 | tee "$OUT/pytest-ab.txt" | tail -3
  timeout 40 python3 -m fxopt.kernels.sampling_triton 2>&1 | tee "$OUT/bench-sampling.txt" | tail -6
  D="python3 benchmarks/decode.py --no-compile --prefill 0 --models llama-1b llama2-7b"
  timeout 190 $D --batches 1 --variants fxopt --gemv trigger_steps=0 trigger_steps=1,preload=1024 \
    --attn-preload 0 64 --json "$OUT/ab-pdl-bf16.json" > "$OUT/ab-pdl-bf16.txt" 2>&1
  timeout 130 $D --batches 1 --variants fxopt-int8-nofold --int8-gemv trigger_steps=0 \
    trigger_steps=1,preload=1024 scales_ahead=1 --json "$OUT/ab-int8.json" > "$OUT/ab-int8.txt" 2>&1
  timeout 120 $D --batches 1 --variants fxopt --attn-split-blocks 1 4 8 --json "$OUT/ab-splits.json" \
    > "$OUT/ab-splits.txt" 2>&1
  for f in ab-pdl-bf16 ab-int8 ab-splits; do
    [ -f "$OUT/$f.json" ] && python3 benchmarks/decode.py --table "$OUT/$f.json"
  done
  exit 0
fi
python3 -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -15
for k in attention_triton norm_triton rotary_triton activation_triton sampling_triton; do
  timeout 120 python3 -m fxopt.kernels.$k 2>&1 | tee "$OUT/bench-$k.txt" | tail -12
done
if [ "$mode" = quick ]; then
  python3 benchmarks/decode.py --models llama-1b llama2-7b --batches 1 8 --no-compile --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" | grep -v "^{" | tail -30
else
  python3 benchmarks/decode.py --models llama-1b llama2-7b --batches 1 8 32 --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" | grep -v "^{" | tail -40
fi
