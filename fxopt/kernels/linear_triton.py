"""Triton implementation of ``torch.ops.fxopt.linear`` (see ``linear.py`` for the semantics).

Two paths, picked by the number of rows M of x (leading dims flattened):

Decode (M = 1): one kernel, prologue -> GEMV -> epilogue.
    Grid ``cdiv(N, BLOCK_N)``. A program owns ``BLOCK_N`` output features and *all* of K: each
    weight byte is read once, and the K loop is a ``tl.range(..., num_stages)`` so that Triton
    streams the weight tiles through shared memory ``num_stages - 1`` steps ahead (the bytes in
    flight the memory bandwidth asks for: ~3 MiB GPU-wide on an H200). x is tiny and every program
    re-reads it from L2. Products on the FMA units, fp32 partial sums per column, one cross-lane
    reduction at the end.

    * ``rms_norm`` prologue: ``rms_norm(x) @ W^T = rstd * ((x * g) @ W^T)`` with ``rstd`` one
      number a row, so the program accumulates ``sum(x^2)`` over the very x tiles it multiplies
      and scales its result at the end: no second pass over x, no normalized copy in memory.
      (No split of K: every program must see the whole row to know ``rstd``.)
    * ``gated_<kind>`` prologue: the program loads the gate and the up features of its K block
      (``I`` apart in ``[gate | up]``) and multiplies ``act(gate) * up``.
    * epilogue: the bias and the residual are added to the fp32 accumulator, rounded once.
    * ``gated_<kind>`` epilogue (the gate/up projection, whose rows are ``[gate | up]``): a program
      takes ``BLOCK_N / 2`` features as pairs of rows ``(f, I + f)`` and writes ``act(gate) * up``,
      so the activation costs no kernel of its own and no recomputation in the next projection
      (which a ``gated`` prologue makes every one of its programs do over all of K).

More rows (batched decode, prompts): the prologue op (``fxopt.rms_norm`` / ``fxopt.gated_act``,
    Triton kernels of their own), then cuBLAS: ``addmm`` with the residual as its input (one kernel
    for GEMM and add) when there is no bias; then a gated epilogue's ``fxopt.gated_act``. (At M = 8
    a tensor-core variant of the fused kernel, x padded to 16 rows, ran 1.0-1.9x slower than cuBLAS
    on an H200, llama2-7b shapes, 2026-11-27.)

Numerics: fp32 accumulation. The decode kernel rounds the prologue's output to the weight dtype
before the product (as the unfused ops store it), except that ``rms_norm`` applies ``rstd`` to the
fp32 sum instead of to each element: within an ulp of the activation dtype of the reference per
element, and at least as accurate.

CUDA graphs: the launcher allocates only its output, never syncs with the host and picks its path
and tiles from shapes alone.

CPU: under ``TRITON_INTERPRET=1`` the launcher runs on CPU tensors, which is how the tests exercise
it. The interpreter gets ``tl.dot`` in bf16 wrong: test there in fp32 / fp16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import (apply_prologue, check_epilogue, check_prologue, gated_kind, linear, linear_add_, linear_reference,
                     output_features)

from .triton_env import (PREFETCH_CHUNKS, PREFETCH_TAIL_BYTES, check_pdl_knobs, jit as _jit, pdl_code, prefetch_plan,
                         tl, triton)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tiles: BLOCK_N output features x BLOCK_K input features a step. From the H200 sweep in
# benchmark() (bf16, llama2-7b / llama-1b shapes, 19 settings): 8 x 512, 3 stages, 4 warps was within
# 3 % of each shape's best but one (llama-1b's down projection: 11.9 us against 10.9 with 8 x 1024).
DECODE_TILES = dict(block_n=8, block_k=512, num_warps=4, num_stages=3, trigger_steps=2, preload=1024)
# The PDL knobs (below), batch 1, H100 80GB HBM3, 2026-12-07 (benchmarks/decode.py --gemv), ms a token:
# 0 / 0 -> trigger_steps=1, preload=1024: 4.801 -> 4.777 (7B), 1.039 -> 1.030 (1B); then in two runs
# trigger_steps=2: 4.779 -> 4.753 and 4.774 -> 4.747 (7B), 1.028 -> 1.018 and 1.030 -> 1.018 (1B);
# trigger_steps=3: 4.736 (7B) but 1.040 (1B); preload=2048 with 2 steps: 4.736, 1.023.
# The two PDL knobs (triton_env; both no-ops without PDL):
#   trigger_steps  let the next kernel launch this many K steps before the end of the loop (0:
#                  after the loop), so that it is resident -- and warming its weights -- while
#                  this one streams its last steps
#   preload        bytes of each of the program's weight rows prefetched into L2 before the PDL
#                  wait (a multiple of 128; 0: none)


# --------------------------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------------------------- #

if triton is not None:
    from .activation_triton import _activation, gated_pairs
    from .triton_env import l2_prefetch, l2_prefetch_rows, pdl_trigger, pdl_trigger_at, pdl_wait


@_jit
def _input_block(X, G, offs_k, K, PROLOGUE: tl.constexpr, ACT: tl.constexpr, DT: tl.constexpr):
    """K block ``offs_k`` of the GEMV's input after the prologue, rounded to DT (the weight dtype, as
    the unfused ops store it) in fp32, and the squares of x for rms_norm (zeros otherwise)."""
    mask_k = offs_k < K
    # x is read by every program: keep it in L2.
    x = tl.load(X + offs_k, mask=mask_k, other=0.0, eviction_policy="evict_last").to(tl.float32)
    squares = tl.zeros_like(x)
    if PROLOGUE == 1:
        squares = x * x
        x = x * tl.load(G + offs_k, mask=mask_k, other=0.0, eviction_policy="evict_last").to(tl.float32)
    elif PROLOGUE == 2:
        up = tl.load(X + K + offs_k, mask=mask_k, other=0.0, eviction_policy="evict_last")
        # act(gate) rounded to the storage dtype before the product, as the unfused op does.
        x = _activation(x, ACT).to(up.dtype).to(tl.float32) * up.to(tl.float32)
    return x.to(DT).to(tl.float32), squares


@_jit
def _weight_block(w_rows, mask_n, offs_k, K):
    # The weights are read once: first out of L2.
    return tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0,
                   eviction_policy="evict_first").to(tl.float32)


@_jit
def gemv_rows(pid, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """(the weight rows of program ``pid``, their mask, the output features it writes, their mask).
    Plain: rows and features ``pid * BLOCK_N + [0, BLOCK_N)``. GATED (a gated epilogue over a
    weight of N = 2H rows ``[gate | up]``): BLOCK_N // 2 features f, each as the pair of rows
    (f, H + f), interleaved, so that a row's gate and up are reduced side by side."""
    if GATED:
        half = N // 2
        offs_f = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        offs_n = offs_f + (tl.arange(0, BLOCK_N) % 2) * half
        offs_o = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        return offs_n, offs_f < half, offs_o, offs_o < half
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_n, offs_n < N, offs_n, offs_n < N


@_jit
def _decode_kernel(
    X, W, BIAS, RES, G, Y, PF, N, K, stride_wn, eps, pf_total, pf_chunk,
    PROLOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr, PREFETCH: tl.constexpr = False, PF_CHUNKS: tl.constexpr = 1,
    TRIGGER_STEPS: tl.constexpr = 0, PRELOAD: tl.constexpr = 0, EPILOGUE: tl.constexpr = "none",
):
    """Y[n-block] = epilogue(prologue(X) . W[n-block]^T) for one row X, over all of K.

    PROLOGUE: 0 none, 1 rms_norm (G its weight), 2 gated activation ACT over X = [gate | up].
    EPILOGUE: "none", or an activation kind: the weight's rows are [gate | up] and Y gets
    act(gate) * up (``gemv_rows`` pairs them up; the bias is added before, there is no residual).
    PDL (triton_env): waits for the kernel before (which wrote X, RES) before reading anything
    but its own weight rows, whose first PRELOAD bytes it may prefetch into L2 first; triggers the
    next kernel TRIGGER_STEPS K steps before the end of its loop (0: after it).
    PREFETCH (triton_env.l2_prefetch): after its loop, the program prefetches its share of
    ``pf_total`` bytes at PF (the next linear's weight) into L2, while the last programs finish."""
    pid = tl.program_id(0)
    offs_n, mask_n, offs_o, mask_o = gemv_rows(pid, N, BLOCK_N, EPILOGUE != "none")
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn  # int64: a 256k-vocab head passes 2**31
    offs_kb = tl.arange(0, BLOCK_K)
    DT: tl.constexpr = W.dtype.element_ty

    if PDL and PRELOAD > 0:
        ELT: tl.constexpr = DT.primitive_bitwidth // 8
        l2_prefetch_rows(W.to(tl.pointer_type(tl.int8)), offs_n, N, stride_wn * ELT, K * ELT, PRELOAD)
    pdl_wait(PDL)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # summed across lanes once, at the end
    sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    k_trigger = tl.maximum(tl.cdiv(K, BLOCK_K) - TRIGGER_STEPS, 0) * BLOCK_K
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        pdl_trigger_at(k0, k_trigger, PDL, TRIGGER_STEPS)
        offs_k = k0 + offs_kb
        x, squares = _input_block(X, G, offs_k, K, PROLOGUE, ACT, DT)
        acc += _weight_block(w_rows, mask_n, offs_k, K) * x[None, :]
        sum_sq += squares
    pdl_trigger(PDL)
    if PREFETCH:
        l2_prefetch(PF, pid, pf_total, pf_chunk, PF_CHUNKS)
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y / tl.sqrt(tl.sum(sum_sq, axis=0) / K + eps)

    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if EPILOGUE != "none":
        y = tl.reshape(gated_pairs(y[None, :], EPILOGUE, DT, 1, BLOCK_N), [BLOCK_N // 2])
    if HAS_RES:
        y += tl.load(RES + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    tl.store(Y + offs_o, y.to(Y.dtype.element_ty), mask=mask_o)


# --------------------------------------------------------------------------------------------- #
# Launcher
# --------------------------------------------------------------------------------------------- #

_PROLOGUE_CODES = {"none": 0, "rms_norm": 1}


def _decode_ok(x2: Tensor, weight: Tensor, bias, residual2, norm_weight) -> bool:
    """The decode kernel takes one dtype throughout and contiguous rows."""
    tensors = [t for t in (x2, weight, bias, residual2, norm_weight) if t is not None]
    return (x2.dtype in DTYPES and all(t.dtype == x2.dtype and t.device == x2.device for t in tensors)
            and weight.stride(-1) == 1 and all(t.is_contiguous() for t in tensors if t is not weight))


def decode_tiles(overrides: dict | None = None) -> dict:
    """DECODE_TILES with ``overrides`` applied; unknown keys and bad PDL knobs are named."""
    unknown = set(overrides or {}) - set(DECODE_TILES)
    if unknown:
        raise ValueError(f"linear_triton: unknown tile keys {sorted(unknown)}; known: {sorted(DECODE_TILES)}")
    tiles = {**DECODE_TILES, **(overrides or {})}
    check_pdl_knobs(tiles["trigger_steps"], tiles["preload"], "linear_triton")
    return tiles


def linear_decode(x2: Tensor, weight: Tensor, bias: Tensor | None, residual2: Tensor | None, prologue: str,
                  norm_weight: Tensor | None, eps: float, tiles: dict | None = None,
                  prefetch: Tensor | None = None, epilogue: str = "none") -> Tensor:
    """The decode kernel on one row: x ``[1, K]`` (``[1, 2K]`` gated), residual ``[1, N]``; returns ``[1, N]``
    (``[1, N / 2]`` after a gated epilogue).
    ``prefetch``: the first PREFETCH_TAIL_BYTES of this weight go to L2 as the programs finish."""
    n, k = weight.shape
    tiles = decode_tiles(tiles)
    n_out = output_features(n, epilogue)
    y = torch.empty((1, n_out), dtype=x2.dtype, device=x2.device)
    kind = gated_kind(prologue)
    pdl = pdl_code(x2.device)
    # A gated epilogue's program reads BLOCK_N rows (BLOCK_N / 2 pairs) and writes BLOCK_N / 2 features.
    programs = triton.cdiv(n_out, tiles["block_n"] // 2 if epilogue != "none" else tiles["block_n"])
    pf_total, pf_chunk = prefetch_plan(prefetch, programs, limit=PREFETCH_TAIL_BYTES)
    _decode_kernel[(programs,)](
        x2, weight, bias if bias is not None else y, residual2 if residual2 is not None else y,
        norm_weight if norm_weight is not None else y, y, prefetch if pf_total else y,
        n, k, weight.stride(0), float(eps), pf_total, pf_chunk,
        PROLOGUE=2 if kind else _PROLOGUE_CODES[prologue], ACT=kind or "silu",
        HAS_BIAS=bias is not None, HAS_RES=residual2 is not None,
        BLOCK_N=tiles["block_n"], BLOCK_K=tiles["block_k"], NUM_STAGES=tiles["num_stages"],
        PDL=pdl, PREFETCH=pf_total > 0, PF_CHUNKS=PREFETCH_CHUNKS,
        TRIGGER_STEPS=tiles["trigger_steps"] if pdl else 0, PRELOAD=tiles["preload"] if pdl else 0,
        EPILOGUE=gated_kind(epilogue) or "none", num_warps=tiles["num_warps"], launch_pdl=pdl > 0,
    )
    return y


def epilogue_kernel(y: Tensor, epilogue: str) -> Tensor:
    """The linear's output after its epilogue, by the epilogue op's own kernel (for many rows)."""
    kind = gated_kind(epilogue)
    return torch.ops.fxopt.gated_act(y, kind) if kind else y


def prologue_kernel(x: Tensor, prologue: str, norm_weight: Tensor | None, eps: float) -> Tensor:
    """The linear's input after its prologue, computed by the prologue op's own kernel (for many
    rows, where the GEMM is cuBLAS's and cannot fold it)."""
    if prologue == "rms_norm":
        return torch.ops.fxopt.rms_norm(x, norm_weight, eps)
    kind = gated_kind(prologue)
    return torch.ops.fxopt.gated_act(x, kind) if kind else x


def linear_prompt(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, prologue: str,
                  norm_weight: Tensor | None, eps: float, epilogue: str = "none") -> Tensor:
    """Many rows: the prologue's own kernel, then cuBLAS (the residual as addmm's input), then the
    epilogue's kernel."""
    x = prologue_kernel(x, prologue, norm_weight, eps)
    if epilogue != "none":
        return epilogue_kernel(F.linear(x, weight, bias), epilogue)  # check_epilogue: no residual
    if residual is not None and bias is None and residual.dtype == x.dtype and residual.shape[:-1] == x.shape[:-1]:
        y = torch.addmm(residual.reshape(-1, weight.shape[0]), x.reshape(-1, x.shape[-1]), weight.t())
        return y.view(residual.shape)
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                  prologue: str = "none", norm_weight: Tensor | None = None, eps: float = 0.0,
                  epilogue: str = "none", prefetch: Tensor | None = None) -> Tensor:
    check_prologue(prologue, norm_weight)
    check_epilogue(epilogue, weight.shape[0], residual)
    n = weight.shape[0]
    lead = x.shape[:-1]
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    x2 = x.reshape(m, x.shape[-1])
    residual2 = None
    if residual is not None:
        if residual.shape != (*lead, n):
            return linear_reference(x, weight, bias, residual, prologue, norm_weight, eps)  # broadcasting
        residual2 = residual.reshape(m, n)
    if m == 1 and _decode_ok(x2, weight, bias, residual2, norm_weight):
        y = linear_decode(x2, weight, bias, residual2, prologue, norm_weight, eps, prefetch=prefetch, epilogue=epilogue)
        return y.view(*lead, y.shape[-1])
    return linear_prompt(x, weight, bias, residual, prologue, norm_weight, eps, epilogue)


def linear_add_triton(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, prologue: str = "none",
                      norm_weight: Tensor | None = None, eps: float = 0.0) -> None:
    """``fxopt.linear_add_`` on CUDA: for many rows the prologue's kernel, then cuBLAS accumulating
    into the residual (``addmm_``, beta = 1: no copy of it); otherwise ``fxopt.linear`` and a copy."""
    check_prologue(prologue, norm_weight)
    n = weight.shape[0]
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    same_dtype = residual.dtype == x.dtype == weight.dtype and (norm_weight is None or norm_weight.dtype == x.dtype)
    if m > 1 and bias is None and same_dtype and residual.is_contiguous() and residual.shape == (*x.shape[:-1], n):
        x = prologue_kernel(x, prologue, norm_weight, eps)
        residual.view(m, n).addmm_(x.reshape(m, x.shape[-1]), weight.t())
        return
    residual.copy_(linear_triton(x, weight, bias, residual, prologue, norm_weight, eps))


def register() -> bool:
    """Make the Triton launchers the CUDA implementations of ``torch.ops.fxopt.linear`` and
    ``torch.ops.fxopt.linear_add_``."""
    if triton is None:
        return False
    linear.register_kernel("cuda")(linear_triton)
    linear_add_.register_kernel("cuda")(linear_add_triton)
    return True


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.linear_triton
# --------------------------------------------------------------------------------------------- #

# (name, in features, out features, prologue, residual): the four projections of a Llama block.
SHAPES = {
    "llama2-7b": ((4096, 12288, "rms_norm", False), (4096, 4096, "none", True),
                  (4096, 22016, "rms_norm", False), (11008, 4096, "gated_silu", True), (4096, 32000, "rms_norm", False)),
    "llama-1b": ((2048, 3072, "rms_norm", False), (2048, 2048, "none", True),
                 (2048, 16384, "rms_norm", False), (8192, 2048, "gated_silu", True), (2048, 128256, "rms_norm", False)),
}
SWEEP = [dict(block_n=bn, block_k=bk, num_warps=4, num_stages=s)
         for bn in (4, 8, 16) for bk in (256, 512, 1024) for s in (3, 4)] + [dict(block_n=16, block_k=512, num_warps=8, num_stages=3)]


def _graph_time(fn, reps: int = 20) -> float:
    """Microseconds per call of ``fn`` (which runs ``copies`` launches) replayed as a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / reps


def benchmark(models=("llama2-7b", "llama-1b"), sweep: bool = True, dtype=torch.bfloat16) -> list[dict]:
    """Decode (M = 1) linears of a Llama block: the fused kernel against the unfused path (prologue
    kernel + cuBLAS + residual add, what a graph without ``fxopt.linear`` runs) and against cuBLAS's
    GEMV alone, as CUDA-graph replays over enough weight copies that none is served from L2 (as in a
    model, where a layer's weights were evicted long ago). With ``sweep`` also the best of SWEEP.
    Prints one line per shape; returns the rows."""
    from . import triton_ops

    triton_ops.register_all()
    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for model in models:
        for k, n, prologue, has_res in SHAPES[model]:
            copies = max(2, -(-400 * 2**20 // (n * k * 2)))
            weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
            g = torch.rand(k, device=device, dtype=dtype) + 0.5 if prologue == "rms_norm" else None
            x = torch.randn(1, 2 * k if gated_kind(prologue) else k, device=device, dtype=dtype)
            a = apply_prologue(x, prologue, g, 1e-5)  # the GEMV's input, for cuBLAS alone
            res = torch.randn(1, n, device=device, dtype=dtype) if has_res else None
            expect = linear_reference(x.float(), weights[0].float(), None, None if res is None else res.float(),
                                      prologue, None if g is None else g.float(), 1e-5)
            got = linear_decode(x, weights[0], None, res, prologue, g, 1e-5)
            err = ((got.float() - expect).norm() / expect.norm()).item()

            def unfused():
                for w in weights:
                    linear_prompt(x, w, None, res, prologue, g, 1e-5)

            def cublas_only():
                for w in weights:
                    F.linear(a, w)

            def fused(tiles):
                return lambda: [linear_decode(x, w, None, res, prologue, g, 1e-5, tiles) for w in weights]

            t_unfused = _graph_time(unfused) / copies
            t_cublas = _graph_time(cublas_only) / copies
            t_default = _graph_time(fused(None)) / copies
            best, best_t = None, t_default
            for tiles in SWEEP if sweep else ():
                try:
                    t = _graph_time(fused(tiles), reps=10) / copies
                except Exception:  # out of shared memory / registers: not a candidate
                    continue
                if t < best_t:
                    best, best_t = tiles, t
            row = dict(model=model, k=k, n=n, prologue=prologue, residual=has_res, err=err, unfused_us=t_unfused,
                       cublas_us=t_cublas, default_us=t_default, default_gbs=n * k * 2 / t_default / 1e3,
                       best_us=best_t, best=best)
            rows.append(row)
            print(f"{model:10s} {k:6d}x{n:<6d} {prologue:10s} res={int(has_res)} err {err:.1e} | unfused {t_unfused:6.1f} "
                  f"cuBLAS {t_cublas:6.1f} fused {t_default:6.1f} us ({row['default_gbs']:5.0f} GB/s) "
                  f"best {best_t:6.1f} {best}", flush=True)
            del weights
    return rows


if __name__ == "__main__":
    benchmark()
