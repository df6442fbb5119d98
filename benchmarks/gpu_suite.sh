#!/usr/bin/env bash
# Everything fxopt checks and measures on a GPU machine, in one go (logs under $OUT or ./gpu-out).
#   bash benchmarks/gpu_suite.sh [quick|full|ab|anchors|cold|profile|prefill|int8pdl]
# ab: the GPU tests of the newest changes, then the A/B docs/performance.md lists as not yet
# measured (the greedy loop on and off, bf16 and INT8, batch 1 and 8), each under a time limit
# (under ten minutes in all), then their tables.
# anchors: the issues' anchor table (fxopt bf16 and INT8 against transformers eager and
# torch.compile, batch 1 and 8, prefill 2048), one process per model, under nine minutes.
# cold: a cold start (compile, then the first tokens), kernels compiled ahead and one by one, bf16,
# both models, each run a fresh process with an empty Triton cache (benchmarks/cold_start.py).
# profile: where a decode step goes, kernel by kernel (benchmarks/profile_step.py), bf16 and INT8,
# batch 1 and 8, both models (about three minutes).
# prefill: where a 2048-token prefill goes (the 7B shape, bf16; profile_step.py --prefill), kernels
# summed by name against the matmul floor (about two minutes).
# int8pdl: the one-row INT8 GEMV's PDL knobs (trigger_steps, preload; off by default, never timed
# on INT8), fxopt-int8 at batch 1, both models (about four minutes).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; mode=${1:-quick}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$mode" = anchors ] || [ "$mode" = cold ]; then
  # compiling ahead is new: if its GPU tests fail, the runs below compile kernels one by one
  timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_compile_ahead.py 2>&1 \
    | tee "$OUT/pytest-ahead.txt" | tail -2
  grep -q " passed" "$OUT/pytest-ahead.txt" && ! grep -q "failed\|error" "$OUT/pytest-ahead.txt" \
    || { export FXOPT_COMPILE_AHEAD=0; echo "NOTE: compile_ahead off (its GPU tests failed)"; }
fi
if [ "$mode" = cold ]; then
  timeout 400 python3 benchmarks/cold_start.py --pipelines bf16 --json "$OUT/cold.json" 2>&1 | tee "$OUT/cold.txt" | tail -9
  exit 0
fi
if [ "$mode" = anchors ]; then
  for m in llama2-7b llama-1b; do
    # a Triton cache of its own, empty: the ready column is a cold start even on a warm machine
    TRITON_CACHE_DIR=$(mktemp -d) timeout $([ $m = llama2-7b ] && echo 290 || echo 220) \
      python3 benchmarks/decode.py --models $m --batches 1 8 \
      --compile-batches 1 8 --variants fxopt fxopt-int8 --json "$OUT/anchors-$m.json" > "$OUT/anchors-$m.txt" 2>&1
  done
  for m in llama2-7b llama-1b; do
    [ -f "$OUT/anchors-$m.json" ] && python3 benchmarks/decode.py --table "$OUT/anchors-$m.json"
  done
  exit 0
fi
if [ "$mode" = profile ]; then
  timeout 280 python3 benchmarks/profile_step.py --models llama2-7b llama-1b --variants fxopt fxopt-int8 \
    --batches 1 8 2>&1 | tee "$OUT/profile.txt" | grep -v "^\[" | tail -150
  exit 0
fi
if [ "$mode" = prefill ]; then
  timeout 280 python3 benchmarks/profile_step.py --models llama2-7b --variants fxopt --batches 1 --new 8 \
    --prefill 2048 2>&1 | tee "$OUT/prefill-profile.txt" | grep -v "^\[" | tail -60
  exit 0
fi
if [ "$mode" = int8pdl ]; then
  for m in llama-1b llama2-7b; do
    timeout 200 python3 benchmarks/decode.py --no-compile --no-eager --prefill 0 --models $m --batches 1 \
      --variants fxopt-int8 --int8-gemv block_n=4 trigger_steps=1,preload=1024 trigger_steps=2,preload=1024 \
      trigger_steps=2,preload=2048 --json "$OUT/int8pdl-$m.json" > "$OUT/int8pdl-$m.txt" 2>&1
  done
  for m in llama-1b llama2-7b; do
    [ -f "$OUT/int8pdl-$m.json" ] && python3 benchmarks/decode.py --table "$OUT/int8pdl-$m.json"
  done
  exit 0
fi
if [ "$mode" = ab ]; then
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fuse.py tests/test_greedy_loop.py \
    tests/test_sampling_triton.py tests/test_cuda_graph.py tests/test_compile_ahead.py \
    -k "cuda_as_on_cpu or loop or feedback or captured or ahead or held_back" 2>&1 | tee "$OUT/pytest-ab.txt" | tail -3
  for m in llama-1b llama2-7b; do
    timeout $([ $m = llama2-7b ] && echo 230 || echo 200) python3 benchmarks/decode.py --no-compile --no-eager --prefill 0 --models $m --batches 1 8 \
      --variants fxopt fxopt-hostloop fxopt-int8 fxopt-int8-hostloop --json "$OUT/ab-loop-$m.json" \
      > "$OUT/ab-loop-$m.txt" 2>&1
  done
  for f in ab-loop-llama-1b ab-loop-llama2-7b; do
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
