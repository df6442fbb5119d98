#!/usr/bin/env python3
"""A cold start on a GPU: from ``fxopt.compile`` until the first tokens are out, each run a fresh
process with an empty Triton cache.

    python benchmarks/cold_start.py                          # llama2-7b and llama-1b, INT8 too
    python benchmarks/cold_start.py --models llama2-7b --runs 2 --json out.json

Per run: the model shape with random bf16 weights on the GPU (built before the clock starts), then

- **compile s**: ``fxopt.compile`` (capture, passes, weights moved and concatenated);
- **first generate s**: ``generate`` of 2 new tokens on a 128-token prompt, batch 1: every Triton
  kernel of the prefill and of the decode step compiled, their CUDA graphs captured;
- **ready s**: the two together, what a user waits for before the first token;
- of the first generate, **captures s**: inside the CUDA-graph captures (``runtime/cuda_graph.capture``:
  the dry run, the warm-up runs and the capture itself, for the prefill bucket, the decode bucket and
  its greedy loop), and **dry runs s**: the dry runs alone (kernels compiled ahead);
- **kernels**: the Triton kernels compiled (entries the run left in its cache).

Each way of compiling the kernels is timed side by side: **ahead** (the default: a dry run before
each capture compiles all of the capture's kernels in a thread pool, ``triton_env.compile_ahead``)
and **one by one** (each kernel compiled at its first launch, ``cuda_graph.COMPILE_AHEAD = False``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WAYS = {"ahead": True, "one by one": False}
PIPELINES = {"bf16": None, "int8": ["canonicalize", "kv_cache", "fuse", "position_tables", "quantize",
                                    "fold_linear", "dce", "cuda_graph"]}


def _timed(spent: dict, key: str, fn):
    """``fn``, adding the seconds each call takes (CUDA synchronized at both ends) to ``spent[key]``."""
    import torch

    def timed(*args, **kwargs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            spent[key] += time.perf_counter() - started
    return timed


def one(name: str, pipeline: str, ahead: bool) -> dict:
    """One cold start in this process (its Triton cache given by the caller, empty)."""
    import torch
    import fxopt
    from fxopt.runtime import cuda_graph, greedy_loop, prefill_graph
    from decode import CONFIGS, build
    cuda_graph.COMPILE_AHEAD = ahead
    spent = {"captures": 0.0, "dry runs": 0.0}
    capture = _timed(spent, "captures", cuda_graph.capture)
    for module in (cuda_graph, greedy_loop, prefill_graph):  # each imported the name
        module.capture = capture
    cuda_graph._dry_run = _timed(spent, "dry runs", cuda_graph._dry_run)
    model = build(name)
    torch.cuda.synchronize()
    started = time.perf_counter()
    compiled = fxopt.compile(model, passes=PIPELINES[pipeline], max_batch_size=8, max_seq_len=264)
    compiled_at = time.perf_counter()
    prompt = torch.randint(0, CONFIGS[name]["vocab_size"], (1, 128))
    compiled.generate(prompt, max_new_tokens=2, eos_token_id=None)
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {"compile": compiled_at - started, "first generate": done - compiled_at, "ready": done - started, **spent}


def count_kernels(cache_dir: str) -> int:
    return sum(1 for _, _, files in os.walk(cache_dir) for f in files if f.endswith(".cubin"))


def run(name: str, pipeline: str, ahead: bool) -> dict:
    """``one`` in a fresh process with an empty Triton cache of its own."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "TRANSFORMERS_VERBOSITY": "error"}
        out = subprocess.run([sys.executable, __file__, "--one", name, pipeline, str(int(ahead))],
                             capture_output=True, text=True, check=False, env=env)
        if out.returncode:
            raise RuntimeError(f"cold start of {name} ({pipeline}) failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["kernels"] = count_kernels(cache)
    return result


def table(rows: list[dict]) -> str:
    head = f"{'model':<10} {'weights':<7} {'kernels compiled':<16} {'compile s':>9} {'first generate s':>16} " \
           f"{'ready s':>7} {'captures s':>10} {'dry runs s':>10} {'kernels':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["median"]
        lines.append(f"{r['model']:<10} {r['pipeline']:<7} {r['way']:<16} {m['compile']:>9.1f} "
                     f"{m['first generate']:>16.1f} {m['ready']:>7.1f} {m['captures']:>10.1f} {m['dry runs']:>10.1f} "
                     f"{m['kernels']:>7.0f}")
    lines.append("(seconds, median of the runs; each run a fresh process with an empty Triton cache)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama2-7b", "llama-1b"])
    parser.add_argument("--pipelines", nargs="+", default=["bf16", "int8"], choices=sorted(PIPELINES))
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--runs", type=int, default=1, help="fresh processes per model, pipeline and way (default 1)")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: one cold start
    args = parser.parse_args()
    if args.one:
        name, pipeline, ahead = args.one
        print(json.dumps(one(name, pipeline, ahead == "1")))
        return
    from decode import CONFIGS
    import torch
    if not torch.cuda.is_available():
        parser.error("a cold start is timed on a CUDA device; none is visible")
    for name in args.models:
        if name not in CONFIGS:
            parser.error(f"unknown model '{name}'; known: {', '.join(sorted(CONFIGS))}")
    rows = []
    for name in args.models:
        for pipeline in args.pipelines:
            for way in args.ways:
                runs = [run(name, pipeline, WAYS[way]) for _ in range(args.runs)]
                median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append(dict(model=name, pipeline=pipeline, way=way, runs=runs, median=median))
                print(f"{name} {pipeline} {way}: " + ", ".join(f"ready {r['ready']:.1f}s" for r in runs), flush=True)
    import triton
    from compile_time import finish
    finish(rows, table(rows), f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores, triton {triton.__version__}",
           args.json)


if __name__ == "__main__":
    main()
