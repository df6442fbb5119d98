"""Where a decode step's time goes: the kernels of fxopt's CUDA-graph step, from the profiler.

    python benchmarks/profile_step.py --models llama2-7b --variants fxopt fxopt-int8
    python benchmarks/profile_step.py --models llama-1b --batches 1 8 --new 32

Per model, variant and batch: ``fxopt.compile`` (the pipelines of ``benchmarks/decode.py``), one
warm ``generate``, then ``generate`` of ``--new`` tokens under ``torch.profiler``. Every decode
step replays the same kernels, so the step is the shortest period of the kernel sequence at the
end of the trace, and a decoder layer the shortest period inside the step. Printed per kernel of
a decoder layer (averaged over all layers and steps): its name and grid, its duration, and the gap
since the kernel before it ended (negative: they overlapped, as programmatic dependent launch
lets them). Then the layer and the step against their bandwidth floors: the bytes they must read
(weights, plus K/V at the mean history length) over the device-to-device copy bandwidth measured
in the same run.

The table says which kernels sit furthest above the bytes they read, and how much of a step is
kernel edges (the gaps) rather than kernels. ``--trace DIR`` also writes each run's Chrome trace.

``--prefill N`` also profiles one prefill of N tokens (batch 1) per variant: its kernels summed by
name, the largest first, their share of the GPU's busy time, and the busy time and the prefill's
span against the matmul floor (2 x parameters x N over the bf16 GEMM rate measured in the run).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode  # noqa: E402  (the benchmark's models, pipelines and ceilings)


def kernel_events(trace_path: str) -> list[dict]:
    """GPU kernels of a Chrome trace in start order: name, grid, start and duration (µs)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    kernels.sort(key=lambda e: e["ts"])
    return [dict(name=e["name"], grid=tuple(e.get("args", {}).get("grid", ())), ts=float(e["ts"]),
                 dur=float(e["dur"])) for e in kernels]


def shortest_period(keys: list, repeats: int, at_least: int = 1) -> int | None:
    """The shortest p >= at_least such that the last ``repeats * p`` keys are one block of p keys
    repeated."""
    for p in range(at_least, len(keys) // repeats + 1):
        tail = keys[len(keys) - repeats * p:]
        if all(tail[i] == tail[i % p] for i in range(len(tail))):
            return p
    return None


def decode_steps(kernels: list[dict], n_layers: int, max_trailing: int = 16) -> list[list[dict]]:
    """The decode steps at the end of a trace: each a list of its kernels, with ``gap`` (µs since
    the kernel before ended). Up to ``max_trailing`` kernels after the last step (generate's own
    bookkeeping) are skipped; the first step found is dropped (its gap reaches back into whatever
    ran before it)."""
    keys = [(k["name"], k["grid"]) for k in kernels]
    for trailing in range(max_trailing + 1):
        end = len(keys) - trailing
        period = shortest_period(keys[:end], repeats=3, at_least=n_layers)
        if period is not None:
            break
    else:
        raise RuntimeError("no repeating decode step in the trace's last kernels")
    n_steps = 3
    while end - (n_steps + 1) * period >= 1 and keys[end - (n_steps + 1) * period:end - n_steps * period] == keys[end - period:end]:
        n_steps += 1
    steps = []
    for s in range(n_steps - 1):
        lo = end - (s + 1) * period
        steps.insert(0, [dict(kernels[i], gap=kernels[i]["ts"] - (kernels[i - 1]["ts"] + kernels[i - 1]["dur"]))
                         for i in range(lo, lo + period)])
    return steps


def _label(k: dict) -> str:
    grid = "x".join(str(g) for g in k["grid"]) if k["grid"] else "?"
    name = k["name"]
    return f"{name[:48]}[{grid}]"


def layer_table(step: list[dict], n_layers: int) -> tuple[list[dict], list[dict]]:
    """Split one step (kernels with 'gap') into the per-layer pattern and the rest.

    Looks for a block of kernels repeated ``n_layers`` times back to back; returns (the layer's
    kernels with durations and gaps averaged over the layers, the kernels outside the layers)."""
    keys = [(k["name"], k["grid"]) for k in step]
    for length in range(1, len(keys) // n_layers + 1):
        for start in range(0, len(keys) - n_layers * length + 1):
            block = keys[start:start + length]
            if all(keys[start + i] == block[i % length] for i in range(n_layers * length)):
                layer = []
                for j in range(length):
                    same = [step[start + i * length + j] for i in range(n_layers)]
                    layer.append(dict(same[0], dur=statistics.fmean(k["dur"] for k in same),
                                      gap=statistics.fmean(k["gap"] for k in same)))
                rest = step[:start] + step[start + n_layers * length:]
                return layer, rest
    return [], step


def profile_run(compiled, vocab: int, batch: int, prompt: int, new: int, n_layers: int, trace_dir: str) -> list[list[dict]]:
    """The decode steps of one profiled generate: a list of steps, each its kernels with gaps."""
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(0, vocab, (batch, prompt))
    compiled.generate(ids, max_new_tokens=new, eos_token_id=None)  # warm: graphs captured
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled.generate(ids, max_new_tokens=new, eos_token_id=None)
        torch.cuda.synchronize()
    path = os.path.join(trace_dir, f"trace-b{batch}.json")
    prof.export_chrome_trace(path)
    return decode_steps(kernel_events(path), n_layers)


def kernel_totals(kernels: list[dict]) -> list[tuple[str, int, float]]:
    """(name, launches, total µs) per kernel name, the largest total first."""
    totals: dict[str, list] = {}
    for k in kernels:
        entry = totals.setdefault(k["name"], [0, 0.0])
        entry[0] += 1
        entry[1] += k["dur"]
    return sorted(((name, n, us) for name, (n, us) in totals.items()), key=lambda t: -t[2])


def prefill_report(name: str, system: str, tokens: int, kernels: list[dict], floor_us: float, top: int = 12) -> str:
    """The kernels of one prefill by total time, and the prefill against its matmul floor."""
    busy = sum(k["dur"] for k in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"] if kernels else 0.0
    lines = [f"\n{name} {system} prefill of {tokens} tokens: {len(kernels)} kernels",
             f"{'kernel':<70} {'n':>5} {'us':>10} {'share':>7}"]
    rows = kernel_totals(kernels)
    for kname, n, us in rows[:top]:
        lines.append(f"{kname[:70]:<70} {n:>5} {us:>10.1f} {100 * us / busy:>6.1f}%")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"{f'({len(rest)} other kernels)':<70} {sum(n for _, n, _ in rest):>5} "
                     f"{sum(us for _, _, us in rest):>10.1f} {100 * sum(us for _, _, us in rest) / busy:>6.1f}%")
    lines.append(f"busy {busy / 1e3:.2f} ms, span {span / 1e3:.2f} ms; matmul floor {floor_us / 1e3:.2f} ms "
                 f"({span / floor_us:.2f}x)")
    return "\n".join(lines)


def profile_prefill(compiled, vocab: int, tokens: int, trace_dir: str) -> list[dict]:
    """The kernels of one warm prefill of ``tokens`` tokens (``generate`` of one token), in order."""
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(0, vocab, (1, tokens))
    for _ in range(2):  # the prefill graph captured, the allocator settled
        compiled.generate(ids, max_new_tokens=1, eos_token_id=None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled.generate(ids, max_new_tokens=1, eos_token_id=None)
        torch.cuda.synchronize()
    path = os.path.join(trace_dir, f"trace-prefill{tokens}.json")
    prof.export_chrome_trace(path)
    return kernel_events(path)


def mean_step(steps: list[list[dict]]) -> list[dict]:
    """Kernel by kernel, durations and gaps averaged over the steps."""
    return [dict(kernels[0], dur=statistics.fmean(k["dur"] for k in kernels),
                 gap=statistics.fmean(k["gap"] for k in kernels)) for kernels in zip(*steps)]


def report(name: str, system: str, batch: int, steps: list[list[dict]], layer_floor_us: float,
           step_floor_us: float, n_layers: int) -> str:
    step = mean_step(steps)
    layer, rest = layer_table(step, n_layers)
    span = sum(k["dur"] + k["gap"] for k in step)
    busy = sum(k["dur"] for k in step)
    lines = [f"\n{name} {system} batch {batch}: {len(steps)} steps of {len(step)} kernels "
             f"({len(layer)} a layer x {n_layers}, {len(rest)} outside)",
             f"{'kernel[grid]':<60} {'us':>8} {'gap us':>8}"]
    for k in layer:
        lines.append(f"{_label(k):<60} {k['dur']:>8.2f} {k['gap']:>8.2f}")
    layer_span = sum(k["dur"] + k["gap"] for k in layer)
    lines.append(f"{'layer (kernels + gaps)':<60} {sum(k['dur'] for k in layer):>8.2f} "
                 f"{sum(k['gap'] for k in layer):>8.2f}   = {layer_span:.1f} us, "
                 f"floor {layer_floor_us:.1f} us ({layer_span / layer_floor_us:.2f}x)")
    lines.append("outside the layers:")
    for k in rest:
        lines.append(f"{_label(k):<60} {k['dur']:>8.2f} {k['gap']:>8.2f}")
    lines.append(f"step: span {span:.1f} us, kernels {busy:.1f} us, gaps {span - busy:.1f} us; "
                 f"floor {step_floor_us:.1f} us ({span / step_floor_us:.2f}x)")
    return "\n".join(lines)


def layer_weight_bytes(model) -> int:
    """Bytes of the first decoder layer's parameters."""
    layer = model.model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama2-7b"], choices=sorted(decode.CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["fxopt", "fxopt-int8"], choices=sorted(decode.VARIANTS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=16, help="tokens of the profiled generate")
    parser.add_argument("--trace", help="folder for the Chrome traces (default: a temporary one)")
    parser.add_argument("--prefill", type=int, default=0, metavar="N",
                        help="also profile one prefill of N tokens per variant (0: none)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the profile times GPU kernels")

    import fxopt
    ceil = decode.ceilings()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy {ceil['copy_TBps']} TB/s")
    for name in args.models:
        model = decode.build(name)
        cfg = model.config
        n_layers = cfg.num_hidden_layers
        context = args.prompt + args.new // 2
        bw = ceil["copy_TBps"] * 1e12 / 1e6  # bytes per µs
        for variant in args.variants:
            passes, options = decode.VARIANTS[variant]
            compiled = fxopt.compile(model, passes=passes, max_batch_size=max(args.batches),
                                     max_seq_len=args.prompt + 2 * args.new + 8, **options)
            for note in decode.pipeline_notes(compiled.report()):
                print(f"{name} {variant} NOTE {note}", flush=True)
            trace_dir = os.path.join(args.trace, f"{name}-{variant}") if args.trace else tempfile.mkdtemp()
            os.makedirs(trace_dir, exist_ok=True)
            # INT8: a byte a weight instead of two, plus a 2-byte scale per 128 (the default group).
            scale = 0.5 + 1 / 128 if "int8" in variant else 1.0
            for batch in args.batches:
                kv = decode.kv_bytes_per_step(cfg, batch, context)
                layer_floor = (layer_weight_bytes(model) * scale + kv / n_layers) / bw
                head = cfg.vocab_size * cfg.hidden_size * 2
                step_floor = layer_floor * n_layers + head / bw
                steps = profile_run(compiled, cfg.vocab_size, batch, args.prompt, args.new, n_layers, trace_dir)
                print(report(name, variant, batch, steps, layer_floor, step_floor, n_layers), flush=True)
            if args.prefill:  # compiled again with a cache just long enough, as decode.py's prefill
                del compiled
                compiled = fxopt.compile(model, passes=passes, max_batch_size=1, max_seq_len=args.prefill + 8,
                                         **options)
                floor = decode.matmul_floor_ms(model, args.prefill, ceil) * 1e3
                kernels = profile_prefill(compiled, cfg.vocab_size, args.prefill, trace_dir)
                print(prefill_report(name, variant, args.prefill, kernels, floor), flush=True)
            del compiled
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
