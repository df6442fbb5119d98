#!/usr/bin/env bash
# Tensor-parallel decode at TP = 1, 2, 4 (as many as the GPUs allow), one table at the end.
#   bash benchmarks/tp_suite.sh [model] [batches...]      (logs under $OUT or ./gpu-out)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; model=${1:-llama2-7b}; shift || true; batches=${*:-1 8}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=4
gpus=$(nvidia-smi -L | wc -l)
rm -f "$OUT/tp_decode.jsonl"
for n in 1 2 4; do
  [ "$n" -le "$gpus" ] || continue
  timeout 400 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" benchmarks/tp_decode.py \
    --model "$model" --batches $batches --json "$OUT/tp_decode.jsonl" > "$OUT/tp$n.log" 2>&1 || tail -20 "$OUT/tp$n.log"
done
python3 - "$OUT/tp_decode.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = {r["batch"]: r["ms_per_token"] for r in rows if r["tp"] == 1}
print(f"{rows[0]['gpu']}, torch {rows[0]['torch']}, {rows[0]['date']}, model {rows[0]['model']}")
print(f"{'tp':>3} {'batch':>5} {'ms/tok':>8} {'tok/s':>9} {'speed-up':>8} {'compile s':>9} {'GB/rank':>8}")
for r in sorted(rows, key=lambda r: (r["batch"], r["tp"])):
    up = base.get(r["batch"], float("nan")) / r["ms_per_token"]
    print(f"{r['tp']:>3} {r['batch']:>5} {r['ms_per_token']:>8.3f} {r['tokens_per_s']:>9.1f} {up:>7.2f}x "
          f"{r['compile_s']:>9} {r['peak_GB_per_rank']:>8} {r['logits_rel_err']:>10}")
PY
