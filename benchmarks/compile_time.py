#!/usr/bin/env python3
"""Compile time of fxopt's default pipeline on a model shape, each run a fresh process (cold).

    python benchmarks/compile_time.py                         # llama2-7b and llama-1b, 2 runs each way
    python benchmarks/compile_time.py --models llama2-7b --runs 3 --json out.json

The model is built from its config on the meta device and compiled with
``fxopt.checkpoint.compile_on_meta`` (no weight is made or read, so this is host work only and
runs on any machine): capture, then the passes up to loading. Two ways of capturing are timed
side by side: the default, which traces three decoder layers and copies the third for the rest
(``fxopt.repeated_layers``), and ``trace_every_layer=True``. The table gives the seconds of the
whole compile, of the capture and of each pass (median over the runs).
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

WAYS = {"copied layers": False, "every layer traced": True}


def one(config_dir: str, trace_every_layer: bool) -> dict:
    """Compile once in this process; seconds of the whole, of the capture and of each pass."""
    import torch
    from fxopt.checkpoint import compile_on_meta
    started = time.perf_counter()
    compiled = compile_on_meta(config_dir, dtype=torch.bfloat16, max_batch_size=8, max_seq_len=264,
                               trace_every_layer=trace_every_layer)
    total = time.perf_counter() - started
    report = compiled.report()
    return {"total": total, "capture": report.capture_seconds, **{r.name: r.seconds for r in report},
            "nodes": len(compiled.graph.nodes), "layers": compiled.info.layers}


def run(config_dir: str, trace_every_layer: bool) -> dict:
    """``one`` in a fresh Python process: nothing warmed up by an earlier compile."""
    out = subprocess.run([sys.executable, __file__, "--one", config_dir, *(["--whole"] if trace_every_layer else [])],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"compile of {config_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0]["median"] if k not in ("nodes", "layers")]
    head = f"{'model':<10} {'capture way':<19} " + " ".join(f"{k:>15}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['way']:<19} " + " ".join(f"{r['median'][k]:>15.2f}" for k in keys))
    lines.append("(seconds, median of the runs; 'total' is the whole compile_on_meta call, building the empty model included)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama2-7b", "llama-1b"])
    parser.add_argument("--runs", type=int, default=2, help="fresh processes per model and way (default 2)")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one compile of this config dir
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.whole)))
        return
    from decode import CONFIGS
    from transformers import LlamaConfig
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name not in CONFIGS:
                parser.error(f"unknown model '{name}'; known: {', '.join(sorted(CONFIGS))}")
            config_dir = os.path.join(tmp, name)
            LlamaConfig(**CONFIGS[name]).save_pretrained(config_dir)
            for way, whole in WAYS.items():
                runs = [run(config_dir, whole) for _ in range(args.runs)]
                median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "layers"}
                rows.append(dict(model=name, way=way, runs=runs, median=median, layers=runs[0]["layers"]))
                print(f"{name} {way}: {[round(r['total'], 2) for r in runs]} s ({runs[0]['layers']})", flush=True)
    import platform
    finish(rows, table(rows), f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", args.json)


def finish(rows: list[dict], text: str, machine: str, json_path: str | None) -> None:
    """Print the machine, versions and date, then the table ``text``; write ``rows`` to ``json_path``."""
    import torch
    import transformers
    print(f"\n{machine}; torch {torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}")
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
