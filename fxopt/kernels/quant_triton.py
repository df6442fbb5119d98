"""Triton implementation of ``fxopt::quant_linear`` (see ``quant.py`` for the semantics and layout).

    y = quant_linear_triton(x, qweight, scales, bias, group_size, bits, in_features)  # ≈ F.linear(x, w, bias)

x is viewed as ``[M, K]`` (leading dims flattened, ``K = in_features``), the weight is ``[N, K]``
(``N = out_features``) stored as int8 (``bits=8``) or two 4-bit values a byte (``bits=4``), with one
scale per (row, group of ``group_size`` input features). Two kernels, picked by M:

Decode (``M <= DECODE_MAX_M``): a GEMV / skinny GEMM, bound by the weight bytes.
    Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``. A program owns ``BLOCK_N`` output features and a
    contiguous ``1 / SPLIT_K`` share of K, and *all* M rows of x: each weight byte is read from
    memory exactly once, by one program, dequantized in registers with its group's scale and
    used for every row. x is tiny and read by every program (from L2). With ``M == 1`` the
    program accumulates ``w * x`` elementwise in an fp32 ``[BLOCK_N, BLOCK_K]`` tile and sums it
    once at the end (no tensor cores: a dot would waste 15 of its 16 rows); with ``M > 1`` the
    x block is padded to 16 rows (``tl.dot``'s minimum) and the tile goes through ``tl.dot``.
    At decode shapes ``N / BLOCK_N`` programs alone may not fill the GPU (4096 outputs in blocks
    of 32 are 128 programs for 132 SMs), so K is split until there are about ``DECODE_WAVES``
    programs per SM. Split-K writes fp32 partials ``[SPLIT_K, M, N]`` and a second, tiny kernel
    sums them in a fixed order and adds the bias: no atomics, so the result is deterministic and
    the output needs no zeroing. The split count comes from shapes only, never from data.

Prefill (``M > DECODE_MAX_M``): a tiled GEMM, bound by the tensor cores.
    Grid ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` in grouped order (``GROUP_M`` row blocks sweep
    the columns together, so a weight tile is reused from L2 by several row blocks). Each K step
    loads an x tile and an int8/int4 weight tile, dequantizes the weight tile in registers into
    the activation dtype (fp16/bf16; fp32 for fp32 models) and feeds both to ``tl.dot`` with an
    fp32 accumulator. The weight is streamed at 1 or 0.5 bytes an element instead of 2, and no
    dequantized copy of it ever exists in memory (the reference materializes one per call).

Both share ``_dequant_tile``: a ``[BLOCK_N, BLOCK_K]`` weight tile → fp32. 4-bit tiles are loaded
as ``BLOCK_K / 2`` bytes a row and split into low and high nibbles, then ``tl.interleave``'d back
into feature order, so the rest of the kernel does not know how the weight was packed. Scales:
when every K block lies inside one group (``group_size`` a multiple of ``BLOCK_K``, which the
launcher arranges for power-of-two groups by shrinking ``BLOCK_K``, or one group for the whole row)
the tile takes one scale per row, a ``[BLOCK_N]`` load; otherwise (groups like 48 or 100) each
element gathers its own scale, a slower path kept for generality.

Numerics: fp32 accumulation everywhere. The dot paths round the dequantized weight to the
activation dtype before the product, exactly as the reference does (it dequantizes to ``x.dtype``
and calls ``F.linear``). The ``M == 1`` path multiplies the fp32 dequantized weight directly: it
skips two conversions per weight in an ALU-tight loop (4-bit) and is within one activation-dtype
ulp per weight of the reference, i.e. at least as accurate. The bias is rounded to ``x.dtype``
(as the reference's ``bias.to(x.dtype)``) and added to the fp32 accumulator before the one final
rounding.

Ragged shapes: every load is masked, so ``K`` need not divide by the block or the group (the last
group may be shorter: SmolLM2's 576 = 4.5 × 128), ``K`` may be odd with 4 bits (the last byte's
high nibble is padding), ``N`` and ``M`` need not divide by their blocks. Out-of-range x reads
come back 0 and weights stay finite there, so padding contributes exactly 0.

CUDA graphs: the launchers allocate only their output (and the split-K partials), never sync with
the host and pick grids and split counts from shapes alone, so they can be captured.

CPU: under ``TRITON_INTERPRET=1`` (set before this module is imported) the launchers run on CPU
tensors, which is how the tests exercise them. The interpreter gets ``tl.dot`` in bf16 wrong, so
test there in fp32/fp16.

The tile sizes below are reasoned defaults, not yet measured: ``benchmark(sweep=True)`` on a GPU
prints the best decode configurations, and ``DECODE_MAX_M`` should follow ``benchmark()``'s
decode-vs-prefill columns at M = 8 and 32.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .quant import n_groups, quant_linear, quant_linear_reference

from .triton_env import INTERPRET, jit as _jit, tl, triton

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Rows of x (leading dims flattened) up to which the decode kernel runs. Below it the op is bound by
# the weight bytes and the decode kernel reads them once with a grid that fills the GPU; above it
# the prefill kernel's big tiles reuse each weight tile for BLOCK_M rows on the tensor cores. Batched
# decode (M = 32, 64) sits in between: the decode kernel accepts up to MAX_DECODE_BLOCK_M rows
# (``path="decode"``) so that benchmark() can compare the two there.
DECODE_MAX_M = 16
MAX_DECODE_BLOCK_M = 64

# Decode: a BLOCK_N x BLOCK_K int8 tile is 4 KiB, 32 bytes per thread of 4 warps per step (two
# 16-byte loads), software-pipelined NUM_STAGES deep: roughly the bytes in flight an SM needs to
# cover memory latency at 1-2 programs per SM. A split must own at least MIN_BLOCKS_PER_SPLIT K
# blocks, or the partials and the second launch cost more than the occupancy gains.
DECODE_BLOCK_N = 32
DECODE_BLOCK_K = 128
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
DECODE_WAVES = 2  # decode programs to aim for, per SM (the split count follows from it)
DECODE_MIN_BLOCKS_PER_SPLIT = 2

# Prefill: the usual Hopper bf16 GEMM tile (128 x 128 x 64, 8 warps), grouped 8 row blocks deep.
PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 128
PREFILL_BLOCK_K = 64
PREFILL_GROUP_M = 8
PREFILL_NUM_WARPS = 8
PREFILL_NUM_STAGES = 3
# fp32 activations (fp32 models) take half the K step: fp32 x tiles are twice the bytes, and three
# stages of 128 x 64 of them plus the dequantized tile would crowd the shared memory.
PREFILL_BLOCK_K_FP32 = 32

REDUCE_BLOCK_N = 256

# One group spanning the whole row (group_size >= K): passed to the kernels as this constant so
# that every layer shares one compilation (k // WHOLE_ROW is 0 for any k).
WHOLE_ROW = 1 << 30

# tl.dot wants at least 16 along every dimension.
MIN_DOT = 16


# --------------------------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------------------------- #

@_jit
def _dequant_tile(
    QW, SC, offs_n, k0, N, K, stride_qn, stride_sn,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, SCALE_PER_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Weights of rows ``offs_n``, features ``k0 .. k0 + BLOCK_K``, dequantized: fp32 [BLOCK_N, BLOCK_K].

    Rows past N come out 0; features past K come out finite (0, or a padding nibble times a real
    scale), which the caller's zero x makes harmless. ``k0`` is a multiple of BLOCK_K (even)."""
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)  # int64: row * stride passes 2**31 for a 256k-vocab lm_head
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if BITS == 8:
        q = tl.load(QW + rows[:, None] * stride_qn + offs_k[None, :],
                    mask=mask_n[:, None] & (offs_k < K)[None, :], other=0).to(tl.float32)
    else:
        # Byte j holds features 2j (low nibble) and 2j+1 (high), each stored as q + 8. Load the
        # bytes once and split them in registers, rather than load each byte twice at k // 2.
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(QW + rows[:, None] * stride_qn + offs_b[None, :],
                         mask=mask_n[:, None] & (2 * offs_b < K)[None, :], other=0x88)  # 0x88: two zeros
        packed = packed.to(tl.int32)  # 0..255: no sign games in the shifts
        q = tl.interleave((packed & 0xF) - 8, (packed >> 4) - 8).to(tl.float32)
    if SCALE_PER_BLOCK:
        # The whole block lies in one group: one scale a row.
        s = tl.load(SC + rows * stride_sn + k0 // GROUP_SIZE, mask=mask_n, other=0.0).to(tl.float32)
        w = q * s[:, None]
    else:
        # Groups that straddle blocks: each element gathers its group's scale (cached loads).
        s = tl.load(SC + rows[:, None] * stride_sn + (offs_k // GROUP_SIZE)[None, :],
                    mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        w = q * s
    return w


@_jit
def _store_output(Y, BIAS, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """The epilogue: acc (fp32 [BLOCK_M, BLOCK_N]) + bias, rounded once into Y [M, N]."""
    mask_n = offs_n < N
    if HAS_BIAS:
        # Rounded to the output dtype first, as the reference's bias.to(x.dtype).
        b = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(Y.dtype.element_ty).to(tl.float32)
        acc = acc + b[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@_jit
def _decode_kernel(
    X, QW, SC, BIAS, Y, PART,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym, k_per_split,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """All M (<= BLOCK_M) rows of x times BLOCK_N weight rows, over one split of K.

    ``k_per_split`` is a multiple of BLOCK_K, so no block straddles two splits and K is the only
    ragged edge. SPLIT_K == 1 writes Y (with the bias); otherwise fp32 partials PART[split, M, N]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_kb = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)

    if BLOCK_M == 1:
        # GEMV: fp32 FMAs into a [BLOCK_N, BLOCK_K] tile, one cross-lane reduction at the end.
        acc_tile = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + offs_kb
            x = tl.load(X + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _dequant_tile(QW, SC, offs_n, k0, N, K, stride_qn, stride_sn,
                              GROUP_SIZE, BITS, SCALE_PER_BLOCK, BLOCK_K)
            acc_tile += w * x[None, :]
        acc = tl.sum(acc_tile, axis=1)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_rows = X + offs_m[:, None] * stride_xm
        mask_m = offs_m < M
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + offs_kb
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            w = _dequant_tile(QW, SC, offs_n, k0, N, K, stride_qn, stride_sn,
                              GROUP_SIZE, BITS, SCALE_PER_BLOCK, BLOCK_K)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc=acc, input_precision=DOT_PRECISION)

    if SPLIT_K == 1:
        _store_output(Y, BIAS, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)
    else:
        # Partials are contiguous [SPLIT_K, M, N]; the bias waits for the reduction.
        p_ptrs = PART + (split * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@_jit
def _split_k_reduce_kernel(
    PART, BIAS, Y, M, N, stride_ym,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y[m, n-block] = sum over splits of PART[:, m, n-block] (+ bias), in a fixed order."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    p = tl.load(PART + (offs_s[:, None] * M + m) * N + offs_n[None, :],
                mask=(offs_s < SPLIT_K)[:, None] & (offs_n < N)[None, :], other=0.0)
    acc = tl.sum(p, axis=0)[None, :]
    _store_output(Y, BIAS, acc, m + tl.arange(0, 1), offs_n, M, N, stride_ym, HAS_BIAS)


@_jit
def _prefill_kernel(
    X, QW, SC, BIAS, Y,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_PER_BLOCK: tl.constexpr,
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
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm  # int64: M * K passes 2**31 for long prompts

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(QW, SC, offs_n, k0, N, K, stride_qn, stride_sn,
                          GROUP_SIZE, BITS, SCALE_PER_BLOCK, BLOCK_K)
        # Rounded to the activation dtype, as the reference's dequantized weight: tensor cores.
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc=acc, input_precision=DOT_PRECISION)

    _store_output(Y, BIAS, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


# --------------------------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------------------------- #

def _pow2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(n), at_least)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a notional few, so that CPU tests still see several splits


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models must not be silently rounded to tf32; "tf32" is ignored for fp16/bf16 operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def _k_blocking(block_k: int, group_size: int, in_features: int) -> tuple[int, int, bool]:
    """(BLOCK_K, GROUP_SIZE as the kernel sees it, SCALE_PER_BLOCK) for a requested BLOCK_K.

    A block that lies inside one group needs one scale a row instead of one an element: true for
    a whole-row group, for groups that are multiples of BLOCK_K, and, by shrinking BLOCK_K to the
    group, for power-of-two groups of at least 16. Other groups gather their scales."""
    block_k = min(block_k, _pow2(in_features, MIN_DOT))  # no 128-wide blocks for K = 48
    if group_size >= in_features:
        return block_k, WHOLE_ROW, True
    if group_size % block_k == 0:
        return block_k, group_size, True
    if group_size >= MIN_DOT and group_size & (group_size - 1) == 0:
        return group_size, group_size, True
    return block_k, group_size, False


def decode_split_k(out_features: int, k_blocks: int, block_n: int, device: torch.device) -> int:
    """K splits for the decode kernel: enough programs for DECODE_WAVES per SM, each split owning
    at least DECODE_MIN_BLOCKS_PER_SPLIT K blocks. Shapes only (CUDA graphs)."""
    n_blocks = triton.cdiv(out_features, block_n)
    want = triton.cdiv(DECODE_WAVES * _sm_count(device), n_blocks)
    return max(1, min(want, k_blocks // DECODE_MIN_BLOCKS_PER_SPLIT))


def _config(defaults: dict, overrides: dict | None) -> dict:
    unknown = set(overrides or {}) - set(defaults)
    if unknown:
        raise ValueError(f"quant_linear_triton: unknown config keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **(overrides or {})}


def _alloc_partials(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Split-K partials (every element is written by the decode kernel). A function so that tests
    can hand out poisoned buffers."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def decode_plan(m: int, out_features: int, in_features: int, group_size: int, device: torch.device,
                split_k: int | None = None, config: dict | None = None) -> dict:
    """The decode launch for these shapes: tile settings, BLOCK_M, BLOCK_K (and how the kernel sees
    the group), the split count and the K features per split. Shapes only (CUDA graphs)."""
    cfg = _config(dict(block_n=DECODE_BLOCK_N, block_k=DECODE_BLOCK_K, num_warps=DECODE_NUM_WARPS,
                       num_stages=DECODE_NUM_STAGES), config)
    block_m = 1 if m == 1 else _pow2(m, MIN_DOT)
    if block_m > MAX_DECODE_BLOCK_M:
        raise ValueError(f"quant_linear_triton: the decode path takes at most {MAX_DECODE_BLOCK_M} rows, got {m}")
    block_k, group, per_block = _k_blocking(cfg["block_k"], group_size, in_features)
    k_blocks = triton.cdiv(in_features, block_k)
    if split_k is None:
        split_k = decode_split_k(out_features, k_blocks, cfg["block_n"], device)
    # Even shares of whole blocks; recount so that no split is left empty.
    blocks_per_split = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks)))
    return dict(cfg, block_m=block_m, block_k=block_k, group=group, per_block=per_block,
                split_k=triton.cdiv(k_blocks, blocks_per_split), k_per_split=blocks_per_split * block_k)


def _decode(x2, qweight, scales, bias, y2, group_size, bits, in_features, split_k, config):
    m, n = y2.shape
    plan = decode_plan(m, n, in_features, group_size, y2.device, split_k, config)
    split_k = plan["split_k"]
    partials = _alloc_partials((split_k, m, n), y2.device) if split_k > 1 else y2  # y2: never touched
    _decode_kernel[(triton.cdiv(n, plan["block_n"]), split_k)](
        # A missing bias gets some pointer (x): the constexpr flag keeps it from being read.
        x2, qweight, scales, bias if bias is not None else x2, y2, partials,
        m, n, in_features, x2.stride(0), qweight.stride(0), scales.stride(0), y2.stride(0), plan["k_per_split"],
        GROUP_SIZE=plan["group"], BITS=bits, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        SCALE_PER_BLOCK=plan["per_block"], BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"],
        BLOCK_K=plan["block_k"], DOT_PRECISION=_dot_precision(x2.dtype),
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if split_k > 1:
        _split_k_reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK_N))](
            partials, bias if bias is not None else x2, y2, m, n, y2.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK_S=_pow2(split_k), BLOCK_N=REDUCE_BLOCK_N,
            num_warps=4,
        )


def _prefill(x2, qweight, scales, bias, y2, group_size, bits, in_features, config):
    m, n = y2.shape
    cfg = _config(dict(block_m=PREFILL_BLOCK_M, block_n=PREFILL_BLOCK_N, block_k=PREFILL_BLOCK_K,
                       group_m=PREFILL_GROUP_M, num_warps=PREFILL_NUM_WARPS, num_stages=PREFILL_NUM_STAGES), config)
    # Shrink the row block for short inputs (a 17-row input needs 32 rows, not 128). On the
    # interpreter this is also what keeps the tests fast.
    block_m = min(cfg["block_m"], _pow2(m, MIN_DOT))
    block_n = min(cfg["block_n"], _pow2(n, MIN_DOT))
    if x2.dtype == torch.float32 and "block_k" not in (config or {}):
        cfg["block_k"] = PREFILL_BLOCK_K_FP32
    block_k, group, per_block = _k_blocking(cfg["block_k"], group_size, in_features)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _prefill_kernel[grid](
        x2, qweight, scales, bias if bias is not None else x2, y2,
        m, n, in_features, x2.stride(0), qweight.stride(0), scales.stride(0), y2.stride(0),
        GROUP_SIZE=group, BITS=bits, HAS_BIAS=bias is not None, SCALE_PER_BLOCK=per_block,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["group_m"],
        DOT_PRECISION=_dot_precision(x2.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def supported(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int, bits: int,
              in_features: int) -> bool:
    """Whether the kernels take these arguments (the layout of ``quant.py``, float activations,
    one device); the CUDA implementation falls back to the reference otherwise."""
    if bits not in (8, 4) or group_size <= 0 or in_features <= 0:
        return False
    if x.dim() == 0 or x.dtype not in DTYPES or x.shape[-1] != in_features:
        return False
    if qweight.dim() != 2 or qweight.dtype != (torch.int8 if bits == 8 else torch.uint8):
        return False
    if qweight.shape[1] != (in_features if bits == 8 else (in_features + 1) // 2):
        return False
    out_features = qweight.shape[0]
    if scales.shape != (out_features, n_groups(in_features, group_size)) or scales.dtype not in DTYPES:
        return False
    if bias is not None and (bias.shape != (out_features,) or bias.dtype not in DTYPES):
        return False
    return len({t.device for t in (x, qweight, scales, bias) if t is not None}) == 1


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def quant_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int,
                        bits: int, in_features: int, *, out: Tensor | None = None, path: str | None = None,
                        split_k: int | None = None, config: dict | None = None) -> Tensor:
    """``quant_linear_reference`` on the Triton kernels (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``). No host sync: safe to capture in a CUDA graph.

    ``out`` (contiguous, ``[*x.shape[:-1], out_features]``, ``x.dtype``) is written instead of a new
    tensor. For tests and tuning: ``path`` ("decode" or "prefill") overrides the choice by
    ``DECODE_MAX_M``; ``split_k`` overrides the decode split count; ``config`` overrides tile
    settings (decode: block_n, block_k, num_warps, num_stages; prefill: also block_m, group_m).
    """
    if triton is None:
        raise RuntimeError("quant_linear_triton: triton is not installed")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("quant_linear_triton: CPU tensors need TRITON_INTERPRET=1 set before fxopt is imported")
    if not supported(x, qweight, scales, bias, group_size, bits, in_features):
        raise ValueError("quant_linear_triton: unsupported arguments (see supported()); use the reference")
    out_features = qweight.shape[0]
    shape = (*x.shape[:-1], out_features)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"quant_linear_triton: expected a contiguous {x.dtype} out of shape {shape}, got "
                         f"{out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    if out.numel() == 0:
        return out
    # x as [M, K] with a unit column stride: a view when the leading dims merge, else a copy.
    x2 = _unit_last_stride(x).reshape(-1, in_features)
    y2 = out.view(-1, out_features)
    qweight, scales = _unit_last_stride(qweight), _unit_last_stride(scales)
    bias = bias.contiguous() if bias is not None else None
    if path is None:
        path = "decode" if x2.shape[0] <= DECODE_MAX_M else "prefill"
    if path == "decode":
        _decode(x2, qweight, scales, bias, y2, group_size, bits, in_features, split_k, config)
    elif path == "prefill":
        _prefill(x2, qweight, scales, bias, y2, group_size, bits, in_features, config)
    else:
        raise ValueError(f"quant_linear_triton: path must be 'decode' or 'prefill', got {path!r}")
    return out


# --------------------------------------------------------------------------------------------- #
# Registration as the CUDA implementation of the custom op
# --------------------------------------------------------------------------------------------- #

def _cuda_impl(x, qweight, scales, bias, group_size, bits, in_features):
    if supported(x, qweight, scales, bias, group_size, bits, in_features):
        return quant_linear_triton(x, qweight, scales, bias, group_size, bits, in_features)
    return quant_linear_reference(x, qweight, scales, bias, group_size, bits, in_features)


def register() -> bool:
    """Make the Triton launcher the CUDA implementation of ``torch.ops.fxopt.quant_linear``.
    Idempotent (re-registering replaces the function). Returns False when triton is missing.
    Not called at import: ``fxopt.kernels.triton_ops.register_all`` does it on CUDA machines."""
    if triton is None:
        return False
    quant_linear.register_kernel("cuda")(_cuda_impl)
    return True


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.quant_triton [--sweep]
# --------------------------------------------------------------------------------------------- #

LLAMA2_7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in, out): q/k/v/o, gate/up, down


def benchmark(dtype: torch.dtype = torch.bfloat16, group_size: int = 128, sweep: bool = False) -> None:
    """Triton vs the reference (dequantize + F.linear) vs bf16 ``F.linear`` on an unquantized
    weight, at llama2-7b shapes, bits 8 and 4.

    GB/s counts the weight bytes the op must read (qweight + scales for the quantized ops, the bf16
    weight for F.linear; x and y are small next to them at decode sizes). TFLOP/s is 2·M·N·K / t.
    Everything is timed as CUDA-graph replays (how fxopt runs decode: no launch overhead). For
    M = 1, 8 and 32 both Triton paths are timed (the non-default one marked *), to place
    DECODE_MAX_M. ``sweep`` also tries decode tile configurations and prints the best three per
    (shape, bits, M = 1 and 8)."""
    from triton.testing import do_bench_cudagraph

    torch.manual_seed(0)
    dev = torch.device("cuda")
    from .quant import quantize_weight

    print(f"{torch.cuda.get_device_name()}  dtype={dtype}  group={group_size}  decode up to M={DECODE_MAX_M}")
    print(f"{'in':>6} {'out':>6} {'bits':>4} {'M':>5} {'path':>8} {'split':>5} {'us':>8} {'GB/s':>6} {'TFLOP/s':>7}"
          f" | {'ref us':>8} {'GB/s':>6} | {'bf16 us':>8} {'GB/s':>6} {'TFLOP/s':>7} | {'x bf16':>6}  max|err|")
    for in_f, out_f in LLAMA2_7B_SHAPES:
        w = torch.randn(out_f, in_f, device=dev, dtype=dtype) / in_f ** 0.5
        bias = None
        for bits in (8, 4):
            qweight, scales = quantize_weight(w, group_size, bits)
            q_bytes = qweight.numel() * qweight.element_size() + scales.numel() * scales.element_size()
            for m in (1, 8, 32, 2048):
                x = torch.randn(m, in_f, device=dev, dtype=dtype)
                flops = 2 * m * in_f * out_f

                def ref():
                    return quant_linear_reference(x, qweight, scales, bias, group_size, bits, in_f)

                def dense():  # the unquantized bf16 layer: what quantization has to beat
                    return torch.nn.functional.linear(x, w, bias)

                t_ref = do_bench_cudagraph(ref) * 1e-3
                t_dense = do_bench_cudagraph(dense) * 1e-3
                expected = ref()
                default = "decode" if m <= DECODE_MAX_M else "prefill"
                paths = (default, "prefill" if default == "decode" else "decode") if m <= MAX_DECODE_BLOCK_M \
                    else (default,)
                for path in paths:
                    def run():
                        return quant_linear_triton(x, qweight, scales, bias, group_size, bits, in_f, path=path)

                    err = (run().float() - expected.float()).abs().max().item()
                    t = do_bench_cudagraph(run) * 1e-3
                    split = decode_plan(m, out_f, in_f, group_size, dev)["split_k"] if path == "decode" else "-"
                    tflops = f"{flops / t / 1e12:7.1f}" if m == 2048 else " " * 7
                    dense_tflops = f"{flops / t_dense / 1e12:7.1f}" if m == 2048 else " " * 7
                    mark = "" if path == default else "*"
                    print(f"{in_f:6} {out_f:6} {bits:4} {m:5} {path + mark:>8} {split!s:>5} {t * 1e6:8.1f} "
                          f"{q_bytes / t / 1e9:6.0f} {tflops} | {t_ref * 1e6:8.1f} {q_bytes / t_ref / 1e9:6.0f} | "
                          f"{t_dense * 1e6:8.1f} {w.numel() * w.element_size() / t_dense / 1e9:6.0f} {dense_tflops} | "
                          f"{t_dense / t:6.2f}  {err:.2e}")
                if sweep and m <= 8:
                    _sweep_decode(x, qweight, scales, group_size, bits, in_f, q_bytes)
    print("(* = not the default path at this M; 'x bf16' = speed-up over bf16 F.linear)")


def _sweep_decode(x, qweight, scales, group_size, bits, in_f, q_bytes) -> None:
    """The best few decode configurations for one shape (prints; changes nothing). About 50
    configurations, each compiled once per (bits, BLOCK_M): minutes for the whole benchmark."""
    from triton.testing import do_bench_cudagraph

    m, out_f = x.shape[0], qweight.shape[0]
    results, seen = [], set()
    for block_n in (16, 32, 64):
        for block_k in (128, 256):
            for num_warps in (4, 8):
                for num_stages in (3, 4):
                    for split_k in (None, 1):
                        cfg = dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
                        plan = decode_plan(m, out_f, in_f, group_size, x.device, split_k, cfg)
                        key = tuple(sorted((k, v) for k, v in plan.items()))
                        if key in seen:  # BLOCK_K shrunk to the group: the same launch as before
                            continue
                        seen.add(key)
                        try:
                            t = do_bench_cudagraph(lambda: quant_linear_triton(
                                x, qweight, scales, None, group_size, bits, in_f, path="decode", split_k=split_k,
                                config=cfg)) * 1e-3
                        except Exception as e:  # out of shared memory / registers: skip the config
                            print(f"    skip {cfg} split={split_k}: {type(e).__name__}")
                            continue
                        results.append((t, cfg, plan["split_k"]))
    results.sort(key=lambda r: r[0])
    for t, cfg, split_k in results[:3]:
        print(f"    sweep M={m}: {t * 1e6:7.1f} us {q_bytes / t / 1e9:6.0f} GB/s  {cfg} split={split_k}")


if __name__ == "__main__":
    import sys

    benchmark(sweep="--sweep" in sys.argv[1:])
