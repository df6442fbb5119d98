"""Decode and prefill latency: fxopt against transformers eager and torch.compile, same run, same card.

    python benchmarks/decode.py --models llama-1b llama2-7b --batches 1 8 32
    python benchmarks/decode.py --models llama-1b --batches 1 --no-compile   # skip the slow anchor

Llama-architecture models with random bf16 weights shaped like the anchors in ANCHORS.md, prompt
128, 128 new tokens (greedy), static KV cache. Side by side, in one process:

- ``hf-eager``    transformers eager with a StaticCache;
- ``hf-compile``  transformers + ``torch.compile(mode="reduce-overhead", fullgraph=True)`` with
                  gpt-fast's Inductor flags (coordinate-descent tuning);
- ``fxopt``       ``fxopt.compile(model)``: the default pipeline, CUDA graphs on;
- other fxopt pipelines with ``--variants``: ``fxopt-nofuse`` and ``fxopt-nofold`` (without
  ``fuse`` / ``fold_linear``), ``fxopt-fold-nogated`` (the gated activation a kernel of its own),
  ``fxopt-fold-epi`` (folded into the gate/up projection's epilogue instead of the down
  projection's prologue), ``fxopt-norotary`` (the rotary not folded into the attention), ``fxopt-notables`` and
  ``fxopt-int8-notables`` (without ``position_tables``: the rotary cos/sin computed every step),
  ``fxopt-hostloop`` and ``fxopt-int8-hostloop`` (greedy's pick and token feedback on the host
  between CUDA-graph steps instead of inside them: ``cuda_graph_greedy_loop=False``),
  ``fxopt-prefetch`` (the default pipeline with ``prefetch``: the attention warms the L2 with the
  output projection's weight), ``fxopt-prefetch-linears`` (every GEMV also prefetches the start of
  the next one's weight), ``fxopt-int8`` (``quantize`` then ``fold_linear``, which folds the INT8
  linears' norms and residuals and the gated activation as the gate/up projection's epilogue),
  ``fxopt-int8-act`` (the activation a kernel of its own), ``fxopt-int8-nofold``, ``fxopt-int8-prefetch``
  (unfolded, with ``prefetch``), ``fxopt-int8-foldq`` (the INT8 linears folded entirely) and
  ``fxopt-int8-foldq-gated`` (only their gated activation).

``--pdl off on`` runs every fxopt variant once per programmatic-dependent-launch mode
(``fxopt/kernels/triton_env.py``), as rows named ``fxopt/off``; without it, fxopt's default (on).
``--prefetch-l2 0.25 0.5`` likewise once per share of the L2 a prefetch may fill (rows ``fxopt@0.25``).
``--int8-gemv convert=i2f convert=mixed,block_n=16`` runs every INT8 variant once per setting of the
one-row INT8 GEMV (overrides of ``DECODE_TILES`` in ``fxopt/kernels/quant_triton.py``; rows named
``fxopt-int8[convert=i2f]``); with ``--int8-gemv-rows 8`` the settings override the entry for 2 to 8
rows instead (batch 8; rows named ``fxopt-int8[m8:num_stages=4]``).
``--gemv trigger_steps=1,preload=1024`` likewise runs every variant once per setting of the one-row
bf16/fp16 GEMV (``DECODE_TILES`` in ``fxopt/kernels/linear_triton.py``; rows named
``fxopt{trigger_steps=1,preload=1024}``), and ``--attn-preload 0 64`` once per count of
cache slots each decode attention program warms the L2 with before its PDL wait (rows ``fxopt+ap64``).
``--attn-split-blocks 1 8`` once per count of cache blocks a decode attention split must own
(``DECODE_MIN_BLOCKS_PER_SPLIT``: 8 leaves the benchmark's 264-slot cache one split and no merge
kernel; rows ``fxopt+sb8``).

``--list-runs`` prints the fxopt runs (row names) the arguments ask for, without a GPU.

Columns: ms per decoded token, tokens/s (batch × 1000 / ms), percent of the bandwidth floor
(weight + KV bytes read per step ÷ device-to-device copy bandwidth measured in the same run),
compile time (fxopt: ``fxopt.compile``; hf-compile: ``torch.compile`` and its timed runs, first
calls included), ready (fxopt: from the start of compiling until a first 2-token generate at the
first batch size returns -- kernels compiled, CUDA graphs captured: a cold start when it is the
process's first fxopt run), peak GPU memory. A prefill of 2048 tokens (batch 1) runs beside it. Results are
printed as a table and written as JSON to ``$OUT/decode.json`` (or ``--json PATH``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.nn.functional as F

from fxopt.kernels import attention_triton, linear_triton, quant_triton, triton_env

CONFIGS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
DEV = "cuda"
DEFAULT_PREFETCH_L2 = triton_env.PREFETCH_L2_FRACTION
DEFAULT_INT8_TILES = quant_triton.DECODE_TILES[8]
INT8_ROW_BOUNDS = [max_m for max_m, _ in DEFAULT_INT8_TILES]  # the entries --int8-gemv-rows can pick
DEFAULT_GEMV_TILES = dict(linear_triton.DECODE_TILES)
DEFAULT_ATTN_PRELOAD = attention_triton.DECODE_PRELOAD_SLOTS
DEFAULT_SPLIT_BLOCKS = attention_triton.DECODE_MIN_BLOCKS_PER_SPLIT
DEFAULT_FOLDED_BLOCK_N = quant_triton.FOLDED_MIN_BLOCK_N
# fxopt pipelines the benchmark can run: (passes, options); passes None: fxopt's default pipeline
PREFETCH = ["canonicalize", "kv_cache", "fuse", "position_tables", "fold_linear", "prefetch", "dce", "cuda_graph"]
INT8 = ["canonicalize", "kv_cache", "fuse", "position_tables", "quantize", "fold_linear", "dce", "cuda_graph"]


def _without(passes: list[str], name: str) -> list[str]:
    return [p for p in passes if p != name]


VARIANTS = {
    "fxopt": (None, {}),
    "fxopt-nofuse": (["canonicalize", "kv_cache", "dce", "cuda_graph"], {}),
    "fxopt-nofold": (["canonicalize", "kv_cache", "fuse", "position_tables", "dce", "cuda_graph"], {}),
    "fxopt-notables": (["canonicalize", "kv_cache", "fuse", "fold_linear", "dce", "cuda_graph"], {}),
    "fxopt-fold-nogated": (None, dict(fold_float_linear=("residual", "rms_norm"))),
    "fxopt-fold-epi": (None, dict(fold_float_linear=True)),
    "fxopt-norotary": (None, dict(fuse_skip=["rotary_into_attention"])),
    "fxopt-prefetch": (PREFETCH, {}),
    "fxopt-prefetch-linears": (PREFETCH, dict(prefetch_linears=True)),
    "fxopt-hostloop": (None, dict(cuda_graph_greedy_loop=False)),
    "fxopt-int8": (INT8, {}),
    "fxopt-int8-hostloop": (INT8, dict(cuda_graph_greedy_loop=False)),
    "fxopt-int8-notables": (_without(INT8, "position_tables"), {}),
    "fxopt-int8-nofold": (_without(INT8, "fold_linear"), {}),
    "fxopt-int8-act": (INT8, dict(fold_quant_linear=("residual", "rms_norm"))),
    "fxopt-int8-prefetch": (["canonicalize", "kv_cache", "fuse", "position_tables", "quantize", "prefetch", "dce",
                             "cuda_graph"], {}),
    "fxopt-int8-foldq": (INT8, dict(fold_quant_linear=True)),
    "fxopt-int8-foldq-gated": (INT8, dict(fold_quant_linear=("gated",))),
}


def ev_time(fn, iters=10, warmup=3) -> float:
    """Seconds per call, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def ceilings() -> dict:
    a = torch.empty(2**30, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    copy = 2 * a.numel() * 2 / ev_time(lambda: b.copy_(a)) / 1e12
    del a, b
    w = torch.randn(28672, 8192, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 8192, device=DEV, dtype=torch.bfloat16)
    gemv = w.numel() * 2 / ev_time(lambda: F.linear(v, w), iters=50) / 1e12
    del w, v
    x = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    gemm = 2 * 8192**3 / ev_time(lambda: x @ y) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"copy_TBps": round(copy, 3), "gemv_TBps": round(gemv, 3), "bf16_gemm_TFLOPs": round(gemm, 1)}


def build(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, **CONFIGS[name])
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_step(cfg, batch: int, context: int) -> int:
    """K and V bytes read by one decode step at ``context`` tokens of history (bf16)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * context * head_dim * 2


def hf_decode(model, fwd, batch, prompt, new, reps=2) -> float:
    """ms per token of transformers' own decode loop over a StaticCache (as anchor_decode.py)."""
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=prompt + new + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEV)
    best = None
    with torch.inference_mode():
        for _ in range(reps):
            cache.reset()
            logits = model(input_ids=ids, past_key_values=cache,
                           position_ids=torch.arange(prompt, device=DEV)[None].expand(batch, -1), use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(new):
                pos = torch.full((batch, 1), prompt + i, device=DEV, dtype=torch.long)
                tok = fwd(input_ids=tok, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / new
            best = dt if best is None else min(best, dt)
    return best * 1e3


def fxopt_decode(compiled, vocab, batch, prompt, new, reps=2) -> tuple[float, float]:
    """(decode ms per token, prefill ms) of fxopt's generate()."""
    ids = torch.randint(0, vocab, (batch, prompt))
    best = None
    for _ in range(reps):
        compiled.generate(ids, max_new_tokens=new, eos_token_id=None)
        t = compiled.last_timings
        if best is None or t["decode_ms_per_token"] < best[0]:
            best = (t["decode_ms_per_token"], t["prefill_ms"])
    return best


def fxopt_prefill(model, ids, in_place: bool = True) -> float:
    """ms of fxopt's prefill of ``ids`` (batch 1), compiled with a cache just long enough; with
    ``in_place`` False the prefill graph adds its residuals out of place (``last_token.py``)."""
    import fxopt
    from fxopt.runtime import last_token
    last_token.IN_PLACE_RESIDUALS = in_place
    try:
        compiled = fxopt.compile(model, max_batch_size=1, max_seq_len=ids.shape[1] + 8)
        times = []
        for _ in range(4):
            compiled.generate(ids, max_new_tokens=1, eos_token_id=None)
            times.append(compiled.last_timings["prefill_ms"])
        del compiled
    finally:
        last_token.IN_PLACE_RESIDUALS = True
        torch.cuda.empty_cache()
    return min(times[1:])


def set_prefetch_l2(fraction: float | None) -> None:
    """Set the share of the L2 one prefetch may fill (None: fxopt's default). Read at launch, so it
    holds for everything captured under it."""
    triton_env.PREFETCH_L2_FRACTION = DEFAULT_PREFETCH_L2 if fraction is None else fraction


def parse_gemv(text: str) -> dict:
    """``convert=i2f,block_n=16`` -> ``{"convert": "i2f", "block_n": 16}`` (integers where they parse)."""
    overrides = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        overrides[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return overrides


def set_int8_gemv(setting: tuple[int, dict] | None) -> None:
    """Apply a ``(rows, overrides)`` setting to the INT8 entry of quant_triton's DECODE_TILES whose
    bound on the rows is ``rows`` (None: restore the table). Read at launch, so it holds for
    everything captured under it."""
    rows, overrides = setting or (None, {})
    quant_triton.DECODE_TILES[8] = tuple((max_m, {**tiles, **overrides} if max_m == rows else tiles)
                                         for max_m, tiles in DEFAULT_INT8_TILES)


def _int8_name(setting: tuple[int, dict]) -> str:
    rows, overrides = setting
    return f"[{'' if rows == 1 else f'm{rows}:'}{_pairs(overrides)}]"


def set_gemv(overrides: dict | None) -> None:
    """Apply ``overrides`` to linear_triton's DECODE_TILES, the one-row bf16/fp16 GEMV (None: restore
    it). Read at launch, so it holds for everything captured under it."""
    linear_triton.DECODE_TILES.clear()
    linear_triton.DECODE_TILES.update({**DEFAULT_GEMV_TILES, **(overrides or {})})


def set_pdl(mode: str | None) -> None:
    """Set triton_env's PDL mode (None: its default). Kernels read it at launch, so a mode holds
    for everything compiled and captured under it."""
    triton_env.PDL_MODE = mode or os.environ.get("FXOPT_PDL", "on")


def _or_nan(fn, *args) -> float:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        return float("nan")


def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2)


# The per-run settings: argument (its values, or None for fxopt's default) and how a row names it.
SETTINGS = (
    ("pdl", lambda v: f"/{v}"),
    ("prefetch_l2", lambda v: f"@{v:g}"),
    ("int8_gemv", _int8_name),
    ("gemv", lambda v: f"{{{_pairs(v)}}}"),
    ("attn_preload", lambda v: f"+ap{v}"),
    ("attn_split_blocks", lambda v: f"+sb{v}"),
    ("int8_folded_rows", lambda v: f"+fr{v}"),
)


def _pairs(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def planned_runs(args) -> list[dict]:
    """The fxopt runs the arguments ask for, per model: every variant once per combination of the
    per-run settings (``--int8-gemv`` only for INT8 variants), each a dict of the variant, its
    row name and every setting (None: fxopt's default)."""
    runs = []
    for variant in args.variants:
        combos = [{}]
        for key, _ in SETTINGS:
            values = getattr(args, key) or [None]
            if key in ("int8_gemv", "int8_folded_rows") and "int8" not in variant:
                values = [None]
            combos = [{**c, key: v} for c in combos for v in values]
        for combo in combos:
            name = variant + "".join(fmt(combo[key]) for key, fmt in SETTINGS if combo[key] is not None)
            runs.append(dict(variant=variant, name=name, **combo))
    return runs


def run_model(name, args, ceil, rows, prefills):
    model = build(name)
    cfg = model.config
    wbytes = weight_bytes(model)
    max_batch = max(args.batches)
    seq = args.prompt + args.new + 8

    def floor_ms(batch):
        context = args.prompt + args.new // 2  # mean history length over the generation
        return (wbytes + kv_bytes_per_step(cfg, batch, context)) / (ceil["copy_TBps"] * 1e12) * 1e3

    def add(system, batch, ms, compile_s=None, peak=None, notes=(), ready_s=None):
        rows.append(dict(model=name, system=system, batch=batch, ms_per_token=round(ms, 3),
                         tokens_per_s=round(batch * 1e3 / ms, 1), pct_of_floor=round(100 * floor_ms(batch) / ms, 1),
                         floor_ms=round(floor_ms(batch), 3), compile_s=compile_s, peak_GB=peak, ready_s=ready_s))
        if notes:
            rows[-1]["notes"] = list(notes)
        print(rows[-1], flush=True)
        save(args, ceil, rows, prefills)

    # prefill 2048 tokens, batch 1
    ids = torch.randint(0, cfg.vocab_size, (1, max(args.prefill, 1)), device=DEV)
    if args.prefill:
        with torch.inference_mode():
            hf_prefill = ev_time(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), iters=5) * 1e3

    for batch in [] if args.no_eager else args.batches:
        torch.cuda.reset_peak_memory_stats()
        add("hf-eager", batch, hf_decode(model, model.forward, batch, args.prompt, args.new), peak=peak_gb())

    import fxopt
    for run in planned_runs(args):
        system, passes, options = run["name"], *VARIANTS[run["variant"]]
        try:
            set_pdl(run["pdl"])
            set_prefetch_l2(run["prefetch_l2"])
            set_int8_gemv(run["int8_gemv"])
            set_gemv(run["gemv"])
            attention_triton.DECODE_PRELOAD_SLOTS = (DEFAULT_ATTN_PRELOAD if run["attn_preload"] is None
                                                     else run["attn_preload"])
            attention_triton.DECODE_MIN_BLOCKS_PER_SPLIT = run["attn_split_blocks"] or DEFAULT_SPLIT_BLOCKS
            quant_triton.FOLDED_MIN_BLOCK_N = run["int8_folded_rows"] or DEFAULT_FOLDED_BLOCK_N
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            compiled = fxopt.compile(model, passes=passes, max_batch_size=max_batch, max_seq_len=seq, **options)
            compile_s = round(time.perf_counter() - t0, 1)
            # ready: until the first tokens of a cold start are out -- the Triton kernels compiled
            # (cold unless an earlier run of the process compiled them) and the graphs captured
            compiled.generate(torch.randint(0, cfg.vocab_size, (args.batches[0], args.prompt)), max_new_tokens=2,
                              eos_token_id=None)
            torch.cuda.synchronize()
            ready_s = round(time.perf_counter() - t0, 1)
            print(compiled.report(), flush=True)
            notes = pipeline_notes(compiled.report())
            for batch in args.batches:
                torch.cuda.reset_peak_memory_stats()
                ms, _ = fxopt_decode(compiled, cfg.vocab_size, batch, args.prompt, args.new)
                add(system, batch, ms, compile_s=compile_s, peak=peak_gb(), notes=notes, ready_s=ready_s)
        except Exception as e:  # noqa: BLE001 - record and go on to the anchors
            import traceback
            traceback.print_exc()
            rows.append(dict(model=name, system=system, error=repr(e)[:500]))
        compiled = None
        set_pdl(None)
        set_prefetch_l2(None)
        set_int8_gemv(None)
        set_gemv(None)
        attention_triton.DECODE_PRELOAD_SLOTS = DEFAULT_ATTN_PRELOAD
        attention_triton.DECODE_MIN_BLOCKS_PER_SPLIT = DEFAULT_SPLIT_BLOCKS
        quant_triton.FOLDED_MIN_BLOCK_N = DEFAULT_FOLDED_BLOCK_N
        gc.collect()
        torch.cuda.empty_cache()
    if args.prefill:
        for in_place in args.prefill_in_place or [None]:
            ms = _or_nan(fxopt_prefill, model, ids.cpu(), in_place != "off")
            prefills.append(dict(model=name, tokens=args.prefill, hf_eager_ms=round(hf_prefill, 2),
                                 fxopt_ms=round(ms, 2), in_place=in_place,
                                 matmul_floor_ms=round(matmul_floor_ms(model, args.prefill, ceil), 2)))
            print(prefills[-1], flush=True)
            save(args, ceil, rows, prefills)

    if not args.no_compile:
        import torch._inductor.config as ic
        ic.coordinate_descent_tuning = True
        for batch in args.compile_batches or args.batches:
            torch._dynamo.reset()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            cf = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            ms = hf_decode(model, cf, batch, args.prompt, args.new, reps=3)
            add("hf-compile", batch, ms, compile_s=round(time.perf_counter() - t0, 1), peak=peak_gb())
        torch._dynamo.reset()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def matmul_floor_ms(model, tokens: int, ceil: dict) -> float:
    """A prefill's floor: 2 x parameters (the embedding's aside) x tokens at the measured GEMM rate."""
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    return 2 * params * tokens / (ceil["bf16_gemm_TFLOPs"] * 1e12) * 1e3


def pipeline_notes(report) -> list[str]:
    """What in a compile report says the pipeline did less than it should: a pattern that nearly
    matched, a pass that had to re-propagate the graph. A run's table prints them under its rows,
    so a fusion that stops firing on one device shows in the run that gets slower."""
    notes = []
    for record in report:
        for key in ("near_miss", "propagated_for"):
            if record.stats.get(key):
                notes.append(f"{record.name} {key.replace('_', ' ')}: {record.stats[key]}")
    return notes


def save(args, ceil, rows, prefills):
    import transformers
    import triton
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"), **ceil}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "decode": rows, "prefill": prefills}, f, indent=1)


def table(rows, prefills) -> str:
    w = max([22] + [len(r["system"]) for r in rows])
    head = (f"{'model':<10} {'system':<{w}} {'batch':>5} {'ms/tok':>8} {'tok/s':>9} {'floor ms':>8} {'%floor':>7} "
            f"{'compile s':>9} {'ready s':>7} {'peak GB':>8}")
    lines = [head, "-" * len(head)]
    for r in sorted((r for r in rows if "error" not in r), key=lambda r: (r["model"], r["batch"], r["system"])):
        lines.append(f"{r['model']:<10} {r['system']:<{w}} {r['batch']:>5} {r['ms_per_token']:>8.3f} "
                     f"{r['tokens_per_s']:>9.1f} {r['floor_ms']:>8.3f} {r['pct_of_floor']:>6.1f}% "
                     f"{r['compile_s'] if r['compile_s'] is not None else '-':>9} {r.get('ready_s') or '-':>7} "
                     f"{r['peak_GB'] or '-':>8}")
    lines += [f"{r['model']:<10} {r['system']:<{w}} ERROR {r['error'][:150]}" for r in rows if "error" in r]
    noted = {(r["model"], r["system"]): r["notes"] for r in rows if r.get("notes")}
    lines += [f"{model:<10} {system:<{w}} NOTE  {note[:200]}" for (model, system), notes in noted.items()
              for note in notes]
    lines += ["", f"{'prefill':<10} {'tokens':>6} {'hf-eager ms':>11} {'fxopt ms':>9} {'matmul floor ms':>15}"]
    for p in prefills:
        setting = f"  residuals in place: {p['in_place']}" if p.get("in_place") else ""
        lines.append(f"{p['model']:<10} {p['tokens']:>6} {p['hf_eager_ms']:>11} {p['fxopt_ms']:>9} "
                     f"{p['matmul_floor_ms']:>15}{setting}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-1b", "llama2-7b"], choices=sorted(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=2048, help="prefill benchmark length (batch 1); 0 skips it")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile anchor (slow to compile)")
    parser.add_argument("--prefill-in-place", nargs="+", default=None, choices=["on", "off"],
                        help="time fxopt's prefill once per setting of the prefill graph's in-place residuals "
                             "(fxopt.linear_add_, runtime/last_token.py; default: fxopt's default, on)")
    parser.add_argument("--no-eager", action="store_true",
                        help="skip the transformers eager anchor (for A/Bs between fxopt settings; needs --prefill 0)")
    parser.add_argument("--compile-batches", nargs="+", type=int, default=None,
                        help="batch sizes for the torch.compile anchor (default: --batches)")
    parser.add_argument("--variants", nargs="+", default=["fxopt", "fxopt-int8"], choices=sorted(VARIANTS),
                        help="fxopt pipelines to run (fxopt: the default pipeline)")
    parser.add_argument("--pdl", nargs="+", default=None, choices=["off", "on"],
                        help="run each fxopt variant once per programmatic-dependent-launch mode")
    parser.add_argument("--prefetch-l2", nargs="+", type=float, default=None,
                        help="run each fxopt variant once per share of the L2 a prefetch may fill")
    parser.add_argument("--int8-gemv", nargs="+", type=parse_gemv, default=None, metavar="KEY=VAL,...",
                        help="run each INT8 variant once per GEMV setting: overrides of the quant_triton "
                             "DECODE_TILES entry --int8-gemv-rows picks (the one-row GEMV by default), e.g. "
                             "convert=i2f,block_n=16 (rows named variant[setting], or variant[mROWS:setting])")
    parser.add_argument("--int8-gemv-rows", type=int, default=1, choices=INT8_ROW_BOUNDS,
                        help="which DECODE_TILES entry --int8-gemv overrides, by its bound on the rows: 1 is "
                             "the one-row GEMV, 8 the launches of 2 to 8 rows (batch 8), ... (default 1)")
    parser.add_argument("--gemv", nargs="+", type=parse_gemv, default=None, metavar="KEY=VAL,...",
                        help="run each variant once per setting of the one-row bf16/fp16 GEMV: overrides of "
                             "linear_triton's DECODE_TILES, e.g. trigger_steps=1,preload=1024 (rows named "
                             "variant{setting})")
    parser.add_argument("--attn-preload", nargs="+", type=int, default=None, metavar="SLOTS",
                        help="run each variant once per count of cache slots a decode attention program "
                             "prefetches into L2 before its PDL wait (attention_triton.DECODE_PRELOAD_SLOTS; "
                             "0 or a power of two; rows named variant+apSLOTS)")
    parser.add_argument("--attn-split-blocks", nargs="+", type=int, default=None, metavar="BLOCKS",
                        help="run each variant once per count of cache blocks a decode attention split must "
                             "own (attention_triton.DECODE_MIN_BLOCKS_PER_SPLIT, >= 1; fewer splits for short "
                             "caches, one split: no merge kernel; rows named variant+sbBLOCKS)")
    parser.add_argument("--int8-folded-rows", nargs="+", type=int, default=None, metavar="ROWS",
                        help="run each INT8 variant once per count of weight rows a one-row INT8 GEMV program "
                             "at least takes when a norm or activation is folded into it (quant_triton."
                             "FOLDED_MIN_BLOCK_N; a power of two; rows named variant+frROWS)")
    parser.add_argument("--list-runs", action="store_true",
                        help="print the fxopt runs (row names) these arguments ask for, per model, and exit")
    parser.add_argument("--table", metavar="JSON", default=None,
                        help="print the table of an earlier run's JSON and exit (no GPU needed)")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "decode.json"))
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        print(", ".join(f"{k} {v}" for k, v in saved["meta"].items()))
        print(table(saved["decode"], saved["prefill"]))
        return
    for overrides in args.int8_gemv or []:
        try:  # bad keys and values fail here, not mid-run
            quant_triton.decode_plan(args.int8_gemv_rows, 4096, 4096, 128, torch.device("cpu"), config=overrides)
        except ValueError as e:
            parser.error(f"--int8-gemv: {e}")
    args.int8_gemv = args.int8_gemv and [(args.int8_gemv_rows, o) for o in args.int8_gemv]
    if args.no_eager and args.prefill:
        parser.error("--no-eager: the prefill table needs its eager anchor; pass --prefill 0 too")
    for slots in args.attn_preload or []:
        if slots < 0 or slots & (slots - 1):
            parser.error(f"--attn-preload: 0 or a power of two, got {slots}")
    for rows in args.int8_folded_rows or []:
        if rows < 1 or rows & (rows - 1):
            parser.error(f"--int8-folded-rows: a power of two, got {rows}")
    for blocks in args.attn_split_blocks or []:
        if blocks < 1:
            parser.error(f"--attn-split-blocks: at least 1, got {blocks}")
    for overrides in args.gemv or []:
        try:
            linear_triton.decode_tiles(overrides)
        except ValueError as e:
            parser.error(f"--gemv: {e}")
    if args.list_runs:
        print("\n".join(run["name"] for run in planned_runs(args)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA GPU")
    ceil = ceilings()
    print(torch.cuda.get_device_name(), torch.__version__, ceil, flush=True)
    rows, prefills = [], []
    for name in args.models:
        run_model(name, args, ceil, rows, prefills)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, copy {ceil['copy_TBps']} TB/s, "
          f"{time.strftime('%Y-%m-%d')}")
    print(table(rows, prefills))


if __name__ == "__main__":
    main()
