"""Triton implementation of ``fxopt::quant_linear`` (see ``quant.py`` for the semantics and layout).

    y = quant_linear_triton(x, qweight, scales, bias, group_size, bits, in_features)  # ≈ F.linear(x, w, bias)

x is viewed as ``[M, K]`` (leading dims flattened, ``K = in_features``), the weight is ``[N, K]``
(``N = out_features``) stored as int8 (``bits=8``) or two 4-bit values a byte (``bits=4``), with one
scale per (row, group of ``group_size`` input features). Three paths, picked by M:

Decode (``M <= DECODE_MAX_M``): a GEMV / skinny GEMM, bound by the weight bytes.
    Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``. A program owns ``BLOCK_N`` output features, a contiguous
    share of K and *all* M rows of x: each weight byte is read from memory exactly once. Reaching
    the memory bandwidth (~4.3 TB/s on an H200: ~16 bytes per SM per clock) takes two things:

    * Bytes in flight: about 3 MiB GPU-wide (bandwidth x latency). The old 32 x 128 int8 tile (4 KiB
      a step, loads straight to registers, 2 programs an SM) kept far less. Now the K loop is a
      ``tl.range(..., num_stages)``, which makes Triton stream the weight tiles through shared
      memory with cp.async ``num_stages - 1`` steps ahead (without it Triton pipelines only loads
      that feed a ``tl.dot``), and ``BLOCK_K`` is no longer tied to the group: the M = 1 default is
      4 x 1024 int8 = 4 KiB a step, three stages. All programs together then hold roughly
      ``N x BLOCK_K x (num_stages - 1)`` bytes in flight; ``BLOCK_N`` trades program count against
      x re-reads from L2. (Triton's pipeliner needs the weight pointer and row stride divisible by
      16, as Triton specializes them at launch: without that the loads stay plain ``ld.global``.)
    * Few instructions per weight. At full bandwidth an SM must take in ~11.5 int8 weights a clock
      on an H100 (3 TB/s, 132 SMs, ~2 GHz) and ~18 on an H200 (4.3 TB/s); it issues 128
      thread-instructions a clock, i.e. ~11 / ~7 per int8 weight and half that per int4 weight, and
      converts int -> float (I2F) at a quarter rate, 16 a clock. Instructions per weight (sm_90
      SASS; benchmarks/quant_sweep.py measures what they cost):
      - scales apply per *run*, not per weight: the block is summed in runs of ``SUB`` features that
        lie inside one group (``tl.sum`` of a ``[BLOCK_N, BLOCK_K // SUB, SUB]`` view) and each run
        sum is multiplied by its scale: ~1.5 floating-point instructions a weight (the product
        and Triton's in-thread add tree) instead of a scale multiply plus an FMA;
      - the int8 -> fp32 conversion (config ``convert``), loop instructions a weight from Triton
        3.6's sm_90 SASS at 8 x 1024 / 16 x 1024 tiles (compiled without a GPU:
        ``triton.compile`` with ``GPUTarget("cuda", 90, 32)``):
        ``cast`` (Triton's: a PRMT to sign-extend the byte, then I2F.S16) 4.66 / 4.23;
        ``magic`` (a byte OR-ed into the mantissa of 2**23 is 2**23 + byte exactly: Triton emits a
        PRMT or LOP3 to extract it, a LOP3 and an FADD, all full-rate) 5.91 / 5.48;
        ``i2f`` (inline PTX ``bfe.s32`` + ``cvt.rn.f32.s32``, which ptxas folds into one
        byte-selecting I2F.S8) 3.91 / 3.48, but I2F is quarter-rate;
        ``mixed`` (half the bytes each way, the magic one a PRMT and an FADD) 4.67 / 4.24;
      - 4 bits: the low and high nibbles multiply the even and odd features of x (split once per
        block, shared by all rows) with no interleave of the weights, and the high nibble is taken
        in place (``byte & 0xF0`` is 16 x nibble; x's odd features are divided by 16 instead):
        ~5.5 instructions a weight, from ~10 before;
      - M > 1 pads x to 16 rows (``tl.dot``'s minimum) and uses the tensor cores: the CUDA cores
        only convert (Triton's own int8 -> bf16 is a packed magic-number sequence, ~2 a weight;
        nibbles go to fp16 / bf16 by a 16-bit magic number, and meet x's even / odd features in
        two half-width dots). When a K block lies in one group, the integer weights (exact in
        fp16 / bf16) go to the dot as they are and the scale multiplies the ``[M, BLOCK_N]`` result;
        wider blocks scale the weights first. ``dot=True`` runs M = 1 this way too.
    Scales are loaded per run (``[BLOCK_N, BLOCK_K // SUB]``), so any BLOCK_K works with any group.

    Split-K only when the N blocks alone leave SMs idle: ``waves`` programs per SM are aimed for and
    the split count is ``round(waves * SMs / N blocks)`` (1 when there are enough). A split writes
    fp32 partials ``[SPLIT_K, M, N]`` that are summed in split order, so results are deterministic
    (no float atomics). The sum runs either in a second small kernel (``fused_reduce=False``) or in
    the same launch: each program bumps an int32 arrival counter for its N block and the last to
    arrive sums the partials (in split order, whoever is last) and resets the counter, saving a
    launch (~2 us of a ~10 us layer). The counters live in one zeroed buffer per device, allocated
    outside CUDA-graph capture; the fused reduction therefore assumes quant_linear launches on one
    device do not overlap (one stream, as fxopt runs), and falls back to the kernel when the
    buffer would first have to be allocated during a capture.

    Tile settings come from ``DECODE_TILES`` (per bit width, per M bucket); ``decode_plan`` shows
    what a launch will use. ``benchmarks/quant_sweep.py`` measures the alternatives on a GPU.

Prefill, mid M (``DECODE_MAX_M < M < DEQUANT_MIN_M``; an empty range with the measured constants,
so only ``path="prefill"`` runs it): a fused tiled GEMM.
    Grid ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` in grouped order (``GROUP_M`` row blocks sweep the
    columns together, so a weight tile is reused from L2). Each K step loads an x tile and a weight
    tile, dequantizes the weights in registers, rounds them to the activation dtype exactly as the
    reference does and feeds ``tl.dot`` (fp32 accumulation). It reads 1 or 0.5 bytes a weight.

Prefill, large M (``M >= DEQUANT_MIN_M``): dequantize + cuBLAS.
    Tensor-core throughput decides here, and cuBLAS runs ~2.9x faster than the fused kernel (668
    vs 232 TFLOP/s for 2048 x 4096 x 11008 in bf16 on an H200), while dequantizing into a
    temporary costs about one memory pass (~40 us for 4096 x 11008: 1 byte read, 2 written a
    weight). ``_dequant_kernel`` writes the ``[N, K]`` weight in ``x.dtype`` (bit-identical to
    ``quant.dequantize_weight``) and ``torch.addmm`` does the rest. Weights above
    ``DEQUANT_MAX_NUMEL`` elements are done in row chunks to bound the temporary.

Numerics: fp32 accumulation everywhere. The prefill GEMM and the dequantize path round the
dequantized weight to the activation dtype, as the reference (the dequantize path matches it
bit for bit). The decode paths do not round the weight: ``q * x`` is exact in fp32 and the scale
multiplies fp32 sums, so they are within one activation-dtype ulp per weight of the reference and
at least as accurate. The bias is rounded to ``x.dtype`` (as the reference's ``bias.to(x.dtype)``)
and added to the fp32 accumulator before the one final rounding.

Ragged shapes: every load is masked, so ``K`` need not divide by the block or the group (the last
group may be shorter: SmolLM2's 576 = 4.5 x 128), ``K`` may be odd with 4 bits (the last byte's
high nibble is padding), ``N`` and ``M`` need not divide by their blocks. Out-of-range x reads come
back 0 and weights stay finite there, so padding contributes exactly 0. Groups: a run is the longest
power of two dividing the group (128 -> 128, 48 -> 16, 100 -> 4, 7 -> 1: every weight scaled on its
own, the slow general case), or anything for one group spanning the whole row.

CUDA graphs: the launchers allocate only their output, the split-K partials and the dequantized
weight, never sync with the host and pick grids, paths and split counts from shapes alone.

CPU: under ``TRITON_INTERPRET=1`` (set before this module is imported) the launchers run on CPU
tensors, which is how the tests exercise them. The interpreter gets ``tl.dot`` in bf16 wrong, so
test there in fp32/fp16.
"""
from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from .linear import check_epilogue, check_prologue, gated_kind, output_features
from .linear_triton import _input_block, epilogue_kernel, gemv_rows, prologue_kernel
from .quant import n_groups, quant_linear, quant_linear_add_, quant_linear_reference

from .triton_env import INTERPRET, check_pdl_knobs, jit as _jit, pdl_code, tl, triton

if triton is not None:
    from .activation_triton import gated_pairs
    from .triton_env import l2_prefetch_rows, pdl_trigger, pdl_trigger_at, pdl_wait


def _jit_kernel(*generic: str):
    """``triton.jit`` for a kernel whose integer arguments ``generic`` are not specialized (Triton
    compiles a variant per "== 1" and "divisible by 16" otherwise): the row count and split count
    vary at run time, and scale strides (groups a row: 32 for K = 4096, 86 for 11008) would double
    the compilations for no gain (scales are read one element at a time)."""
    if triton is None:
        return lambda fn: fn
    return _jit(do_not_specialize=generic)


DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------------------------- #
# Paths and tile settings (the values to revisit after benchmarks/quant_sweep.py on a GPU)
# --------------------------------------------------------------------------------------------- #

# Rows of x (leading dims flattened) up to which the decode kernel runs: there the op is bound by the
# weight bytes. The decode kernel also accepts up to MAX_DECODE_BLOCK_M rows when asked
# (``path="decode"``), so that benchmarks can compare it with the prefill kernel there.
# Measured (quant_sweep.py, H200, bf16, llama2-7b shapes, 2026-11-27): at M = 32 the decode kernel
# still beats the other paths (14.8 us vs 23.6 dequant vs 43.4 fused GEMM for 4096 x 4096 int8).
DECODE_MAX_M = 32
MAX_DECODE_BLOCK_M = 64

# From this M on, prefill dequantizes the weight (~13 us for 4096 x 4096 at ~3.9 TB/s) and calls
# cuBLAS. Measured with DECODE_MAX_M above: dequant + cuBLAS beat the fused Triton GEMM at every M
# from 64 to 2048 (e.g. 258.7 vs 890.8 us at M = 2048 for 4096 x 11008), so it takes over right after
# the decode kernel; the fused GEMM stays for path="prefill" (and as the reference design).
DEQUANT_MIN_M = DECODE_MAX_M + 1
# The dequantized temporary is at most this many elements (256 MiB in bf16); bigger weights (a
# 128k-vocab head) are dequantized and multiplied in chunks of rows.
DEQUANT_MAX_NUMEL = 1 << 27

# Decode tile settings. Keys:
#   block_n, block_k   the tile: BLOCK_N output features x BLOCK_K input features per step
#   num_warps
#   num_stages         weight tiles in flight through shared memory (cp.async); 1: straight to registers
#   sub_k              M = 1 FMA path: features per partial sum (capped by the group's run, see _runs)
#   convert            M = 1 FMA path: int -> float conversion, one of CONVERTS: "cast" (Triton's:
#                      a PRMT and an I2F a weight), "magic" (the 2**23 mantissa trick in Triton ops:
#                      no I2F, three full-rate instructions a weight), "i2f" (PTX: one byte-selecting I2F a weight;
#                      I2F is quarter-rate, 16 a clock an SM), "mixed" (PTX: half of each). int4
#                      knows "cast" and "magic" ("i2f" / "mixed" run as "magic").
#   dot                M = 1: use the tensor-core kernel (x padded to 16 rows) instead of the FMA one
#   waves              programs per SM to aim for; K is split when the N blocks are fewer
#   fused_reduce       split-K partials summed by the last-arriving program (no second launch)
#   scales_ahead       each K step loads the next step's scales (their load latency hidden a step);
#                      on for one-row INT8 (DECODE_TILES; measured there only, H100 2026-12-07)
#   trigger_steps      PDL: let the next kernel launch this many K steps before the end of the loop
#                      (0: after it), as linear_triton's knob of that name
#   preload            PDL: bytes of each weight row (of the program's split) prefetched into L2
#                      before the PDL wait (a power of two from 128; 0: none)
DECODE_DEFAULTS = dict(block_n=16, block_k=512, num_warps=4, num_stages=3, sub_k=16, convert="cast", dot=False,
                       waves=2, fused_reduce=False, scales_ahead=False, trigger_steps=0, preload=0)
# Per bit width: (largest M, overrides of DECODE_DEFAULTS) in increasing M; the first entry whose M
# bound is >= the launch's M applies (the last one beyond). Reasoned from sm_90 SASS (instructions a
# weight) and bytes in flight, not yet measured -- benchmarks/quant_sweep.py prints a replacement:
#   M = 1: 4 x 1024 int8 = 4 KiB a step, 3 stages: with N = 4096 that is 1024 programs (no split),
#   ~8 an SM, 8 KiB in flight each: ~8 MiB GPU-wide, above the bandwidth x latency product. int4
#   takes twice the features for the same bytes and the magic conversion (two I2F a byte would be
#   the limit).
#   M > 1: tensor cores, K blocks of one group (the scale multiplies the dot's result). x is re-read
#   from L2 by every N block, 2M / BLOCK_N bytes per int8 weight byte, so BLOCK_N grows with M and
#   split-K restores the program count.
DECODE_TILES = {  # from benchmarks/quant_sweep.py on an H200, bf16, group 128, 2026-11-27
    8: (
        # scales_ahead: 3.258 -> 3.225 ms (7B) and 0.946 -> 0.942 ms (1B) a token, H100, 2026-12-07
        # (at 8 rows it was 1-5 % slower on 7 of 8 shapes: off there). 4 rows, 3 stages (two 4-KiB
        # tiles in flight a program, twice the programs): 8 x 1024, 2 stages -> 4 x 1024, 3 stages
        # took llama-1b from 0.853 to 0.793 / 0.796 ms a token (two runs), llama2-7b 3.032 / 3.029
        # -> 3.028 / 3.020 (H100, 2026-12-07, benchmarks/decode.py --int8-gemv). Launches with a
        # folded norm still take FOLDED_MIN_BLOCK_N rows.
        (1, dict(block_k=1024, block_n=4, convert="magic", num_stages=3, scales_ahead=True)),
        # 4 stages: 3.863 -> 3.823 ms (7B), 1.029 -> 1.018 (1B) a token at batch 8, H100, 2026-12-07
        (8, dict(block_k=128, block_n=64, num_stages=4)),
        (MAX_DECODE_BLOCK_M, dict(block_k=128, block_n=64)),  # 1.03x (fused_reduce: another 2 %, left off)
    ),
    4: (
        (1, dict(block_k=2048, block_n=8, convert="magic", num_stages=1)),  # 1.01x
        (8, dict(block_k=128, block_n=128)),  # 1.00x
        (MAX_DECODE_BLOCK_M, dict(block_k=128, block_n=128)),  # 1.02x
    ),
}
# Rows a program at least, for a decode launch with a prologue (fold_linear). Each program
# recomputes the norm over all of K, so more rows amortize it; fewer keep more programs in flight.
# H100, 2026-12-07, one row: 8 / 16 / 32 rows gave llama2-7b 3.032 / 3.101 / 3.301 ms a token,
# llama-1b 0.850 / 0.849 / 0.901 (batch 8: 0.947 / 0.945).
FOLDED_MIN_BLOCK_N = 8
# A split must own at least this many K blocks, or the partials cost more than the occupancy gains.
DECODE_MIN_BLOCKS_PER_SPLIT = 2
REDUCE_BLOCK_N = 256

# Prefill (fused GEMM): the usual Hopper bf16 GEMM tile (128 x 128 x 64, 8 warps), grouped 8 row
# blocks deep.
PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 128
PREFILL_BLOCK_K = 64
PREFILL_GROUP_M = 8
PREFILL_NUM_WARPS = 8
PREFILL_NUM_STAGES = 3
# fp32 activations (fp32 models) take half the K step: fp32 x tiles are twice the bytes, and three
# stages of 128 x 64 of them plus the dequantized tile would crowd the shared memory.
PREFILL_BLOCK_K_FP32 = 32

# Dequantize kernel: 32 x 256 weights a program (16 KiB written in bf16), a streaming copy.
DEQUANT_BLOCK_N = 32
DEQUANT_BLOCK_K = 256
DEQUANT_NUM_WARPS = 4

# One group spanning the whole row (group_size >= K): passed to the kernels as this constant so
# that every layer shares one compilation (k // WHOLE_ROW is 0 for any k).
WHOLE_ROW = 1 << 30

# The M = 1 GEMV's int8 -> fp32 conversions (config key "convert"), in the kernels' CONVERT order.
CONVERTS = ("cast", "magic", "i2f", "mixed")

# tl.dot wants at least 16 along every dimension.
MIN_DOT = 16

# 2**23 as fp32 bits, and the biases the MAGIC conversions take off again.
# (tl.constexpr: the only globals a kernel may read.)
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC_INT8 = tl.constexpr(8388736.0)  # 2**23 + 128: an int8 q with its sign bit flipped reads q + 128
_MAGIC_INT4 = tl.constexpr(8388616.0)  # 2**23 + 8: a nibble holds q + 8


# --------------------------------------------------------------------------------------------- #
# Kernels: building blocks
# --------------------------------------------------------------------------------------------- #

# int8 -> fp32 PTX, four weights (one 32-bit register, ``pack=4``) a call; both exact.
# ``i2f``: one I2F.S8 a weight (ptxas folds the byte extract into the conversion's byte select).
# I2F runs at a quarter of the FMA rate (16 a clock an SM on Hopper): enough for the bytes an H100
# streams (~13 a clock an SM at 3 TB/s), not quite for an H200's (~18).
_I2F_ASM = tl.constexpr("""{
    .reg .s32 b0, b1, b2, b3;
    bfe.s32 b0, $4, 0, 8;   bfe.s32 b1, $4, 8, 8;   bfe.s32 b2, $4, 16, 8;  bfe.s32 b3, $4, 24, 8;
    cvt.rn.f32.s32 $0, b0;  cvt.rn.f32.s32 $1, b1;  cvt.rn.f32.s32 $2, b2;  cvt.rn.f32.s32 $3, b3;
}""")
# ``mixed``: bytes 0 and 2 by I2F, bytes 1 and 3 by the magic number (sign bits flipped once for the
# word, then one PRMT builds 0x4B0000xx = 2**23 + q + 128 and one FADD takes 2**23 + 128 off): half
# the I2F load at 2.75 instructions a weight.
_MIXED_ASM = tl.constexpr("""{
    .reg .s32 b0, b2;
    .reg .b32 t;
    bfe.s32 b0, $4, 0, 8;   bfe.s32 b2, $4, 16, 8;
    cvt.rn.f32.s32 $0, b0;  cvt.rn.f32.s32 $2, b2;
    xor.b32 t, $4, 0x80808080;
    prmt.b32 $1, t, 0x4B000000, 0x7541;  prmt.b32 $3, t, 0x4B000000, 0x7543;
    sub.f32 $1, $1, 0f4B000080;          sub.f32 $3, $3, 0f4B000080;
}""")


@_jit
def _int8_to_f32(q, CONVERT: tl.constexpr):
    """int8 values -> fp32 (exact). CONVERT (``CONVERTS``): 0 Triton's cast (a PRMT and an I2F.S16
    a weight), 1 the magic number in Triton ops, 2 / 3 the PTX above (never in the interpreter:
    the launcher turns them into 0 there)."""
    if CONVERT == 1:
        # The byte with its sign bit flipped (q + 128, 0..255) OR-ed into the mantissa of 2**23 is
        # 2**23 + q + 128 exactly: one LOP3 (xor and or in one) and one FADD, no conversion unit.
        bits = q.to(tl.uint8, bitcast=True).to(tl.int32) ^ (_MAGIC_BITS | 0x80)
        return bits.to(tl.float32, bitcast=True) - _MAGIC_INT8
    elif CONVERT == 2:
        return tl.inline_asm_elementwise(_I2F_ASM, "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=True, pack=4)
    elif CONVERT == 3:
        return tl.inline_asm_elementwise(_MIXED_ASM, "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=True, pack=4)
    else:
        return q.to(tl.float32)


@_jit
def _nibbles_to_f32(packed, MAGIC: tl.constexpr, HIGH_X16: tl.constexpr = False):
    """uint8 bytes -> (low nibbles, high nibbles) as fp32 q = nibble - 8 (exact).

    HIGH_X16 (with MAGIC) leaves the high nibble in place, so the second value is 16 * q: one LOP3
    a nibble, no shift; the caller divides its x by 16 instead (exact)."""
    p = packed.to(tl.int32)  # 0..255: no sign games in the shifts
    if MAGIC:
        lo = ((p & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC_INT4
        if HIGH_X16:
            hi = ((p & 0xF0) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC_INT8  # 2**23 + 16 * 8
        else:
            hi = ((p >> 4) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC_INT4
    else:
        lo = ((p & 0xF) - 8).to(tl.float32)
        hi = ((p >> 4) - 8).to(tl.float32)
    return lo, hi


@_jit
def _nibbles_as(packed, DT: tl.constexpr):
    """uint8 bytes -> (low, high) nibbles as q = nibble - 8 in dtype DT (exact), for ``tl.dot``.

    fp16 / bf16: the nibble OR-ed into the mantissa of 1024 (fp16) or 128 (bf16) is 1024 + nibble /
    128 + nibble exactly; one 16-bit subtraction (two a packed instruction) takes the bias off."""
    p = packed.to(tl.int32)
    if DT == tl.float16:
        lo = ((p & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0  # 1024 + 8
        hi = ((p >> 4) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
    elif DT == tl.bfloat16:
        lo = ((p & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0  # 128 + 8
        hi = ((p >> 4) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0
    else:
        lo, hi = _nibbles_to_f32(packed, True)
    return lo, hi


@_jit
def _load_weight_bytes(QW, rows, mask_n, b0, row_bytes, stride_qn, WIDTH: tl.constexpr, OTHER: tl.constexpr):
    """Bytes ``b0 .. b0 + WIDTH`` of weight rows ``rows``: [BLOCK_N, WIDTH], OTHER past N or the row.

    ``row_bytes`` comes from the host (not ``(K + 1) // 2``) so that Triton sees its divisibility
    and keeps the 16-byte vector loads; weights are read once, so they go first out of L2."""
    offs_b = b0 + tl.arange(0, WIDTH)
    return tl.load(QW + rows[:, None] * stride_qn + offs_b[None, :],
                   mask=mask_n[:, None] & (offs_b < row_bytes)[None, :], other=OTHER, eviction_policy="evict_first")


@_jit
def _weight_tile(QW, rows, mask_n, k0, row_bytes, stride_qn,
                 BITS: tl.constexpr, BLOCK_K: tl.constexpr, CONVERT: tl.constexpr):
    """Integer weights of rows ``rows``, features ``k0 .. k0 + BLOCK_K``, as fp32 [BLOCK_N, BLOCK_K]
    in feature order (unscaled). Past N or past the row the bytes read 0 (a 4-bit q of -8): finite,
    which the caller's zero scales, zero x or masked store make harmless. (0, not 0x88: masked
    cp.async copies zero-fill, any other value costs a select a byte.) ``k0`` is even."""
    if BITS == 8:
        return _int8_to_f32(_load_weight_bytes(QW, rows, mask_n, k0, row_bytes, stride_qn, BLOCK_K, 0), CONVERT)
    else:
        # Byte j holds features 2j (low nibble) and 2j + 1 (high): load the bytes once, split them
        # in registers and interleave back into feature order.
        packed = _load_weight_bytes(QW, rows, mask_n, k0 // 2, row_bytes, stride_qn, BLOCK_K // 2, 0)
        lo, hi = _nibbles_to_f32(packed, CONVERT != 0)
        return tl.interleave(lo, hi)


@_jit
def _run_scales(SC, rows, mask_n, k0, K, stride_sn,
                GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr):
    """fp32 scales of the runs of SUB features in the block at ``k0``: [BLOCK_N, BLOCK_K // SUB].

    SUB divides the group (or the group is the whole row) and blocks start at multiples of SUB, so
    each run lies inside one group. Runs past K and rows past N get 0."""
    offs_r = k0 + tl.arange(0, BLOCK_K // SUB) * SUB
    return tl.load(SC + rows[:, None] * stride_sn + (offs_r // GROUP_SIZE)[None, :],
                   mask=mask_n[:, None] & (offs_r < K)[None, :], other=0.0).to(tl.float32)


@_jit
def _scale_weights(q, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr):
    """q [BLOCK_N, BLOCK_K] times the scales of its runs s [BLOCK_N, BLOCK_K // SUB] (fp32)."""
    if SUB == BLOCK_K:
        return q * s  # s: [BLOCK_N, 1]
    else:
        w = tl.reshape(q, [BLOCK_N, BLOCK_K // SUB, SUB]) * s[:, :, None]
        return tl.reshape(w, [BLOCK_N, BLOCK_K])


@_jit
def _run_sums(p, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, RUN: tl.constexpr):
    """[BLOCK_N, WIDTH] -> [BLOCK_N, WIDTH // RUN]: sums over consecutive runs of RUN columns."""
    if RUN == 1:
        return p
    else:
        return tl.sum(tl.reshape(p, [BLOCK_N, WIDTH // RUN, RUN]), axis=2)


@_jit
def _step_scales(s_next, SC, rows, mask_n, k0, K, stride_sn,
                 GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, AHEAD: tl.constexpr):
    """(the run scales of the block at ``k0``, what the next step gets as ``s_next``). AHEAD: the
    block's scales are ``s_next`` (loaded a step ago), and the next block's are loaded now (past K
    they read 0; past a split's end, the next split's: unused either way). Otherwise loaded now."""
    if AHEAD:
        return s_next, _run_scales(SC, rows, mask_n, k0 + BLOCK_K, K, stride_sn, GROUP_SIZE, BLOCK_K, SUB)
    else:
        return _run_scales(SC, rows, mask_n, k0, K, stride_sn, GROUP_SIZE, BLOCK_K, SUB), s_next


@_jit
def _gemv_block(x, QW, s, rows, mask_n, k0, row_bytes, stride_qn,
                BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SUB: tl.constexpr, CONVERT: tl.constexpr):
    """One K block of the M = 1 GEMV: scale * sum(q * x) per run of SUB features, [BLOCK_N, BLOCK_K // SUB],
    for x (fp32, [BLOCK_K]) the block of the input at ``k0`` and s its run scales (``_run_scales``).

    A weight costs its product and its share of the run's add tree (the product is exact in fp32:
    |q| <= 127 has 7 bits, x at most 24); the scale multiplies run sums, not weights."""
    if BITS == 8:
        q = _int8_to_f32(_load_weight_bytes(QW, rows, mask_n, k0, row_bytes, stride_qn, BLOCK_K, 0), CONVERT)
        sums = _run_sums(q * x[None, :], BLOCK_N, BLOCK_K, SUB)
    elif SUB == 1:
        # Odd groups: the two features of a byte may lie in different groups; go to feature order.
        q = _weight_tile(QW, rows, mask_n, k0, row_bytes, stride_qn, BITS, BLOCK_K, CONVERT)
        sums = q * x[None, :]
    else:
        # Low nibbles pair with the even features of x, high nibbles with the odd ones: split x
        # once (shared by the rows) instead of interleaving every weight tile.
        packed = _load_weight_bytes(QW, rows, mask_n, k0 // 2, row_bytes, stride_qn, BLOCK_K // 2, 0)
        lo, hi = _nibbles_to_f32(packed, CONVERT != 0, HIGH_X16=True)
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_K // 2, 2]))
        if CONVERT != 0:
            x_odd = x_odd * 0.0625  # hi is 16 * q (exact: a power of two)
        # Two separate sums, so that each product fuses into its own add tree.
        sums = (_run_sums(lo * x_even[None, :], BLOCK_N, BLOCK_K // 2, SUB // 2)
                + _run_sums(hi * x_odd[None, :], BLOCK_N, BLOCK_K // 2, SUB // 2))
    return sums * s


@_jit
def _dot_block(acc, x, QW, s, rows, mask_n, k0, row_bytes, stride_qn,
               BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SUB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x [BLOCK_M, BLOCK_K] @ (weights of the K block at k0)^T, tensor cores;
    s: the block's run scales (``_run_scales``).

    Integer weights are exact in fp16 / bf16. When the block lies in one run (SUB == BLOCK_K) they go
    to the dot as they are and the scale multiplies the [BLOCK_M, BLOCK_N] result; otherwise the
    weights are scaled per run first. 4-bit weights stay unpacked in two halves: the low nibbles
    meet the even features of x, the high nibbles the odd ones (two half-width dots, no interleave
    of the weight tile), except for odd groups, whose bytes may straddle two groups."""
    if BITS == 4 and SUB > 1:
        packed = _load_weight_bytes(QW, rows, mask_n, k0 // 2, row_bytes, stride_qn, BLOCK_K // 2, 0)
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))
        if SUB == BLOCK_K:
            lo, hi = _nibbles_as(packed, x.dtype)
            part = tl.dot(x_even, tl.trans(lo), input_precision=DOT_PRECISION)
            part = tl.dot(x_odd, tl.trans(hi), acc=part, input_precision=DOT_PRECISION)
            acc += part * tl.reshape(s, [BLOCK_N])[None, :]
        else:
            lo, hi = _nibbles_to_f32(packed, True)
            lo = _scale_weights(lo, s, BLOCK_N, BLOCK_K // 2, SUB // 2).to(x.dtype)
            hi = _scale_weights(hi, s, BLOCK_N, BLOCK_K // 2, SUB // 2).to(x.dtype)
            acc = tl.dot(x_even, tl.trans(lo), acc=acc, input_precision=DOT_PRECISION)
            acc = tl.dot(x_odd, tl.trans(hi), acc=acc, input_precision=DOT_PRECISION)
    else:
        # Triton's own int8 -> fp16/bf16 conversion is already a packed magic-number sequence.
        q = _weight_tile(QW, rows, mask_n, k0, row_bytes, stride_qn, BITS, BLOCK_K, 0)
        if SUB == BLOCK_K:
            part = tl.dot(x, tl.trans(q.to(x.dtype)), input_precision=DOT_PRECISION)
            acc += part * tl.reshape(s, [BLOCK_N])[None, :]
        else:
            w = _scale_weights(q, s, BLOCK_N, BLOCK_K, SUB)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc=acc, input_precision=DOT_PRECISION)
    return acc


@_jit
def _round_to(w, DT: tl.constexpr, SOFT_RNE: tl.constexpr):
    """fp32 -> DT, round to nearest even. SOFT_RNE does the bf16 rounding with integer ops: the
    interpreter truncates fp32 -> bf16, so it needs them to give what the GPU's cvt.rn gives."""
    if DT == tl.bfloat16 and SOFT_RNE:
        bits = w.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))  # ties to even; finite inputs only
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(DT)


@_jit
def _store_output(Y, BIAS, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                  RES=None, HAS_RES: tl.constexpr = False):
    """The epilogue: acc (fp32 [BLOCK_M, BLOCK_N]) + bias (+ residual, laid out as Y), rounded once
    into Y [M, N]."""
    mask_n = offs_n < N
    if HAS_BIAS:
        # Rounded to the output dtype first, as the reference's bias.to(x.dtype).
        b = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(Y.dtype.element_ty).to(tl.float32)
        acc = acc + b[None, :]
    offsets = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_RES:
        acc = acc + tl.load(RES + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, acc.to(Y.dtype.element_ty), mask=mask)


@_jit
def _store_gated(Y, BIAS, acc, offs_m, offs_n, mask_n, offs_o, mask_o, M, stride_ym, HAS_BIAS: tl.constexpr,
                 KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gated epilogue: acc (fp32 [BLOCK_M, BLOCK_N], its columns the (gate, up) row pairs of
    ``gemv_rows``) + bias, then act(gate) * up rounded once into Y [M, features ``offs_o``]."""
    DT: tl.constexpr = Y.dtype.element_ty
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(DT).to(tl.float32)[None, :]
    out = gated_pairs(acc, KIND, DT, BLOCK_M, BLOCK_N)
    offsets = offs_m.to(tl.int64)[:, None] * stride_ym + offs_o[None, :]
    tl.store(Y + offsets, out.to(DT), mask=(offs_m < M)[:, None] & mask_o[None, :])


@_jit
def _store_split(Y, BIAS, PART, CNT, acc, offs_m, offs_n, M, N, stride_ym, pid_n, split, n_splits,
                 HAS_BIAS: tl.constexpr, FUSED_REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 RES=None, HAS_RES: tl.constexpr = False):
    """Split-K epilogue: this split's fp32 partial into PART[split, M, N]; with FUSED_REDUCE the
    last program of the N block to arrive also sums all partials in split order into Y."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    p_ptrs = PART + offs_m[:, None] * N + offs_n[None, :]  # split 0; split s is s * M * N further
    tl.store(p_ptrs + split * M * N, acc, mask=mask)
    if FUSED_REDUCE:
        # Every thread's partial is stored before one thread announces it (a release, cumulative
        # over the barrier); the last arrival's acquire then sees all partials.
        tl.debug_barrier()
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, n_splits):  # split order, whichever program came last: deterministic
                # .cg: from L2, past this SM's (incoherent) L1.
                total += tl.load(p_ptrs + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            _store_output(Y, BIAS, total, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, RES, HAS_RES)
            tl.atomic_xchg(CNT + pid_n, 0)  # ready for the next launch


# --------------------------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------------------------- #

@_jit_kernel("M", "stride_sn", "n_splits")
def _decode_kernel(
    X, QW, SC, BIAS, Y, PART, CNT, RES, G,
    M, N, K, row_bytes, stride_xm, stride_qn, stride_sn, stride_ym, k_per_split, n_splits, eps,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, SUB: tl.constexpr, CONVERT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr, PROLOGUE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    PDL: tl.constexpr = 0, SCALES_AHEAD: tl.constexpr = False, TRIGGER_STEPS: tl.constexpr = 0,
    PRELOAD: tl.constexpr = 0, EPILOGUE: tl.constexpr = "none",
):
    """All M (<= BLOCK_M) rows of x times BLOCK_N weight rows, over one split of K.

    ``k_per_split`` is a multiple of BLOCK_K, so no block straddles two splits and K is the only
    ragged edge. Without SPLIT the kernel writes Y (with the bias and the residual RES); with it,
    fp32 partials (the reduction adds them). M = 1 without SPLIT may fold a prologue (PROLOGUE 1:
    rms_norm with weight G, 2: gated activation ACT over X = [gate | up]), as ``linear_triton`` does.
    PDL (triton_env): waits for the kernel before (which wrote X, RES) before reading anything but
    its weight rows, whose first PRELOAD bytes it may prefetch into L2 first; triggers the next
    kernel TRIGGER_STEPS K steps before the end of its loop (0: after it).
    EPILOGUE (without SPLIT): "none" or an activation kind; the N weight rows are [gate | up], the
    program reduces BLOCK_N / 2 (gate, up) row pairs (``linear_triton.gemv_rows``) and writes
    act(gate) * up to Y [M, N / 2]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n, mask_n, offs_o, mask_o = gemv_rows(pid_n, N, BLOCK_N, EPILOGUE != "none")
    rows = offs_n.to(tl.int64)  # int64: row * stride passes 2**31 for a 256k-vocab lm_head
    offs_m = tl.arange(0, BLOCK_M)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    k_trigger = k_start + tl.maximum(tl.cdiv(k_stop - k_start, BLOCK_K) - TRIGGER_STEPS, 0) * BLOCK_K

    if PDL and PRELOAD > 0:
        b_start = k_start * BITS // 8
        l2_prefetch_rows(QW + b_start, rows, N, stride_qn, row_bytes - b_start, PRELOAD)
    pdl_wait(PDL)

    # The scales cannot stream through shared memory as the weights do (cp.async copies 4 bytes and
    # more; a run's scale is a 2-byte gather), so a plain load would stall every step on memory
    # latency. With SCALES_AHEAD each step loads the next step's scales, used one step later.
    if SCALES_AHEAD:
        s_next = _run_scales(SC, rows, mask_n, k_start, K, stride_sn, GROUP_SIZE, BLOCK_K, SUB)
    else:
        s_next = tl.zeros([BLOCK_N, BLOCK_K // SUB], dtype=tl.float32)  # unused
    if BLOCK_M == 1:
        # GEMV on the FMA units: fp32 run sums, one cross-lane reduction at the very end.
        acc_runs = tl.zeros([BLOCK_N, BLOCK_K // SUB], dtype=tl.float32)
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=NUM_STAGES):
            pdl_trigger_at(k0, k_trigger, PDL, TRIGGER_STEPS)
            s, s_next = _step_scales(s_next, SC, rows, mask_n, k0, K, stride_sn, GROUP_SIZE, BLOCK_K, SUB,
                                     SCALES_AHEAD)
            x, squares = _input_block(X, G, k0 + tl.arange(0, BLOCK_K), K, PROLOGUE, ACT, X.dtype.element_ty)
            sum_sq += squares
            acc_runs += _gemv_block(x, QW, s, rows, mask_n, k0, row_bytes, stride_qn,
                                    BITS, BLOCK_N, BLOCK_K, SUB, CONVERT)
        pdl_trigger(PDL)
        acc = tl.sum(acc_runs, axis=1)[None, :]
        if PROLOGUE == 1:
            acc = acc / tl.sqrt(tl.sum(sum_sq, axis=0) / K + eps)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_rows = X + offs_m[:, None] * stride_xm
        mask_m = offs_m < M
        offs_kb = tl.arange(0, BLOCK_K)
        for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=NUM_STAGES):
            pdl_trigger_at(k0, k_trigger, PDL, TRIGGER_STEPS)
            offs_k = k0 + offs_kb
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0,
                        eviction_policy="evict_last")
            s, s_next = _step_scales(s_next, SC, rows, mask_n, k0, K, stride_sn, GROUP_SIZE, BLOCK_K, SUB,
                                     SCALES_AHEAD)
            acc = _dot_block(acc, x, QW, s, rows, mask_n, k0, row_bytes, stride_qn,
                             BITS, BLOCK_M, BLOCK_N, BLOCK_K, SUB, DOT_PRECISION)
        pdl_trigger(PDL)

    if EPILOGUE != "none":
        _store_gated(Y, BIAS, acc, offs_m, offs_n, mask_n, offs_o, mask_o, M, stride_ym, HAS_BIAS, EPILOGUE,
                     BLOCK_M, BLOCK_N)
    elif SPLIT:
        _store_split(Y, BIAS, PART, CNT, acc, offs_m, offs_n, M, N, stride_ym, pid_n, split, n_splits,
                     HAS_BIAS, FUSED_REDUCE, BLOCK_M, BLOCK_N, RES, HAS_RES)
    else:
        _store_output(Y, BIAS, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, RES, HAS_RES)


@_jit_kernel("M", "n_splits")
def _split_k_reduce_kernel(
    PART, BIAS, Y, RES, M, N, stride_ym, n_splits,
    HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = 0,
    HAS_RES: tl.constexpr = False,
):
    """Y[m, n-block] = sum over the n_splits (<= BLOCK_S) splits of PART[:, m, n-block] (+ bias)
    (+ the residual RES, laid out as Y), in a fixed order."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    p = tl.load(PART + (offs_s[:, None] * M + m) * N + offs_n[None, :],
                mask=(offs_s < n_splits)[:, None] & (offs_n < N)[None, :], other=0.0)
    acc = tl.sum(p, axis=0)[None, :]
    _store_output(Y, BIAS, acc, m + tl.arange(0, 1), offs_n, M, N, stride_ym, HAS_BIAS, RES, HAS_RES)


@_jit_kernel("M", "stride_sn")
def _prefill_kernel(
    X, QW, SC, BIAS, Y,
    M, N, K, row_bytes, stride_xm, stride_qn, stride_sn, stride_ym,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of Y = x @ dequant(W)^T (+ bias), over all of K."""
    # Grouped order: consecutive programs take GROUP_M row blocks down one column of weight
    # tiles before moving right, so each weight tile is still in L2 for the next row block.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm  # int64: M * K passes 2**31 for long prompts

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        q = _weight_tile(QW, rows, mask_n, k0, row_bytes, stride_qn, BITS, BLOCK_K, 0)
        s = _run_scales(SC, rows, mask_n, k0, K, stride_sn, GROUP_SIZE, BLOCK_K, SUB)
        # Rounded to the activation dtype, as the reference's dequantized weight: tensor cores.
        w = _scale_weights(q, s, BLOCK_N, BLOCK_K, SUB).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc=acc, input_precision=DOT_PRECISION)

    _store_output(Y, BIAS, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


@_jit_kernel("stride_sn")
def _dequant_kernel(
    QW, SC, W, N, K, row_bytes, stride_qn, stride_sn, stride_wn,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFT_RNE: tl.constexpr,
):
    """W[n-block, k-block] = q * scale rounded to W's dtype: fp32 product, one rounding, as
    ``quant.dequantize_weight``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    q = _weight_tile(QW, rows, mask_n, k0, row_bytes, stride_qn, BITS, BLOCK_K, 0)
    s = _run_scales(SC, rows, mask_n, k0, K, stride_sn, GROUP_SIZE, BLOCK_K, SUB)
    w = _scale_weights(q, s, BLOCK_N, BLOCK_K, SUB)
    tl.store(W + rows[:, None] * stride_wn + offs_k[None, :], _round_to(w, W.dtype.element_ty, SOFT_RNE),
             mask=mask_n[:, None] & (offs_k < K)[None, :])


# --------------------------------------------------------------------------------------------- #
# Launch planning (shapes only: CUDA graphs)
# --------------------------------------------------------------------------------------------- #

def _pow2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(n), at_least)


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a notional few, so that CPU tests still see several splits


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models must not be silently rounded to tf32; "tf32" is ignored for fp16/bf16 operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def _runs(group_size: int, in_features: int) -> tuple[int, int]:
    """(GROUP_SIZE as the kernels see it, the longest run of features a scale may be applied to at
    once): a run is a power of two (tile shapes are) that divides the group, so runs starting at
    multiples of it never straddle two groups. One group for the whole row: any run."""
    if group_size >= in_features:
        return WHOLE_ROW, WHOLE_ROW
    return group_size, group_size & -group_size


def _config(defaults: dict, overrides: dict | None) -> dict:
    unknown = set(overrides or {}) - set(defaults)
    if unknown:
        raise ValueError(f"quant_linear_triton: unknown config keys {sorted(unknown)}; known: {sorted(defaults)}")
    cfg = {**defaults, **(overrides or {})}
    if "convert" in cfg and cfg["convert"] not in CONVERTS:
        raise ValueError(f"quant_linear_triton: config convert must be one of {CONVERTS}, got {cfg['convert']!r}")
    for key in ("block_m", "block_n", "block_k", "sub_k", "num_warps"):
        if key in cfg and not _is_pow2(cfg[key]):
            raise ValueError(f"quant_linear_triton: config {key} must be a power of two, got {cfg[key]!r}")
    check_pdl_knobs(cfg.get("trigger_steps", 0), cfg.get("preload", 0), "quant_linear_triton")
    return cfg


def _convert(convert: str, use_dot: bool, bits: int) -> str:
    """The conversion a decode launch runs: the dot path converts its own way ("cast"), int4 knows no
    PTX conversion ("magic" instead) and the interpreter runs no PTX (the cast the PTX equals)."""
    if use_dot:
        return "cast"
    if convert in ("i2f", "mixed") and bits == 4:
        return "magic"
    if convert in ("i2f", "mixed") and INTERPRET:
        return "cast"
    return convert


def decode_tiles(m: int, bits: int) -> dict:
    """The decode tile settings for M rows: DECODE_DEFAULTS with the DECODE_TILES entry of the M
    bucket applied (the last bucket beyond the table)."""
    table = DECODE_TILES[bits]
    overrides = next((over for max_m, over in table if m <= max_m), table[-1][1])
    return {**DECODE_DEFAULTS, **overrides}


def decode_split_k(n_blocks: int, k_blocks: int, waves: float, device: torch.device) -> int:
    """K splits: none when the ``n_blocks`` N blocks give about ``waves`` programs per SM already,
    else the nearest count that does, each split owning at least DECODE_MIN_BLOCKS_PER_SPLIT K
    blocks. Rounded, not rounded up: 256 N blocks for 2 x 132 SMs are no reason to split."""
    if waves <= 0:
        return 1
    want = int(waves * _sm_count(device) / n_blocks + 0.5)
    return max(1, min(want, k_blocks // DECODE_MIN_BLOCKS_PER_SPLIT))


def decode_plan(m: int, out_features: int, in_features: int, group_size: int, device: torch.device,
                split_k: int | None = None, config: dict | None = None, bits: int = 8) -> dict:
    """The decode launch for these shapes: the tile settings (``decode_tiles`` + ``config``), then
    BLOCK_M (1: the FMA GEMV; 16+: tensor cores), the clamped BLOCK_N / BLOCK_K, the group as the
    kernel sees it and the run length SUB, the split count and the K features per split."""
    cfg = _config(decode_tiles(m, bits), config)
    use_dot = m > 1 or bool(cfg["dot"])
    block_m = _pow2(m, MIN_DOT) if use_dot else 1
    if block_m > MAX_DECODE_BLOCK_M:
        raise ValueError(f"quant_linear_triton: the decode path takes at most {MAX_DECODE_BLOCK_M} rows, got {m}")
    # No blocks (much) wider than the layer: K = 48 gets 64, N = 37 gets 64 (16 rows at least for a dot).
    block_k = min(cfg["block_k"], _pow2(in_features, MIN_DOT))
    block_n = min(cfg["block_n"], _pow2(out_features))
    if use_dot:
        block_n = max(block_n, MIN_DOT)
    group, run = _runs(group_size, in_features)
    # The dot path scales per run before (or, for a one-run block, after) the dot: the longest runs.
    sub = min(block_k, run) if use_dot else min(cfg["sub_k"], block_k, run)
    k_blocks = triton.cdiv(in_features, block_k)
    if split_k is None:
        split_k = decode_split_k(triton.cdiv(out_features, block_n), k_blocks, cfg["waves"], device)
    # Even shares of whole blocks; recount so that no split is left empty.
    blocks_per_split = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks)))
    split_k = triton.cdiv(k_blocks, blocks_per_split)
    # Knobs the chosen kernel ignores are normalized, so that they compile (and compare) as one.
    return dict(cfg, block_m=block_m, block_n=block_n, block_k=block_k, group=group, sub=sub,
                convert=_convert(cfg["convert"], use_dot, bits), fused_reduce=bool(cfg["fused_reduce"]) and split_k > 1,
                split_k=split_k, k_per_split=blocks_per_split * block_k)


# --------------------------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------------------------- #

def _alloc_partials(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Split-K partials (every element is written by the decode kernel). A function so that tests
    can hand out poisoned buffers."""
    return torch.empty(shape, dtype=torch.float32, device=device)


_COUNTERS: dict[str, Tensor] = {}


def _split_counters(device: torch.device, n: int) -> Tensor | None:
    """Arrival counters for the fused split-K reduction: int32, zero between launches (the last
    program of each N block resets its own). One buffer per device, grown on demand. None when it
    would have to be allocated during a CUDA-graph capture: memory from the graph's pool, zeroed only
    by a replay, must not be cached; the caller then reduces with the second kernel."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _decode(x2, qweight, scales, bias, y2, group_size, bits, in_features, split_k, config,
            residual2=None, prologue="none", norm_weight=None, eps=0.0, epilogue="none"):
    m, n_out = y2.shape
    n = qweight.shape[0]
    if prologue != "none" or epilogue != "none":
        split_k = 1  # a norm needs the whole row, an activation the whole sum
    if prologue != "none" and config is None:
        # Every program computes the prologue over all of K: more rows a program amortize it (the
        # int8 GEMV has few instructions to spare per weight, see the module docstring).
        config = dict(block_n=max(FOLDED_MIN_BLOCK_N, decode_tiles(m, bits)["block_n"]))
    plan = decode_plan(m, n, in_features, group_size, y2.device, split_k, config, bits=bits)
    split_k = plan["split_k"]
    # A gated epilogue's program reduces BLOCK_N rows: BLOCK_N / 2 (gate, up) pairs.
    n_blocks = triton.cdiv(n_out, plan["block_n"] // 2 if epilogue != "none" else plan["block_n"])
    counters = _split_counters(y2.device, n_blocks) if split_k > 1 and plan["fused_reduce"] else None
    partials = _alloc_partials((split_k, m, n), y2.device) if split_k > 1 else y2  # y2: never touched
    pdl = pdl_code(y2.device)
    # Pointers a constexpr flag keeps from being read get some tensor (x).
    _decode_kernel[(n_blocks, split_k)](
        x2, qweight, scales, bias if bias is not None else x2, y2, partials, counters if counters is not None else x2,
        residual2 if residual2 is not None else x2, norm_weight if norm_weight is not None else x2,
        m, n, in_features, qweight.shape[1], x2.stride(0), qweight.stride(0), scales.stride(0), y2.stride(0),
        plan["k_per_split"], split_k, float(eps),
        PROLOGUE=2 if gated_kind(prologue) else (1 if prologue == "rms_norm" else 0),
        ACT=gated_kind(prologue) or "silu", HAS_RES=residual2 is not None,
        GROUP_SIZE=plan["group"], BITS=bits, HAS_BIAS=bias is not None, SPLIT=split_k > 1,
        FUSED_REDUCE=counters is not None, SUB=plan["sub"], CONVERT=CONVERTS.index(plan["convert"]),
        BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_K=plan["block_k"],
        DOT_PRECISION=_dot_precision(x2.dtype), NUM_STAGES=plan["num_stages"],
        PDL=pdl, SCALES_AHEAD=bool(plan["scales_ahead"]),
        TRIGGER_STEPS=plan["trigger_steps"] if pdl else 0, PRELOAD=plan["preload"] if pdl else 0,
        EPILOGUE=gated_kind(epilogue) or "none",
        num_warps=plan["num_warps"], num_stages=plan["num_stages"], launch_pdl=pdl > 0,
    )
    if split_k > 1 and counters is None:
        _split_k_reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK_N))](
            partials, bias if bias is not None else x2, y2, residual2 if residual2 is not None else x2,
            m, n, y2.stride(0), split_k,
            HAS_BIAS=bias is not None, BLOCK_S=_pow2(split_k), BLOCK_N=REDUCE_BLOCK_N, PDL=pdl,
            HAS_RES=residual2 is not None, num_warps=4, launch_pdl=pdl > 0,
        )


def prefill_plan(m: int, out_features: int, in_features: int, group_size: int, dtype: torch.dtype,
                 config: dict | None = None) -> dict:
    """The fused prefill GEMM's launch settings for these shapes (``config`` overrides)."""
    cfg = _config(dict(block_m=PREFILL_BLOCK_M, block_n=PREFILL_BLOCK_N, block_k=PREFILL_BLOCK_K,
                       group_m=PREFILL_GROUP_M, num_warps=PREFILL_NUM_WARPS, num_stages=PREFILL_NUM_STAGES), config)
    if dtype == torch.float32 and "block_k" not in (config or {}):
        cfg["block_k"] = PREFILL_BLOCK_K_FP32
    # Shrink the blocks for small inputs (a 17-row input needs 32 rows, not 128). On the
    # interpreter this is also what keeps the tests fast.
    block_k = min(cfg["block_k"], _pow2(in_features, MIN_DOT))
    group, run = _runs(group_size, in_features)
    return dict(cfg, block_m=min(cfg["block_m"], _pow2(m, MIN_DOT)),
                block_n=min(cfg["block_n"], _pow2(out_features, MIN_DOT)), block_k=block_k, group=group,
                sub=min(block_k, run))


def _prefill(x2, qweight, scales, bias, y2, group_size, bits, in_features, config):
    m, n = y2.shape
    plan = prefill_plan(m, n, in_features, group_size, x2.dtype, config)
    grid = (triton.cdiv(m, plan["block_m"]) * triton.cdiv(n, plan["block_n"]),)
    _prefill_kernel[grid](
        x2, qweight, scales, bias if bias is not None else x2, y2,
        m, n, in_features, qweight.shape[1], x2.stride(0), qweight.stride(0), scales.stride(0), y2.stride(0),
        GROUP_SIZE=plan["group"], BITS=bits, HAS_BIAS=bias is not None, SUB=plan["sub"],
        BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_K=plan["block_k"], GROUP_M=plan["group_m"],
        DOT_PRECISION=_dot_precision(x2.dtype), num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )


def dequantize_triton(qweight: Tensor, scales: Tensor, group_size: int, bits: int, in_features: int,
                      dtype: torch.dtype, *, out: Tensor | None = None, config: dict | None = None) -> Tensor:
    """``quant.dequantize_weight`` on the Triton kernel: the ``[out_features, in_features]`` weight in
    ``dtype``, bit for bit (fp32 product of q and scale, one rounding). ``config`` overrides the tile
    (block_n, block_k, num_warps)."""
    if not _weight_supported(qweight, scales, group_size, bits, in_features) or dtype not in DTYPES:
        raise ValueError("dequantize_triton: unsupported arguments (see supported())")
    n = qweight.shape[0]
    if out is None:
        out = torch.empty((n, in_features), dtype=dtype, device=qweight.device)
    elif out.shape != (n, in_features) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"dequantize_triton: expected a {dtype} out of shape {(n, in_features)} with unit last stride")
    if out.numel() == 0:
        return out
    cfg = _config(dict(block_n=DEQUANT_BLOCK_N, block_k=DEQUANT_BLOCK_K, num_warps=DEQUANT_NUM_WARPS), config)
    qweight, scales = _unit_last_stride(qweight), _unit_last_stride(scales)
    block_k = min(cfg["block_k"], _pow2(in_features, MIN_DOT))
    group, run = _runs(group_size, in_features)
    _dequant_kernel[(triton.cdiv(n, cfg["block_n"]), triton.cdiv(in_features, block_k))](
        qweight, scales, out, n, in_features, qweight.shape[1], qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group, BITS=bits, SUB=min(block_k, run), BLOCK_N=cfg["block_n"], BLOCK_K=block_k,
        SOFT_RNE=INTERPRET, num_warps=cfg["num_warps"],
    )
    return out


def _dequant_linear(x2, qweight, scales, bias, y2, group_size, bits, in_features, config, accumulate=False):
    """y2 = x2 @ dequant(W)^T + bias through a dequantized temporary and cuBLAS (``addmm``, as
    ``F.linear``), in row chunks of at most DEQUANT_MAX_NUMEL weights. With ``accumulate`` (and no
    bias) y2 += x2 @ dequant(W)^T instead: cuBLAS adds into y2 (``addmm_``)."""
    n = qweight.shape[0]
    bias = bias.to(x2.dtype) if bias is not None else None
    chunk = max(1, DEQUANT_MAX_NUMEL // in_features)
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        w = dequantize_triton(qweight[n0:n1], scales[n0:n1], group_size, bits, in_features, x2.dtype, config=config)
        b = bias[n0:n1] if bias is not None else None
        if accumulate:
            y2[:, n0:n1].addmm_(x2, w.t())
        elif n1 - n0 == n:  # the whole weight at once: straight into y2
            if b is None:
                torch.mm(x2, w.t(), out=y2)
            else:
                torch.addmm(b, x2, w.t(), out=y2)
        else:
            y2[:, n0:n1] = torch.nn.functional.linear(x2, w, b)


# --------------------------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------------------------- #

def _weight_supported(qweight: Tensor, scales: Tensor, group_size: int, bits: int, in_features: int) -> bool:
    if bits not in (8, 4) or group_size <= 0 or in_features <= 0:
        return False
    if qweight.dim() != 2 or qweight.dtype != (torch.int8 if bits == 8 else torch.uint8):
        return False
    if qweight.shape[1] != (in_features if bits == 8 else (in_features + 1) // 2):
        return False
    return scales.shape == (qweight.shape[0], n_groups(in_features, group_size)) and scales.dtype in DTYPES


def supported(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int, bits: int,
              in_features: int, residual: Tensor | None = None, prologue: str = "none",
              norm_weight: Tensor | None = None) -> bool:
    """Whether the kernels take these arguments (the layout of ``quant.py``, float activations,
    one device, a residual of the output's shape and dtype); the CUDA implementation falls back to
    the reference otherwise."""
    if not _weight_supported(qweight, scales, group_size, bits, in_features):
        return False
    x_features = 2 * in_features if gated_kind(prologue) else in_features
    if x.dim() == 0 or x.dtype not in DTYPES or x.shape[-1] != x_features:
        return False
    if bias is not None and (bias.shape != (qweight.shape[0],) or bias.dtype not in DTYPES):
        return False
    if residual is not None and (residual.shape != (*x.shape[:-1], qweight.shape[0]) or residual.dtype != x.dtype):
        return False
    if norm_weight is not None and (norm_weight.shape != (in_features,) or norm_weight.dtype != x.dtype):
        return False
    return len({t.device for t in (x, qweight, scales, bias, residual, norm_weight) if t is not None}) == 1


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


PATHS = ("decode", "prefill", "dequant")


def default_path(m: int) -> str:
    """The path for M rows of x: decode up to DECODE_MAX_M, the fused GEMM below DEQUANT_MIN_M,
    dequantize + cuBLAS from there."""
    if m <= DECODE_MAX_M:
        return "decode"
    return "prefill" if m < DEQUANT_MIN_M else "dequant"


def quant_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int,
                        bits: int, in_features: int, residual: Tensor | None = None, prologue: str = "none",
                        norm_weight: Tensor | None = None, eps: float = 0.0, epilogue: str = "none", *,
                        out: Tensor | None = None, path: str | None = None, split_k: int | None = None,
                        config: dict | None = None) -> Tensor:
    """``quant_linear_reference`` on the Triton kernels (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``). No host sync: safe to capture in a CUDA graph.

    A prologue (``fold_linear``) runs inside the decode kernel for one row; for more rows the
    prologue's own kernel runs first. The residual is added where the output is written (the decode
    kernel or its split-K reduction), and after the prefill paths. A gated epilogue runs in the
    decode kernel (any M it takes, no split of K); after the prefill paths, its own kernel.

    ``out`` (contiguous, ``[*x.shape[:-1], out_features]``, ``x.dtype``) is written instead of a new
    tensor. For tests and tuning: ``path`` ("decode", "prefill" or "dequant") overrides
    ``default_path``; ``split_k`` overrides the decode split count; ``config`` overrides tile
    settings (decode: the keys of DECODE_DEFAULTS; prefill: block_m, block_n, block_k, group_m,
    num_warps, num_stages; dequant: block_n, block_k, num_warps of the dequantize kernel).
    """
    if triton is None:
        raise RuntimeError("quant_linear_triton: triton is not installed")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("quant_linear_triton: CPU tensors need TRITON_INTERPRET=1 set before fxopt is imported")
    check_prologue(prologue, norm_weight)
    check_epilogue(epilogue, qweight.shape[0], residual)
    if not supported(x, qweight, scales, bias, group_size, bits, in_features, residual, prologue, norm_weight):
        raise ValueError("quant_linear_triton: unsupported arguments (see supported()); use the reference")
    m = x.numel() // x.shape[-1]
    path = default_path(m) if path is None else path
    if prologue != "none" and (m != 1 or path != "decode"):  # the decode kernel folds it for one row
        x = prologue_kernel(x, prologue, norm_weight, eps)
        prologue = "none"
    out_features = qweight.shape[0]
    shape = (*x.shape[:-1], output_features(out_features, epilogue))
    if out is not None and (out.shape != shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"quant_linear_triton: expected a contiguous {x.dtype} out of shape {shape}, got "
                         f"{out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    if epilogue != "none" and path != "decode":
        y = epilogue_kernel(quant_linear_triton(x, qweight, scales, bias, group_size, bits, in_features, path=path,
                                                split_k=split_k, config=config), epilogue)
        return y if out is None else out.copy_(y)
    if residual is not None and path != "decode":
        y = quant_linear_triton(x, qweight, scales, bias, group_size, bits, in_features, out=out, path=path,
                                split_k=split_k, config=config)
        return y.add_(residual)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # x as [M, K] with a unit column stride: a view when the leading dims merge, else a copy.
    x2 = _unit_last_stride(x).reshape(-1, x.shape[-1])
    y2 = out.view(-1, shape[-1])
    qweight, scales = _unit_last_stride(qweight), _unit_last_stride(scales)
    bias = bias.contiguous() if bias is not None else None
    if path == "decode":
        residual2 = residual.reshape(-1, out_features).contiguous() if residual is not None else None
        _decode(x2, qweight, scales, bias, y2, group_size, bits, in_features, split_k, config, residual2,
                prologue, norm_weight.contiguous() if norm_weight is not None else None, eps, epilogue)
    elif path == "prefill":
        _prefill(x2, qweight, scales, bias, y2, group_size, bits, in_features, config)
    elif path == "dequant":
        _dequant_linear(x2, qweight, scales, bias, y2, group_size, bits, in_features, config)
    else:
        raise ValueError(f"quant_linear_triton: path must be one of {PATHS}, got {path!r}")
    return out


# --------------------------------------------------------------------------------------------- #
# Registration as the CUDA implementation of the custom op
# --------------------------------------------------------------------------------------------- #

def quant_linear_add_triton(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int,
                            bits: int, in_features: int, residual: Tensor, prologue: str = "none",
                            norm_weight: Tensor | None = None, eps: float = 0.0) -> None:
    """``fxopt.quant_linear_add_`` on the Triton kernels. Up to DECODE_MAX_M rows the decode
    kernels write their output into the residual they add (each output element is read from the
    residual and written by the same program, or by the same program of the split-K reduction);
    on the dequantize path, the prologue's kernel, then cuBLAS accumulating into the residual;
    otherwise (a bias on that path, arguments the kernels refuse) ``quant_linear`` and a copy."""
    args = (x, qweight, scales, bias, group_size, bits, in_features, residual, prologue, norm_weight, eps)
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    n = qweight.shape[0]
    if not supported(*args[:-1]) or not residual.is_contiguous():
        residual.copy_(_cuda_impl(*args))
        return
    if default_path(m) == "decode":
        quant_linear_triton(*args, out=residual)
        return
    if bias is None:
        x = prologue_kernel(x, prologue, norm_weight, eps)
        x2 = _unit_last_stride(x).reshape(m, x.shape[-1])
        _dequant_linear(x2, _unit_last_stride(qweight), _unit_last_stride(scales), None, residual.view(m, n),
                        group_size, bits, in_features, None, accumulate=True)
        return
    residual.copy_(_cuda_impl(*args))


def _cuda_impl(x, qweight, scales, bias, group_size, bits, in_features, residual=None, prologue="none",
               norm_weight=None, eps=0.0, epilogue="none"):
    args = (x, qweight, scales, bias, group_size, bits, in_features, residual, prologue, norm_weight, eps)
    if supported(*args[:-1]):
        return quant_linear_triton(*args, epilogue)
    return quant_linear_reference(*args, epilogue)


def register() -> bool:
    """Make the Triton launchers the CUDA implementations of ``torch.ops.fxopt.quant_linear`` and
    ``quant_linear_add_``.
    Idempotent (re-registering replaces the function). Returns False when triton is missing.
    Not called at import: ``fxopt.kernels.triton_ops.register_all`` does it on CUDA machines."""
    if triton is None:
        return False
    quant_linear.register_kernel("cuda")(_cuda_impl)
    quant_linear_add_.register_kernel("cuda")(quant_linear_add_triton)
    return True


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.quant_triton  (tile sweeps: benchmarks/quant_sweep.py)
# --------------------------------------------------------------------------------------------- #

LLAMA2_7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in, out): q/k/v/o, gate/up, down


def benchmark(dtype: torch.dtype = torch.bfloat16, group_size: int = 128) -> None:
    """The default path against the other Triton paths, the reference (dequantize + F.linear) and
    bf16 ``F.linear`` on an unquantized weight, at llama2-7b shapes, bits 8 and 4.

    CUDA-graph replays (how fxopt runs decode: no launch overhead) cycling through enough weight
    copies to miss L2, as a model's layers do. GB/s counts the weight bytes the op must read
    (qweight + scales, or the bf16 weight for F.linear); TFLOP/s is 2·M·N·K / t."""
    from triton.testing import do_bench_cudagraph

    from .quant import quantize_weight

    torch.manual_seed(0)
    dev = torch.device("cuda")
    l2_bytes = 2 * getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20)
    print(f"{torch.cuda.get_device_name()}  dtype={dtype}  group={group_size}  decode <= {DECODE_MAX_M} "
          f"< prefill < {DEQUANT_MIN_M} <= dequant")
    print(f"{'in':>6} {'out':>6} {'bits':>4} {'M':>5} {'path':>8} {'us':>8} {'GB/s':>6} {'TFLOP/s':>7} | "
          f"{'ref us':>8} | {'bf16 us':>8} {'GB/s':>6} | {'x bf16':>6}  max|err|")
    for in_f, out_f in LLAMA2_7B_SHAPES:
        w = torch.randn(out_f, in_f, device=dev, dtype=dtype) / in_f ** 0.5
        dense_w = [w] + [w.clone() for _ in range(l2_bytes // (w.numel() * w.element_size()))]
        for bits in (8, 4):
            qweight, scales = quantize_weight(w, group_size, bits)
            q_bytes = qweight.numel() * qweight.element_size() + scales.numel() * scales.element_size()
            copies = [(qweight, scales)] + [(qweight.clone(), scales.clone()) for _ in range(l2_bytes // q_bytes)]
            for m in (1, 8, 16, 32, 128, 2048):
                x = torch.randn(m, in_f, device=dev, dtype=dtype)
                flops = 2 * m * in_f * out_f
                expected = quant_linear_reference(x, qweight, scales, None, group_size, bits, in_f)

                def cycling(fn, items):  # each call takes the next copy (in the captured graph too)
                    it = itertools.cycle(items)
                    return lambda: fn(next(it))

                t_ref = do_bench_cudagraph(cycling(lambda qs: quant_linear_reference(
                    x, qs[0], qs[1], None, group_size, bits, in_f), copies)) * 1e-3
                t_dense = do_bench_cudagraph(cycling(lambda wc: torch.nn.functional.linear(x, wc), dense_w)) * 1e-3
                paths = [p for p in PATHS if p != "decode" or m <= MAX_DECODE_BLOCK_M]
                for path in sorted(paths, key=lambda p: p != default_path(m)):
                    def run(qs, path=path):
                        return quant_linear_triton(x, qs[0], qs[1], None, group_size, bits, in_f, path=path)

                    err = (run(copies[0]).float() - expected.float()).abs().max().item()
                    t = do_bench_cudagraph(cycling(run, copies)) * 1e-3
                    mark = "" if path == default_path(m) else "*"
                    print(f"{in_f:6} {out_f:6} {bits:4} {m:5} {path + mark:>8} {t * 1e6:8.1f} {q_bytes / t / 1e9:6.0f} "
                          f"{flops / t / 1e12:7.1f} | {t_ref * 1e6:8.1f} | {t_dense * 1e6:8.1f} "
                          f"{w.numel() * w.element_size() / t_dense / 1e9:6.0f} | {t_dense / t:6.2f}  {err:.2e}")
    print("(* = not the default path at this M; 'x bf16' = speed-up over bf16 F.linear)")


if __name__ == "__main__":
    benchmark()
