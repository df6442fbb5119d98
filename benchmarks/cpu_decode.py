#!/usr/bin/env python3
"""Decode on the CPU: fxopt (its linear's CPU kernel on and off) against transformers eager.

    python benchmarks/cpu_decode.py                     # the bundled SmolLM2-135M, fp32, 32 new tokens
    python benchmarks/cpu_decode.py --dtype bfloat16 --new 64 --model path/to/model

One process, the same model and prompt for every row; ms per decoded token, the best of
``--reps`` greedy generations (transformers: the time of ``new + 1`` tokens minus that of one,
so its prefill drops out as fxopt's does). Rows: ``fxopt`` (the default pipeline; on the CPU the
ops' references run, with ``fxopt.linear``'s matmul in oneDNN: ``kernels/linear_cpu.py``),
``fxopt, F.linear matmul`` (that kernel off: the references alone), ``transformers eager``.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def fxopt_ms(compiled, ids, new: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        compiled.generate(ids, max_new_tokens=new, eos_token_id=None)
        best = min(best, compiled.last_timings["decode_ms_per_token"])
    return best


def eager_ms(model, ids, new: int, reps: int) -> float:
    def timed(n):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            best = min(best, (timed(new + 1) - timed(1)) / new * 1e3)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a transformers model directory or .gguf (default: SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--new", type=int, default=32, help="new tokens a generation (default 32)")
    parser.add_argument("--reps", type=int, default=3, help="generations a row; the best counts (default 3)")
    args = parser.parse_args()

    import transformers

    import fxopt
    from fxopt.kernels import linear_cpu
    from fxopt.models import load_model
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device="cpu", progress=False)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    compiled = fxopt.compile(model, max_batch_size=1, max_seq_len=ids.shape[1] + args.new + 8)
    rows = [("fxopt", fxopt_ms(compiled, ids, args.new, args.reps))]
    with linear_cpu.enabled(False):
        rows.append(("fxopt, F.linear matmul", fxopt_ms(compiled, ids, args.new, args.reps)))
    rows.append(("transformers eager", eager_ms(model, ids, args.new, args.reps)))

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, oneDNN linear "
          f"{'available' if linear_cpu.AVAILABLE else 'not available'}; {time.strftime('%Y-%m-%d')}")
    print(f"{type(model).__name__}, {args.dtype}, prompt {ids.shape[1]} tokens, {args.new} new, best of {args.reps}")
    print(f"{'system':<24} {'ms/token':>9} {'tokens/s':>9}")
    for name, ms in rows:
        print(f"{name:<24} {ms:>9.1f} {1e3 / ms:>9.1f}")


if __name__ == "__main__":
    main()
