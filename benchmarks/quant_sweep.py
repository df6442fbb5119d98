#!/usr/bin/env python3
"""Tile sweep for fxopt's Triton quantized linear (``fxopt/kernels/quant_triton.py``) on one GPU.

    PYTHONPATH=$PWD python benchmarks/quant_sweep.py            # the full grid: < 6 min on an H100/H200
    PYTHONPATH=$PWD python benchmarks/quant_sweep.py --quick    # a smaller grid (~1-2 min)
    PYTHONPATH=$PWD python benchmarks/quant_sweep.py --list     # the grid only; no GPU needed

For llama2-7b's linears (in x out: 4096x4096, 4096x11008, 11008x4096), bits 8 and 4, group 128,
bf16, M = 1, 2, 4, 8, 16 it times decode launch configurations of ``quant_linear_triton``
(BLOCK_N, BLOCK_K, warps, stages, the FMA or tensor-core kernel, the int->float conversion, run
length, split-K policy and reduction) against bf16 ``F.linear`` on the unquantized weight, and prints
the best three per point, a summary, and a ``DECODE_TILES`` literal to paste into quant_triton.py.
A prefill section times the fused GEMM, dequantize + cuBLAS and decode against bf16 at
M = 16 .. 2048 and suggests ``DECODE_MAX_M`` and ``DEQUANT_MIN_M``. Everything also goes to
``$OUT/quant_sweep.txt`` when ``$OUT`` is set.

Method: CUDA-graph replays (``triton.testing.do_bench_cudagraph``; how fxopt runs decode), each
replay cycling through enough copies of the weights (3x the L2 cache) that every call reads them
from HBM, as a model's successive layers do -- a single weight replayed back to back would partly
stay in the 50 MiB L2 and flatter small layers. GB/s counts qweight + scales bytes (the bf16 weight
for F.linear). Compilation happens up front in parallel worker processes (Triton's on-disk cache
then serves the timing process); kernels are shared across shapes and M (only constexprs differ),
so the grid costs one compile per distinct tile, not per point. The middle M values (4, 8) only
re-time the best configurations of M = 2 and M = 16. ``--budget`` (seconds) stops the sweep early
and still prints what it has.
"""
from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in, out): q/k/v/o, gate/up, down
BITS = (8, 4)
DECODE_MS = (1, 2, 4, 8, 16)
PREFILL_MS = (16, 32, 64, 128, 256, 512, 2048)
COMPILE_K = 4096  # the shape the workers compile on (any K >= every BLOCK_K gives the same kernels)
COMPILE_N = 256


# --------------------------------------------------------------------------------------------- #
# The grid
# --------------------------------------------------------------------------------------------- #

def gemv_grid(bits: int, quick: bool) -> list[dict]:
    """M = 1 launch configurations: the FMA kernel over tiles, warps/stages and the int -> float
    conversion, the run length and split policy around the default, and the tensor-core kernel
    (dot=True)."""
    wide = 2 if bits == 4 else 1  # int4: twice the features for the same bytes
    converts = ("cast", "magic") if bits == 4 else ("cast", "magic", "i2f", "mixed")  # int4: i2f / mixed are magic
    if quick:
        tiles = [(16, 512 * wide), (16, 1024 * wide), (32, 512 * wide)]
        stages = [(4, 2), (4, 3)]
    else:
        tiles = [(8, 1024 * wide), (16, 512 * wide), (16, 1024 * wide), (32, 256 * wide), (32, 512 * wide)]
        stages = [(4, 1), (4, 2), (4, 3), (8, 3)]
    grid = [dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=st, convert=convert, dot=False, waves=2)
            for (bn, bk), (warps, st), convert in itertools.product(tiles, stages, converts)]
    if not quick:
        for (bn, bk), convert in itertools.product(tiles[3:], converts):  # these split at N = 4096:
            base = dict(block_n=bn, block_k=bk, num_warps=4, num_stages=3, convert=convert, dot=False)
            grid += [dict(base, waves=0), dict(base, waves=2, fused_reduce=True)]  # never, or fused
        for sub_k, convert in itertools.product((8, 32, 128), converts):
            grid.append(dict(block_n=16, block_k=512 * wide, num_warps=4, num_stages=3, convert=convert, sub_k=sub_k,
                             dot=False, waves=2))
    dots = [(32, 128, 4, 4), (64, 128, 4, 4)] if quick else [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3),
                                                              (128, 128, 4, 4), (64, 128, 8, 4)]
    for bn, bk, warps, st in dots:
        grid.append(dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=st, dot=True, waves=2))
    return grid


def dot_grid(bits: int, quick: bool) -> list[dict]:
    """M > 1 (tensor cores) launch configurations: tiles, warps/stages and the split policy
    (waves 2 = split when the N blocks are fewer than 2 per SM, 0 = never; fused_reduce)."""
    if quick:
        tiles = [(32, 128), (64, 128), (128, 128)]
        stages = [(4, 3), (4, 4)]
        splits = [dict(waves=2), dict(waves=0)]
    else:
        tiles = [(32, 128), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128)]
        stages = [(4, 3), (4, 4), (8, 4)]
        splits = [dict(waves=2), dict(waves=0), dict(waves=2, fused_reduce=True)]
    return [dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=st, **split)
            for (bn, bk), (warps, st), split in itertools.product(tiles, stages, splits)]


def full_config(qt, cfg: dict) -> dict:
    """A grid entry completed with DECODE_DEFAULTS (so that it can be pasted as a table entry)."""
    return {**qt.DECODE_DEFAULTS, **cfg}


def launch_key(plan: dict) -> tuple:
    """What distinguishes two launches (configs giving the same key are timed once)."""
    return tuple(plan[k] for k in ("block_m", "block_n", "block_k", "sub", "convert", "num_warps", "num_stages",
                                   "split_k", "fused_reduce", "scales_ahead"))


def compile_key(bits: int, plan: dict) -> tuple:
    """What distinguishes two compiled decode kernels (constexprs and launch options)."""
    return (bits, plan["block_m"] > 1, plan["block_n"], plan["block_k"], plan["sub"], plan["convert"],
            plan["num_warps"], plan["num_stages"], plan["split_k"] > 1, plan["fused_reduce"], plan["scales_ahead"])


def short(cfg: dict, plan: dict | None = None) -> str:
    s = f"n{cfg['block_n']} k{cfg['block_k']} w{cfg['num_warps']} s{cfg['num_stages']}"
    if plan is None or plan["block_m"] == 1:
        s += f" sub{plan['sub'] if plan else cfg.get('sub_k', '-')} {plan['convert'] if plan else cfg.get('convert', 'cast')}"
    if cfg.get("dot") and (plan is None or plan["block_m"] > 1):
        s += " dot"
    if cfg.get("scales_ahead"):
        s += " scales-ahead"
    s += f" waves{cfg.get('waves', '-')}"
    if plan is not None:
        s += f" split{plan['split_k']}" + ("F" if plan["fused_reduce"] else "")
    return s


# --------------------------------------------------------------------------------------------- #
# Output: stdout and $OUT/quant_sweep.txt
# --------------------------------------------------------------------------------------------- #

class Tee:
    def __init__(self, path: str | None):
        self.file = open(path, "w") if path else None

    def __call__(self, *args, **kw):
        print(*args, **kw, flush=True)
        if self.file:
            print(*args, **kw, file=self.file, flush=True)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- #
# Parallel compilation (worker processes; Triton's disk cache hands the kernels to the main one)
# --------------------------------------------------------------------------------------------- #

_WORKER_CACHE: dict = {}


def _compile_job(job: tuple) -> tuple:
    """Run one launch of a configuration on a small problem with the same constexprs, so that its
    kernels land in Triton's cache. Returns (job, error or None, seconds)."""
    bits, m, cfg, split_k, dtype_name, group = job
    t0 = time.time()
    try:
        import torch

        from fxopt.kernels import quant_triton as qt
        from fxopt.kernels.quant import quantize_weight

        dtype = getattr(torch, dtype_name)
        key = (bits, dtype_name, group)
        if key not in _WORKER_CACHE:
            w = torch.randn(COMPILE_N, COMPILE_K, device="cuda", dtype=dtype) / COMPILE_K ** 0.5
            _WORKER_CACHE[key] = quantize_weight(w, group, bits)
        qweight, scales = _WORKER_CACHE[key]
        x = torch.randn(m, COMPILE_K, device="cuda", dtype=dtype)
        qt.quant_linear_triton(x, qweight, scales, None, group, bits, COMPILE_K, path="decode", split_k=split_k,
                               config=cfg)
        torch.cuda.synchronize()
        return job, None, time.time() - t0
    except Exception as e:  # out of shared memory / registers, or a compiler error: skip the config
        return job, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:150] if str(e).strip() else ''}", \
            time.time() - t0


def precompile(jobs: dict, workers: int, out: Tee) -> dict:
    """Compile every job ({key: job}) in ``workers`` processes; returns {key: error} for the failures."""
    failed = {}
    if not jobs:
        return failed
    t0 = time.time()
    keys = list(jobs)
    if workers <= 1:
        results = ((key, _compile_job(jobs[key])) for key in keys)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        futures = {pool.submit(_compile_job, jobs[key]): key for key in keys}
        results = ((futures[f], f.result()) for f in as_completed(futures))
    for i, (key, (_, err, _)) in enumerate(results, 1):
        if err:
            failed[key] = err
        if i % 20 == 0 or i == len(keys):
            progress(f"  compiled {i}/{len(keys)} ({time.time() - t0:.0f} s, {len(failed)} failed)")
    if pool is not None:
        pool.shutdown()
    out(f"# compiled {len(keys)} decode kernels in {time.time() - t0:.0f} s with {workers} workers; "
        f"{len(failed)} failed (skipped)")
    for key, err in list(failed.items())[:10]:
        out(f"#   skip bits={jobs[key][0]} {short(jobs[key][2])}: {err}")
    return failed


# --------------------------------------------------------------------------------------------- #
# Timing helpers
# --------------------------------------------------------------------------------------------- #

class Weights:
    """Copies of one layer's weights (quantized and bf16), enough to spill the L2 cache, handed out
    round robin."""

    def __init__(self, torch, qt, in_f, out_f, bits, group, dtype, l2_bytes, rotate=True, device="cuda"):
        from fxopt.kernels.quant import quantize_weight

        w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5
        qweight, scales = quantize_weight(w, group, bits)
        self.q_bytes = qweight.numel() * qweight.element_size() + scales.numel() * scales.element_size()
        self.w_bytes = w.numel() * w.element_size()
        n_q = max(1, math.ceil(3 * l2_bytes / self.q_bytes)) if rotate else 1
        n_w = max(1, math.ceil(3 * l2_bytes / self.w_bytes)) if rotate else 1
        self.quant = [(qweight, scales)] + [(qweight.clone(), scales.clone()) for _ in range(n_q - 1)]
        self.dense = [w] + [w.clone() for _ in range(n_w - 1)]

    @staticmethod
    def cycle(items):
        it = itertools.cycle(items)
        return lambda: next(it)


# --------------------------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------------------------- #

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--list", action="store_true", help="print the grid and exit (no GPU needed)")
    ap.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=BITS)
    ap.add_argument("--ms", type=int, nargs="+", default=list(DECODE_MS), help="decode rows (<= 64)")
    ap.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES], help="IN x OUT, e.g. 4096x11008")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--rep", type=float, default=5.0, help="ms of replays a measurement (do_bench_cudagraph rep)")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; the sweep stops early past it")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill section")
    ap.add_argument("--no-rotate", action="store_true", help="one weight copy (L2-resident numbers)")
    # A dry run of the whole script on CPU (TRITON_INTERPRET=1, tiny shapes, wall-clock "timings"):
    # for checking the script itself without a GPU.
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    if any(m < 1 or m > 64 for m in args.ms):
        ap.error("--ms values must be in 1..64 (the decode kernel's range)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import torch

    from fxopt.kernels import quant_triton as qt

    if qt.triton is None:
        print("quant_sweep: triton is not installed", file=sys.stderr)
        return 2
    if args.list:
        for bits in args.bits:
            g, d = gemv_grid(bits, args.quick), dot_grid(bits, args.quick)
            print(f"bits={bits}: {len(g)} M=1 configurations, {len(d)} M>1 configurations")
            for cfg in g + d:
                print("   ", short(full_config(qt, cfg)))
        return 0
    out_dir = os.environ.get("OUT")
    out = Tee(os.path.join(out_dir, "quant_sweep.txt") if out_dir else None)
    dtype = getattr(torch, args.dtype)
    deadline = t_start + args.budget
    if args.smoke:
        if not qt.INTERPRET:
            print("quant_sweep: --smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        dev, l2_bytes, args.workers, args.no_rotate = torch.device("cpu"), 0, 0, True
        dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # the interpreter's bf16 dot is wrong

        def bench(fn) -> float:  # wall-clock microseconds of one call: exercises the script, not the GPU
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        out(f"# SMOKE RUN on CPU (interpreter): timings are meaningless; torch {torch.__version__}")
    elif not torch.cuda.is_available() or qt.INTERPRET:
        print("quant_sweep: needs a CUDA GPU (torch.cuda.is_available() is False, or TRITON_INTERPRET=1 is set); "
              "nothing measured. --list prints the grid without one.", file=sys.stderr)
        return 2
    else:
        from triton.testing import do_bench_cudagraph

        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        out(f"# {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes >> 20} MiB; torch {torch.__version__}, "
            f"triton {qt.triton.__version__}; {args.dtype}, group {args.group}, "
            f"{'quick' if args.quick else 'full'} grid{'' if not args.no_rotate else ', no weight rotation'}")

        def bench(fn) -> float:  # microseconds
            return do_bench_cudagraph(fn, rep=args.rep) * 1e3
    out(f"# current defaults: DECODE_DEFAULTS = {qt.DECODE_DEFAULTS}")
    out(f"#                   DECODE_TILES = {qt.DECODE_TILES}")

    # ---- the launches of every point, deduplicated, and their kernels compiled up front ----------
    # points[(in, out, bits, m)] = {launch key: (plan, [configurations giving that launch])}
    points = {}
    jobs = {}
    for (in_f, out_f), bits, m in itertools.product(args.shapes, args.bits, args.ms):
        grid = [full_config(qt, c) for c in (gemv_grid(bits, args.quick) if m == 1 else dot_grid(bits, args.quick))]
        default = qt.decode_tiles(m, bits)  # always timed, and with its scales knob flipped (the A/B)
        grid += [default, dict(default, scales_ahead=not default["scales_ahead"])]
        launches = {}
        for cfg in grid:
            plan = qt.decode_plan(m, out_f, in_f, args.group, dev, None, cfg, bits=bits)
            launches.setdefault(launch_key(plan), (plan, []))[1].append(cfg)
            ckey = compile_key(bits, plan)
            if ckey not in jobs:
                jobs[ckey] = (bits, 1 if plan["block_m"] == 1 else 2, dict(cfg), 2 if plan["split_k"] > 1 else 1,
                              str(dtype).removeprefix("torch."), args.group)
        points[(in_f, out_f, bits, m)] = launches
    progress(f"{sum(map(len, points.values()))} decode launches over {len(points)} points, "
             f"{len(jobs)} distinct kernels to compile")
    failed_keys = set(precompile(jobs, args.workers, out)) if not args.smoke else set()

    # ---- decode sweep ------------------------------------------------------------------------------
    results = {}  # point -> [(us, cfg, plan)], one entry per configuration (aliases share a timing)
    bf16 = {}  # (in, out, m) -> us
    q_bytes = {}
    # M = 2 and 16 first: the middle M values only re-time their best launches (and the default).
    order = [m for m in (1, 2, 16) if m in args.ms] + [m for m in args.ms if m not in (1, 2, 16)]
    sweep_deadline = deadline - (0 if args.no_prefill else 60)
    stopped = False
    for (in_f, out_f), bits in itertools.product(args.shapes, args.bits):
        if stopped:
            break
        wts = Weights(torch, qt, in_f, out_f, bits, args.group, dtype, l2_bytes, not args.no_rotate, dev)
        q_bytes[(in_f, out_f, bits)] = wts.q_bytes
        next_q, next_w = wts.cycle(wts.quant), wts.cycle(wts.dense)
        for m in order:
            x = torch.randn(m, in_f, device=dev, dtype=dtype)
            if (in_f, out_f, m) not in bf16:
                bf16[(in_f, out_f, m)] = bench(lambda: torch.nn.functional.linear(x, next_w()))
            launches = points[(in_f, out_f, bits, m)]
            keep = set()
            if m not in (1, 2, 16):
                for ref_m in (2, 16):  # launch keys do not depend on M for M in 2..16 (BLOCK_M = 16)
                    ranked = sorted(results.get((in_f, out_f, bits, ref_m), []), key=lambda r: r[0])
                    keep |= {launch_key(p) for _, _, p in ranked[:4 if args.quick else 8]}
            if keep:
                dflt = launch_key(qt.decode_plan(m, out_f, in_f, args.group, dev, None, qt.decode_tiles(m, bits),
                                                 bits=bits))
                launches = {k: v for k, v in launches.items() if k in keep or k == dflt}
            timed = []
            for plan, cfgs in launches.values():
                if time.time() > sweep_deadline:
                    stopped = True
                    break
                if compile_key(bits, plan) in failed_keys:
                    continue

                def run(cfg=cfgs[0]):
                    qweight, scales = next_q()
                    return qt.quant_linear_triton(x, qweight, scales, None, args.group, bits, in_f, path="decode",
                                                  config=cfg)
                try:
                    t = bench(run)
                except Exception as e:
                    progress(f"  skip {short(cfgs[0], plan)}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                timed += [(t, cfg, plan) for cfg in cfgs]
            results[(in_f, out_f, bits, m)] = timed
            report_point(out, qt, (in_f, out_f, bits, m), timed, bf16[(in_f, out_f, m)], wts.q_bytes, args, dev)
            if stopped:
                out(f"# --budget {args.budget:.0f} s reached: the sweep stops here")
                break
        del wts, next_q, next_w
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    summary(out, qt, results, bf16, q_bytes, args, dev)
    suggest_tiles(out, qt, results, args)

    if not args.no_prefill:
        prefill_section(out, qt, torch, bench, args, dev, dtype, l2_bytes, deadline)
    out(f"# done in {time.time() - t_start:.0f} s")
    return 0


def is_default(qt, point, plan, args, dev) -> bool:
    in_f, out_f, bits, m = point
    return launch_key(plan) == launch_key(qt.decode_plan(m, out_f, in_f, args.group, dev, None,
                                                         qt.decode_tiles(m, bits), bits=bits))


def report_point(out, qt, point, timed, t_bf16, q_bytes, args, dev) -> None:
    in_f, out_f, bits, m = point
    ranked, seen = [], set()
    for r in sorted(timed, key=lambda r: r[0]):  # one row a launch (aliases share a timing)
        if launch_key(r[2]) not in seen:
            seen.add(launch_key(r[2]))
            ranked.append(r)
    out(f"\n{in_f}x{out_f} bits={bits} M={m}: bf16 F.linear {t_bf16:7.1f} us; {len(ranked)} launches timed")
    # The best three, the default and the default with its scales knob flipped (the A/B of that knob).
    flipped = dict(qt.decode_tiles(m, bits), scales_ahead=not qt.decode_tiles(m, bits)["scales_ahead"])
    flipped_key = launch_key(qt.decode_plan(m, out_f, in_f, args.group, dev, None, flipped, bits=bits))
    rows = ranked[:3] + [r for r in ranked[3:] if is_default(qt, point, r[2], args, dev)
                         or launch_key(r[2]) == flipped_key]
    for t, cfg, plan in rows:
        mark = "  (default)" if is_default(qt, point, plan, args, dev) else ""
        mark += "  (default, scales knob flipped)" if launch_key(plan) == flipped_key else ""
        out(f"  {t:7.1f} us {q_bytes / t / 1e3:6.0f} GB/s {t_bf16 / t:5.2f}x bf16  {short(cfg, plan)}{mark}")


def summary(out, qt, results, bf16, q_bytes, args, dev) -> None:
    out("\n# Summary (decode): default vs best configuration per point")
    out(f"{'in':>6} {'out':>6} {'bits':>4} {'M':>3} | {'bf16 us':>8} | {'default us':>10} {'GB/s':>6} {'x bf16':>6} | "
        f"{'best us':>8} {'GB/s':>6} {'x bf16':>6} | best configuration")
    for point, timed in sorted(results.items(), key=lambda kv: kv[0]):
        if not timed:
            continue
        in_f, out_f, bits, m = point
        t_bf = bf16[(in_f, out_f, m)]
        qb = q_bytes[(in_f, out_f, bits)]
        best = min(timed, key=lambda r: r[0])
        dflt = [r for r in timed if is_default(qt, point, r[2], args, dev)]
        d = (f"{dflt[0][0]:10.1f} {qb / dflt[0][0] / 1e3:6.0f} {t_bf / dflt[0][0]:6.2f}" if dflt
             else f"{'-':>10} {'':6} {'':6}")
        out(f"{in_f:6} {out_f:6} {bits:4} {m:3} | {t_bf:8.1f} | {d} | {best[0]:8.1f} {qb / best[0] / 1e3:6.0f} "
            f"{t_bf / best[0]:6.2f} | {short(best[1], best[2])}")


def suggest_tiles(out, qt, results, args) -> None:
    """One configuration per (bits, M bucket): the one with the best geometric-mean slowdown
    against each point's best, over the points it was timed at (and timed at all of them)."""
    buckets = [(1, [1]), (8, [m for m in args.ms if 1 < m <= 8]),
               ("MAX_DECODE_BLOCK_M", [m for m in args.ms if m > 8])]
    out("\n# Suggested decode tiles (geometric-mean slowdown vs each point's best over the bucket's points;")
    out("# keys are DECODE_DEFAULTS'; paste over DECODE_TILES in fxopt/kernels/quant_triton.py)")
    lines = ["DECODE_TILES = {"]
    for bits in args.bits:
        lines.append(f"    {bits}: (")
        for bound, ms in buckets:
            pts = [p for p in results if p[2] == bits and p[3] in ms and results[p]]
            if not pts:
                continue
            scores = {}
            for p in pts:
                best = min(r[0] for r in results[p])
                for t, cfg, _ in results[p]:
                    key = tuple(sorted(cfg.items()))
                    scores.setdefault(key, []).append(t / best)
            full = {k: v for k, v in scores.items() if len(v) == len(pts)}
            if not full:
                continue
            key, ratios = min(full.items(), key=lambda kv: sum(map(math.log, kv[1])))
            cfg = dict(key)
            overrides = {k: v for k, v in cfg.items() if qt.DECODE_DEFAULTS.get(k) != v}
            gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
            lines.append(f"        ({bound}, dict({', '.join(f'{k}={v!r}' for k, v in overrides.items())})),"
                         f"  # {gm:.3f}x / worst {max(ratios):.3f}x of the best, M in {ms}")
        lines.append("    ),")
    lines.append("}")
    for line in lines:
        out(line)


def prefill_section(out, qt, torch, bench, args, dev, dtype, l2_bytes, deadline) -> None:
    """Fused GEMM vs dequantize + cuBLAS vs decode vs bf16 F.linear from M = 16 to 2048, and the
    dequantize kernel alone (its tile defaults)."""
    ms = [m for m in PREFILL_MS if not args.quick or m in (16, 64, 128, 256, 2048)]
    if args.smoke:
        ms = [16, 70, 128]
    out("\n# Prefill: fused GEMM ('prefill'), dequantize + cuBLAS ('dequant'), decode (M <= 64), bf16 F.linear")
    out(f"{'in':>6} {'out':>6} {'bits':>4} {'M':>5} | {'bf16 us':>8} {'TFLOP/s':>7} | {'prefill':>8} {'dequant':>8} "
        f"{'decode':>8} | fastest (x bf16)")
    table = {}
    for (in_f, out_f), bits in itertools.product(args.shapes, args.bits):
        if time.time() > deadline:
            out("# --budget reached: prefill section cut short")
            break
        wts = Weights(torch, qt, in_f, out_f, bits, args.group, dtype, l2_bytes, not args.no_rotate, dev)
        next_q, next_w = wts.cycle(wts.quant), wts.cycle(wts.dense)
        for m in ms:
            x = torch.randn(m, in_f, device=dev, dtype=dtype)
            t_bf = bench(lambda: torch.nn.functional.linear(x, next_w()))
            row = {}
            for path in ("prefill", "dequant", "decode"):
                if path == "decode" and m > qt.MAX_DECODE_BLOCK_M:
                    continue
                try:
                    row[path] = bench(lambda path=path: qt.quant_linear_triton(
                        x, *next_q(), None, args.group, bits, in_f, path=path))
                except Exception as e:
                    progress(f"  {path} M={m}: {type(e).__name__}: {str(e)[:100]}")
            table[(in_f, out_f, bits, m)] = row
            if not row:
                continue
            fastest = min(row, key=row.get)
            cells = " ".join(f"{row[p]:8.1f}" if p in row else f"{'-':>8}" for p in ("prefill", "dequant", "decode"))
            out(f"{in_f:6} {out_f:6} {bits:4} {m:5} | {t_bf:8.1f} {2 * m * in_f * out_f / t_bf / 1e6:7.0f} | {cells} | "
                f"{fastest} ({t_bf / row[fastest]:.2f})")
        if in_f == args.shapes[0][0] and out_f == args.shapes[0][1]:
            dequant_tiles(out, qt, bench, wts, in_f, out_f, bits, args, dtype)
        del wts, next_q, next_w
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # Thresholds: dequant from the smallest M after which it always beats the fused GEMM; decode up
    # to the largest M up to which it always beats the fused GEMM.
    def always(pred, m):
        rows = [r for (i, o, b, mm), r in table.items() if mm == m]
        return bool(rows) and all(pred(r) for r in rows)

    dq = [m for m in ms if all(always(lambda r: r.get("dequant", 1e30) <= r.get("prefill", 1e30), mm)
                               for mm in ms if mm >= m)]
    dc = [m for m in ms if all(always(lambda r: r.get("decode", 1e30) <= r.get("prefill", 1e30), mm)
                               for mm in ms if mm <= m)]
    out(f"\n# Suggested: DEQUANT_MIN_M = {min(dq) if dq else 'keep'} (now {qt.DEQUANT_MIN_M}); "
        f"DECODE_MAX_M = {max(dc) if dc else 'keep'} (now {qt.DECODE_MAX_M}; only values in {ms} were tried)")


def dequant_tiles(out, qt, bench, wts, in_f, out_f, bits, args, dtype) -> None:
    """The dequantize kernel alone, a few tiles (bytes moved: qweight + scales read, [N, K] written)."""
    import torch

    tiles = [dict(block_n=32, block_k=256, num_warps=4), dict(block_n=16, block_k=512, num_warps=4),
             dict(block_n=64, block_k=128, num_warps=8), dict(block_n=32, block_k=512, num_warps=8)]
    moved = wts.q_bytes + out_f * in_f * torch.finfo(dtype).bits // 8
    res = []
    for cfg in tiles[:2] if args.quick else tiles:
        try:
            t = bench(lambda cfg=cfg: qt.dequantize_triton(*wts.cycle(wts.quant)(), args.group, bits, in_f, dtype,
                                                           config=cfg))
            res.append((t, cfg))
        except Exception as e:
            progress(f"  dequant {cfg}: {type(e).__name__}")
    for t, cfg in sorted(res, key=lambda r: r[0]):
        out(f"    dequantize {in_f}x{out_f} bits={bits}: {t:7.1f} us {moved / t / 1e3:6.0f} GB/s  {cfg}"
            f"{'  (default)' if cfg['block_n'] == qt.DEQUANT_BLOCK_N and cfg['block_k'] == qt.DEQUANT_BLOCK_K else ''}")


if __name__ == "__main__":
    sys.exit(main())
