"""Triton implementation of ``torch.ops.fxopt.cached_attention`` (see ``attention.py`` for the semantics).

Two paths, picked by the number of new tokens per row ``S``:

Decode (S == 1): flash-decoding, memory-bound, the path that matters.
    Grid ``(B, Hkv, NUM_SPLITS)``. A program owns one kv head of one row and *all* ``G = Hq / Hkv``
    query heads that share it, so every cache byte is read once per group, not once per query head.
    The q block is ``[G, D]`` padded to ``[BLOCK_G, BLOCK_D]`` (powers of two, masked). The program
    reads its row's position ``p`` on the device (no host sync: the launch is CUDA-graph capturable,
    the grid depends on shapes only) and splits the visible slots ``[lo, p)`` evenly between the
    ``NUM_SPLITS`` programs of the (row, head): the split is sized from ``p`` at run time, so every
    split has work whatever the position (a program whose share is empty contributes ``m = -inf,
    l = 0``). Each program runs an online softmax (fp32, base 2) over ``BLOCK_N`` keys at a time and
    stores its partial (max, sum, unnormalised acc); ``_combine_kernel`` then merges the splits.
    The new token itself (slot ``p``) is never read back from the cache: the last split takes it
    from k/v in registers, writes it into the cache and folds it into its softmax as one more key.
    No program reads slot ``p``, so the in-kernel write races with nothing and the cache write costs
    no extra launch. With one split the decode kernel normalises and writes the output directly.
    With ``cos``/``sin`` (the rotary folded in by ``fuse``) every program rotates its q block, and
    the last split the new k, as it loads them: the rotary costs no launch either.

Prefill (S > 1): a small scatter kernel writes the S new k/v rows into the cache, then a
    flash-attention kernel (grid ``(cdiv(S, BLOCK_M), B * Hq)``, one query head per program) attends
    over the cache with a per-query mask ``lo(p_i) <= j <= p_i``, looping only over the slots the
    block's positions can see. It reads k/v once per query head (no GQA sharing): prefill is
    compute-bound and this keeps it simple. It replaces the reference, which on CUDA builds an fp32
    score tensor over the whole ``max_seq`` cache ([B, Hq, S, max_seq]: gigabytes for long prompts).

Prompts from slot 0 (``fxopt.prompt_attention``, the prefill graph's op): the rotary kernel, which
    also writes k/v into the caches (``rotary_triton(..., cache=...)``; the scatter kernel when there
    is no rotary), then causal attention over q, k, v by PyTorch's SDPA, cuDNN's kernel first: on an H200 (2026-11-27,
    S = 2048, bf16) 85.7 µs for the llama2-7b heads against 159.8 µs for the prefill kernel below and
    163.1 µs for SDPA's flash-attention kernel; 57.2 against 94.1 µs for llama-1b's (GQA).

Numerics: scores, softmax and accumulators are fp32; ``tl.dot`` takes the cache dtype (fp16/bf16 on
tensor cores, fp32 with ``input_precision="ieee"`` so fp32 models are not silently rounded to tf32);
probabilities are cast to the value dtype before the second product, as in flash attention. The
decode q block is padded to at least 16 rows for ``tl.dot`` even for a group of one (MHA): the
padding is free in a memory-bound kernel, and on an H200 it ran 2-2.5x faster than the
broadcast-multiply-and-sum alternative (which gets no software pipelining of its loads).

CPU: under ``TRITON_INTERPRET=1`` (set before this module is imported) the launcher runs on CPU
tensors, which is how the tests exercise it. The interpreter gets ``tl.dot`` in bf16 wrong, so test
there in fp32/fp16.

Positions must lie in ``[0, max_seq)`` (the reference raises otherwise). The kernels never access
memory out of bounds for a bad position, but their output for that row is then meaningless.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import (_check, cached_attention, cached_attention_reference, empty_token_major, prompt_attention,
                        token_major)
from .rotary import rotary_reference
from .rotary_triton import cache_supported as rotary_cache_supported, rotary_triton, supported as rotary_supported

from .triton_env import INTERPRET, PREFETCH_CHUNKS, jit as _jit, pdl_code, prefetch_plan, tl, triton

if triton is not None:
    from .triton_env import l2_prefetch, l2_prefetch_rows, pdl_trigger, pdl_wait

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # window 0 means "no window": a window wider than any cache

# Hopper defaults, from a sweep on an H200 (BLOCK_N 32/64/128, 4/8 warps, 1-4 stages, 1-8 waves)
# over the llama2-7b / llama-1b decode shapes of benchmark(); differences between the runners-up
# were within noise (~0.5 us).
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
DECODE_WAVES = 1  # decode programs to aim for, per SM (the split count follows from it)
# Cache blocks a split owns at least, counted on the cache's length (a shape, so CUDA-graph safe).
# Above 1 a short cache gets fewer splits; a single split writes the output itself (no merge kernel).
# Measured at 1 / 4 / 8 on a 264-slot cache (H100, 2026-12-07): 1.037 / 1.050 / 1.050 ms a token
# (1B), 4.776 / 4.777 / 4.786 (7B): the merge costs less than the longer loop, so 1.
DECODE_MIN_BLOCKS_PER_SPLIT = 1
# PDL (triton_env): cache slots of its split a decode program prefetches into L2 (K and V rows)
# before its wait -- the slots before the new token are constants by then. A power of two; 0: none.
# 64 against 0 (H100, 2026-12-07): 1.032 against 1.030 ms a token (1B), 4.792 against 4.777 (7B).
DECODE_PRELOAD_SLOTS = 0
# (A merge by the last split to finish, on arrival counters, instead of _combine_kernel measured
# within noise of it on an H200, 2026-11-27: llama2-7b 3.799 vs 3.817 ms, llama-1b 1.001 vs
# 0.991 ms a token at batch 1. The merge's serial tail costs what the launch saved.)
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 2
WRITE_BLOCK_S = 16


# --------------------------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------------------------- #

@_jit
def _write_cache_kernel(
    K, V, KC, VC, POS,
    S, max_seq, heads_kv,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    skc_b, skc_h, skc_s, skc_d, svc_b, svc_h, svc_s, svc_d,
    sp_b, sp_s,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """k/v[b, h, s] → cache[b, h, positions[b, s]] for BLOCK_S tokens of one (row, kv head)."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // heads_kv).to(tl.int64)  # int64: b * batch stride can pass 2**31 for big caches
    h = pid_bh % heads_kv
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = tl.load(POS + b * sp_b + offs_s * sp_s, mask=offs_s < S, other=-1).to(tl.int32)
    ok = (offs_s < S) & (pos >= 0) & (pos < max_seq)  # never write outside the cache

    mask_k = ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + b * sk_b + h * sk_h + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d, mask=mask_k)
    tl.store(KC + b * skc_b + h * skc_h + pos[:, None] * skc_s + offs_d[None, :] * skc_d,
             k.to(KC.dtype.element_ty), mask=mask_k)
    mask_v = ok[:, None] & (offs_dv[None, :] < DV)
    v = tl.load(V + b * sv_b + h * sv_h + offs_s[:, None] * sv_s + offs_dv[None, :] * sv_d, mask=mask_v)
    tl.store(VC + b * svc_b + h * svc_h + pos[:, None] * svc_s + offs_dv[None, :] * svc_d,
             v.to(VC.dtype.element_ty), mask=mask_v)


@_jit
def _rotate(x, x_pair, cos, sin, first, DT: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` with the reference's roundings (each product and the sum
    rounded to DT, the dtype of q, k, cos and sin); ``x_pair`` holds x's other half at each lane."""
    a = (x.to(tl.float32) * cos).to(DT).to(tl.float32)
    b = (x_pair.to(tl.float32) * sin).to(DT).to(tl.float32)
    return tl.where(first, a - b, a + b).to(DT)


@_jit
def _split_slots(POS, max_seq, window, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(pos, start, stop)``: the row's new-token slot and split ``split``'s share of the visible
    cache slots [lo, end) (the new token aside). Split s takes the s-th chunk of [lo, end), chunks
    rounded up to BLOCK_N so that only the last block of a chunk is ragged."""
    pos = tl.load(POS).to(tl.int32)
    end = tl.minimum(pos, max_seq)
    lo = tl.maximum(pos - window + 1, 0)
    n_slots = tl.maximum(end - lo, 0)
    chunk = tl.cdiv(tl.cdiv(n_slots, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    return pos, start, tl.minimum(start + chunk, end)


@_jit
def _decode_kernel(
    Q, K, V, KC, VC, POS, OUT, PART_ACC, PART_M, PART_L, COS, SIN, PF,
    scale_log2, window, max_seq, pf_total, pf_chunk,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d,
    skc_b, skc_h, skc_s, skc_d, svc_b, svc_h, svc_s, svc_d,
    sp_b, so_b, so_h, so_d, scos_b, scos_d, ssin_b, ssin_d,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROTARY: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
    PF_CHUNKS: tl.constexpr = 1, PRELOAD_SLOTS: tl.constexpr = 0, K_LINES: tl.constexpr = 128,
    V_LINES: tl.constexpr = 128,
):
    """One (row b, kv head h, split): all GROUP query heads of h over this split's share of the cache.
    With ROTARY, q and the new k are rotated here, from COS/SIN [B, 1, D] (see ``_rotate``).
    PDL (triton_env): waits for the kernel before it (which wrote q, k, v) before reading anything.
    PREFETCH (triton_env.l2_prefetch): first, this program's share of ``pf_total`` bytes at PF goes
    to L2 -- a constant weight, so before the wait. PRELOAD_SLOTS: so do the first PRELOAD_SLOTS
    cache slots of this program's split, K and V rows, K_LINES / V_LINES bytes a row (its bytes
    rounded up to a power of two from 128). Those slots were written by earlier steps, and the
    position it reads for them was written before the kernel before this one passed its own wait
    (PDL keeps two kernels in flight at most): at worst a stale read, which only misplaces a hint."""
    if PREFETCH:
        program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        l2_prefetch(PF, program, pf_total, pf_chunk, PF_CHUNKS)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    heads_q = tl.num_programs(1) * GROUP
    kc_base = KC + b * skc_b + h * skc_h
    vc_base = VC + b * svc_b + h * svc_h
    if PDL and PRELOAD_SLOTS > 0:
        _, start, stop = _split_slots(POS + b * sp_b, max_seq, window, split, NUM_SPLITS, BLOCK_N)
        slots = start + tl.arange(0, PRELOAD_SLOTS)
        slots = tl.where(slots < stop, slots, start)  # past the split: its first slot again
        ELT: tl.constexpr = KC.dtype.element_ty.primitive_bitwidth // 8
        l2_prefetch_rows(kc_base.to(tl.pointer_type(tl.int8)), slots, max_seq, skc_s * ELT, D * ELT, K_LINES)
        l2_prefetch_rows(vc_base.to(tl.pointer_type(tl.int8)), slots, max_seq, svc_s * ELT, DV * ELT, V_LINES)
    pdl_wait(PDL)
    pos, start, stop = _split_slots(POS + b * sp_b, max_seq, window, split, NUM_SPLITS, BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    heads = h * GROUP + offs_g  # query heads of this kv head: h*G .. h*G+G-1, as the reference groups them

    mask_q = mask_g[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d, mask=mask_q, other=0.0)
    if ROTARY:
        first = offs_d < D // 2
        offs_pair = tl.where(first, offs_d + D // 2, offs_d - D // 2)  # the other half of each lane
        cos = tl.load(COS + b * scos_b + offs_d * scos_d, mask=mask_d, other=0.0).to(tl.float32)
        sin = tl.load(SIN + b * ssin_b + offs_d * ssin_d, mask=mask_d, other=0.0).to(tl.float32)
        q_pair = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_pair[None, :] * sq_d, mask=mask_q, other=0.0)
        q = _rotate(q, q_pair, cos[None, :], sin[None, :], first[None, :], Q.dtype.element_ty)
    q = q.to(KC.dtype.element_ty)  # tl.dot wants both operands in one dtype

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)  # running sum of exp2(score - m_i) * v

    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        # Masked loads fill 0, never the cache's contents: an unwritten (garbage, NaN) slot times a
        # zero probability would still be NaN.
        k = tl.load(kc_base + offs_n[:, None] * skc_s + offs_d[None, :] * skc_d,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(mask_n[None, :], qk * scale_log2, float("-inf"))
        # Every block holds at least one visible slot (n0 < stop), so m_new is finite: no inf - inf.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_base + offs_n[:, None] * svc_s + offs_dv[None, :] * svc_d,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    pdl_trigger(PDL)

    if split == NUM_SPLITS - 1:
        # The new token: write it to the cache (rounded to the cache dtype, as the reference reads it
        # back) and fold it in as one more key, straight from registers.
        k_new = tl.load(K + b * sk_b + h * sk_h + offs_d * sk_d, mask=mask_d, other=0.0)
        if ROTARY:
            k_pair = tl.load(K + b * sk_b + h * sk_h + offs_pair * sk_d, mask=mask_d, other=0.0)
            k_new = _rotate(k_new, k_pair, cos, sin, first, K.dtype.element_ty)
        k_new = k_new.to(KC.dtype.element_ty)
        v_new = tl.load(V + b * sv_b + h * sv_h + offs_dv * sv_d, mask=mask_dv, other=0.0).to(VC.dtype.element_ty)
        # Skip the write for a position outside the cache. (Written as a bound on the lane index:
        # the interpreter turns `vector_bool & scalar_bool` into ints, which tl.store rejects.)
        in_cache = ((pos >= 0) & (pos < max_seq)).to(tl.int32)
        tl.store(kc_base + pos * skc_s + offs_d * skc_d, k_new, mask=offs_d < D * in_cache)
        tl.store(vc_base + pos * svc_s + offs_dv * svc_d, v_new, mask=offs_dv < DV * in_cache)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale_log2
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp2(m_i - m_new)
        p_new = tl.exp2(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new

    mask_out = mask_g[:, None] & mask_dv[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]  # l_i >= 1: the running max's own term is exp2(0)
        tl.store(OUT + b * so_b + heads[:, None] * so_h + offs_dv[None, :] * so_d,
                 out.to(OUT.dtype.element_ty), mask=mask_out)
    else:
        # Partials are contiguous [B, Hq, NUM_SPLITS] (+ [BLOCK_DV] for acc).
        row = (b * heads_q + heads) * NUM_SPLITS + split
        tl.store(PART_M + row, m_i, mask=mask_g)
        tl.store(PART_L + row, l_i, mask=mask_g)
        tl.store(PART_ACC + row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=mask_out)


@_jit
def _combine_kernel(
    PART_ACC, PART_M, PART_L, OUT,
    heads_q, so_b, so_h, so_d,
    DV: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
    PDL: tl.constexpr,
):
    """Merge the splits of one (row, query head): out = Σ 2^(m_s - m) acc_s / Σ 2^(m_s - m) l_s."""
    pdl_wait(PDL)
    pdl_trigger(PDL)  # a few loads and one store: no tail worth waiting for
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_s = offs_s < NUM_SPLITS
    mask_dv = offs_dv < DV
    row = (b * heads_q + hq) * NUM_SPLITS + offs_s
    m = tl.load(PART_M + row, mask=mask_s, other=float("-inf"))
    l = tl.load(PART_L + row, mask=mask_s, other=0.0)
    # Columns past DV were never written (torch.empty): mask them rather than compute on garbage.
    acc = tl.load(PART_ACC + row[:, None] * BLOCK_DV + offs_dv[None, :], mask=mask_s[:, None] & mask_dv[None, :],
                  other=0.0)
    # The last split always holds the new token, so m_max is finite; empty splits (m = -inf) weigh 0.
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(OUT + b * so_b + hq * so_h + offs_dv * so_d, out.to(OUT.dtype.element_ty), mask=mask_dv)


@_jit
def _prefill_kernel(
    Q, KC, VC, POS, OUT,
    scale_log2, window, max_seq, S, heads_q,
    sq_b, sq_h, sq_s, sq_d,
    skc_b, skc_h, skc_s, skc_d, svc_b, svc_h, svc_s, svc_d,
    sp_b, sp_s, so_b, so_h, so_s, so_d,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """BLOCK_M queries of one (row, query head) over the cache (already holding this step's k/v)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_q).to(tl.int64)
    hq = pid_bh % heads_q
    h = hq // GROUP
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < S
    mask_d = offs_d < D
    mask_dv = offs_dv < DV

    q = tl.load(Q + b * sq_b + hq * sq_h + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(KC.dtype.element_ty)
    # Query i sees slots lo_i <= j <= pos_i. Rows past S get pos = -1: they see nothing.
    pos = tl.load(POS + b * sp_b + offs_m * sp_s, mask=mask_m, other=-1).to(tl.int32)
    lo = tl.maximum(pos - window + 1, 0)
    # Loop only over the slots some query of the block can see.
    start = tl.min(tl.where(mask_m, lo, max_seq), axis=0)
    stop = tl.minimum(tl.max(pos, axis=0) + 1, max_seq)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    kc_base = KC + b * skc_b + h * skc_h
    vc_base = VC + b * svc_b + h * svc_h
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        k = tl.load(kc_base + offs_n[:, None] * skc_s + offs_d[None, :] * skc_d,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] >= lo[:, None]) & mask_n[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        # Unlike decode, a query may see nothing in this block (window, pad rows): keep -inf rows
        # from producing inf - inf = NaN by subtracting 0 instead.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_base + offs_n[:, None] * svc_s + offs_dv[None, :] * svc_d,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * so_b + hq * so_h + offs_m[:, None] * so_s + offs_dv[None, :] * so_d,
             out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


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


def decode_num_splits(batch: int, heads_kv: int, max_seq: int, device: torch.device,
                      block_n: int = DECODE_BLOCK_N) -> int:
    """Splits per (row, kv head): enough programs for DECODE_WAVES per SM, a power of two, no more
    than the cache has blocks (DECODE_MIN_BLOCKS_PER_SPLIT each, rounded up to a power of two).
    Depends on shapes only, never on positions (CUDA graphs). E.g. llama2-7b (32 kv heads) at
    batch 1 on 132 SMs wants 5 programs a kv head, so 8 splits; a 264-slot cache is 5 blocks of 64,
    so 8 splits again, or 1 with DECODE_MIN_BLOCKS_PER_SPLIT = 8 (the merge kernel then skipped).
    """
    want = triton.cdiv(DECODE_WAVES * _sm_count(device), batch * heads_kv)
    blocks = triton.cdiv(triton.cdiv(max_seq, block_n), DECODE_MIN_BLOCKS_PER_SPLIT)
    return max(1, min(_pow2(want), _pow2(blocks), 64))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 operands


def _decode(q, k, v, k_cache, v_cache, positions, out, scale, window, num_splits=None, cos=None, sin=None,
            prefetch=None):
    batch, heads_q, _, dim = q.shape
    heads_kv, dim_v = k.shape[1], v.shape[-1]
    group = heads_q // heads_kv
    max_seq = k_cache.shape[2]
    if num_splits is None:
        num_splits = decode_num_splits(batch, heads_kv, max_seq, q.device)
    block_g = _pow2(group, 16)  # tl.dot needs >= 16 rows
    block_d, block_dv = _pow2(dim, 16), _pow2(dim_v, 16)
    if num_splits > 1:
        part_acc = torch.empty((batch, heads_q, num_splits, block_dv), dtype=torch.float32, device=q.device)
        part_m = torch.empty((batch, heads_q, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:  # the kernel writes the output itself; these are never touched
        part_acc = part_m = part_l = out
    rotary = cos is not None
    if rotary:  # [B or 1, 1, D] -> [B, D] (a batch of 1 broadcast with stride 0)
        cos, sin = cos.expand(batch, 1, dim)[:, 0], sin.expand(batch, 1, dim)[:, 0]
    else:
        cos = sin = out  # never read
    pdl = pdl_code(q.device)
    pf_total, pf_chunk = prefetch_plan(prefetch, batch * heads_kv * num_splits)
    _decode_kernel[(batch, heads_kv, num_splits)](
        q, k, v, k_cache, v_cache, positions, out, part_acc, part_m, part_l, cos, sin,
        prefetch if pf_total else out,
        scale * LOG2E, window if window > 0 else NO_WINDOW, max_seq, pf_total, pf_chunk,
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(3),
        v.stride(0), v.stride(1), v.stride(3),
        *k_cache.stride(), *v_cache.stride(),
        positions.stride(0), out.stride(0), out.stride(1), out.stride(3),
        cos.stride(0), cos.stride(-1), sin.stride(0), sin.stride(-1),
        GROUP=group, D=dim, DV=dim_v, NUM_SPLITS=num_splits,
        BLOCK_G=block_g, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d, BLOCK_DV=block_dv,
        DOT_PRECISION=_dot_precision(k_cache.dtype), ROTARY=rotary, PDL=pdl, PREFETCH=pf_total > 0,
        PF_CHUNKS=PREFETCH_CHUNKS, PRELOAD_SLOTS=DECODE_PRELOAD_SLOTS if pdl else 0,
        K_LINES=_pow2(dim * k_cache.element_size(), 128), V_LINES=_pow2(dim_v * v_cache.element_size(), 128),
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES, launch_pdl=pdl > 0,
        # No FMA contraction with rotary: it would skip the roundings _rotate repeats from the
        # reference (as in rotary_triton).
        enable_fp_fusion=not rotary,
    )
    if num_splits > 1:
        _combine_kernel[(batch, heads_q)](
            part_acc, part_m, part_l, out, heads_q, out.stride(0), out.stride(1), out.stride(3),
            DV=dim_v, NUM_SPLITS=num_splits, BLOCK_SPLITS=_pow2(num_splits), BLOCK_DV=block_dv, PDL=pdl,
            num_warps=1 if block_dv <= 64 else 2, launch_pdl=pdl > 0,
        )


def write_cache(k, v, k_cache, v_cache, positions) -> None:
    """Scatter k/v [B, Hkv, S, D] into the caches at ``positions`` [B, S] (out-of-range slots skipped)."""
    batch, heads_kv, seq, dim = k.shape
    dim_v = v.shape[-1]
    grid = (batch * heads_kv, triton.cdiv(seq, WRITE_BLOCK_S))
    _write_cache_kernel[grid](
        k, v, k_cache, v_cache, positions, seq, k_cache.shape[2], heads_kv,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *positions.stride(),
        D=dim, DV=dim_v, BLOCK_S=WRITE_BLOCK_S, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v),
        num_warps=4,
    )


def _prefill(q, k_cache, v_cache, positions, out, scale, window):
    batch, heads_q, seq, dim = q.shape
    heads_kv, dim_v = k_cache.shape[1], v_cache.shape[-1]
    # The interpreter pays per block-op, not per element: big blocks are cheap there too, but
    # shrink M for short prompts so a 5-token test does not compute 64 rows.
    block_m = min(PREFILL_BLOCK_M, _pow2(seq, 16))
    grid = (triton.cdiv(seq, block_m), batch * heads_q)
    _prefill_kernel[grid](
        q, k_cache, v_cache, positions, out,
        scale * LOG2E, window if window > 0 else NO_WINDOW, k_cache.shape[2], seq, heads_q,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *positions.stride(), *out.stride(),
        GROUP=heads_q // heads_kv, D=dim, DV=dim_v,
        BLOCK_M=block_m, BLOCK_N=PREFILL_BLOCK_N, BLOCK_D=_pow2(dim, 16), BLOCK_DV=_pow2(dim_v, 16),
        DOT_PRECISION=_dot_precision(k_cache.dtype),
        num_warps=PREFILL_NUM_WARPS, num_stages=PREFILL_NUM_STAGES,
    )


def _rotary_in_decode(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether the decode kernel applies this rotary itself: one dtype for q, k, cos and sin (so the
    rotated values keep q's dtype), an even head dim, cos/sin [B or 1, 1, D]."""
    batch, _, seq, dim = q.shape
    return (seq == 1 and dim % 2 == 0 and k.dtype == q.dtype and cos.dtype == q.dtype and sin.dtype == q.dtype
            and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[1:] == (1, dim) and cos.shape[0] in (1, batch))


def _rotated(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, token_major_out: bool = False,
             cache: tuple | None = None) -> tuple[Tensor, Tensor]:
    """q and k rotated by their own kernel (the reference for what that kernel does not take); with
    ``token_major_out`` the kernel writes them token-major ([B, S, H, D] in memory); ``cache``
    (``rotary_triton``'s, only where the kernel takes q, k and it) also has k and v written into the caches."""
    if not rotary_supported(q, k, cos, sin):
        return rotary_reference(q, k, cos, sin)
    if not token_major_out:
        return rotary_triton(q, k, cos, sin, cache=cache)
    return rotary_triton(q, k, cos, sin, cache=cache,
                         q_out=empty_token_major(*q.shape, like=q, dtype=torch.promote_types(q.dtype, cos.dtype)),
                         k_out=empty_token_major(*k.shape, like=k, dtype=torch.promote_types(k.dtype, cos.dtype)))


def cached_attention_triton(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                            positions: Tensor, scale: float, window: int = 0,
                            cos: Tensor | None = None, sin: Tensor | None = None,
                            prefetch: Tensor | None = None, *, num_splits: int | None = None,
                            token_major_out: bool = False) -> Tensor:
    """Same contract as ``cached_attention_reference``, on Triton kernels (CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``). No host sync: safe to capture in a CUDA graph.

    With ``cos``/``sin``, decode rotates q and the new k inside its kernel; prompts (and
    arguments that kernel does not take) run the rotary kernel first.
    ``num_splits`` overrides the decode split count (tests; tuning); by default it follows
    ``decode_num_splits``. Decode prefetches ``prefetch`` (a weight) into L2 on Hopper GPUs
    (``triton_env.prefetch_plan``); prompts, compute-bound, ignore it. ``token_major_out``: the
    output [B, Hq, S, Dv] has [B, S, Hq, Dv] in memory (``prompt_attention``'s layout).
    """
    if triton is None:
        raise RuntimeError("cached_attention_triton: triton is not installed")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("cached_attention_triton: CPU tensors need TRITON_INTERPRET=1 set before fxopt "
                           "is imported")
    _check(q, k, v, k_cache, v_cache, positions)
    if cos is not None and not _rotary_in_decode(q, k, cos, sin):
        q, k = _rotated(q, k, cos, sin)
        cos = sin = None
    batch, heads_q, seq, _ = q.shape
    if token_major_out:
        out = empty_token_major(batch, heads_q, seq, v.shape[-1], like=q)
    else:
        out = torch.empty((batch, heads_q, seq, v.shape[-1]), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if seq == 1:
        _decode(q, k, v, k_cache, v_cache, positions, out, scale, window, num_splits, cos, sin, prefetch)
    else:
        write_cache(k, v, k_cache, v_cache, positions)  # same stream: done before _prefill reads
        _prefill(q, k_cache, v_cache, positions, out, scale, window)
    return out


# SDPA backends for prompts, best first (cuDNN is the fastest on Hopper; the others where it
# does not apply). set_priority makes the order a preference rather than a filter.
PROMPT_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]


def prompt_attention_cuda(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                          positions: Tensor, scale: float, window: int = 0,
                          cos: Tensor | None = None, sin: Tensor | None = None,
                          prefetch: Tensor | None = None) -> Tensor:
    """``prompt_attention`` on CUDA: q and k rotated (with cos/sin), k/v scattered into the caches --
    one kernel for both where the rotary kernel takes the caches -- then causal SDPA over q, k, v;
    the output token-major (``attention.token_major``).

    Sliding windows, fp32, mixed dtypes, q/v head dims that differ and single tokens take
    ``cached_attention_triton`` instead, which computes the same thing from the cache. ``prefetch``
    is ignored: a prompt is bound by its arithmetic, not by the weights' bytes.
    The rotary kernel writes q token-major, and SDPA's cuDNN and flash kernels write their output
    in q's layout: no copy (q is token-major anyway without a rotary: a linear's output transposed)."""
    _check(q, k, v, k_cache, v_cache, positions)
    dtype = torch.promote_types(q.dtype, cos.dtype) if cos is not None else q.dtype  # q's after the rotary
    k_dtype = torch.promote_types(k.dtype, cos.dtype) if cos is not None else k.dtype
    simple = (window <= 0 and q.shape[2] > 1 and dtype in (torch.float16, torch.bfloat16)
              and k_dtype == dtype and v.dtype == dtype and q.shape[-1] == v.shape[-1])
    if not simple:
        if cos is not None:
            q, k = _rotated(q, k, cos, sin, token_major_out=True)
        return cached_attention_triton(q, k, v, k_cache, v_cache, positions, scale, window, token_major_out=True)
    cache = (v, k_cache, v_cache, positions)
    # one kernel rotates q and k and writes k and v into the caches, where it takes them all
    fused = cos is not None and rotary_supported(q, k, cos, sin) and rotary_cache_supported(k, *cache)
    if cos is not None:
        q, k = _rotated(q, k, cos, sin, token_major_out=True, cache=cache if fused else None)
    if not fused:
        write_cache(k, v, k_cache, v_cache, positions)
    with sdpa_kernel(PROMPT_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    return token_major(out)


def register() -> bool:
    """Make the Triton launcher the CUDA implementation of ``torch.ops.fxopt.cached_attention``
    (and ``prompt_attention_cuda`` that of ``prompt_attention``). Idempotent (re-registering replaces the function). Returns False when triton is missing.
    Not called at import: ``fxopt.kernels.triton_ops.register_all`` does it on CUDA machines
    (unless FXOPT_NO_TRITON=1)."""
    if triton is None:
        return False
    cached_attention.register_kernel("cuda")(_cuda_impl)
    prompt_attention.register_kernel("cuda")(prompt_attention_cuda)
    return True


def _cuda_impl(q, k, v, k_cache, v_cache, positions, scale, window=0, cos=None, sin=None, prefetch=None):
    return cached_attention_triton(q, k, v, k_cache, v_cache, positions, scale, window, cos, sin, prefetch)


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.attention_triton
# --------------------------------------------------------------------------------------------- #

def benchmark(dtype: torch.dtype = torch.bfloat16, max_seq: int = 4096) -> None:
    """Decode attention, Triton vs the reference, for llama2-7b and llama-3.2-1b shapes.

    GB/s counts the bytes the op must touch: the pos cached k/v rows read and the new one written,
    plus q and the output. ``graph`` times replays of a CUDA graph (how fxopt runs decode: no launch
    overhead), ``eager`` includes the Python launch cost.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    torch.manual_seed(0)
    dev = torch.device("cuda")
    esize = torch.tensor([], dtype=dtype).element_size()
    print(f"{torch.cuda.get_device_name()}  dtype={dtype}  max_seq={max_seq}")
    print(f"{'model':10} {'B':>3} {'pos':>5} {'splits':>6} {'graph us':>9} {'GB/s':>7} {'eager us':>9} "
          f"{'ref us':>8} {'ref GB/s':>8}  max|err|")
    for name, heads_q, heads_kv, dim in (("llama2-7b", 32, 32, 128), ("llama-1b", 32, 8, 64)):
        for batch in (1, 8, 32):
            k_cache = torch.randn(batch, heads_kv, max_seq, dim, device=dev, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            # q/k/v as the model makes them: [B, S, H, D] linear outputs transposed to [B, H, S, D].
            q = torch.randn(batch, 1, heads_q, dim, device=dev, dtype=dtype).transpose(1, 2)
            k = torch.randn(batch, 1, heads_kv, dim, device=dev, dtype=dtype).transpose(1, 2)
            v = torch.randn(batch, 1, heads_kv, dim, device=dev, dtype=dtype).transpose(1, 2)
            scale = dim ** -0.5
            for pos in (256, 2048):
                positions = torch.full((batch, 1), pos, device=dev, dtype=torch.long)
                splits = decode_num_splits(batch, heads_kv, max_seq, dev)

                def run():
                    return cached_attention_triton(q, k, v, k_cache, v_cache, positions, scale)

                def ref():
                    return cached_attention_reference(q, k, v, k_cache, v_cache, positions, scale)

                err = (run().float() - ref().float()).abs().max().item()
                moved = (2 * batch * heads_kv * (pos + 1) * dim  # cache rows read (new one written)
                         + 2 * batch * heads_q * dim) * esize  # q in, out
                t_graph = do_bench_cudagraph(run) * 1e-3
                t_eager = do_bench(run) * 1e-3
                t_ref = do_bench(ref) * 1e-3
                print(f"{name:10} {batch:3} {pos:5} {splits:6} {t_graph * 1e6:9.1f} {moved / t_graph / 1e9:7.0f} "
                      f"{t_eager * 1e6:9.1f} {t_ref * 1e6:8.1f} {moved / t_ref / 1e9:8.0f}  {err:.2e}")

    # Prefill (secondary): one prompt from slot 0, causal FLOPs = 2 products * Hq * D * S^2 / 2 * 2.
    print(f"\nprefill  {'model':10} {'S':>5} {'triton us':>10} {'TFLOP/s':>8} {'ref us':>9} {'TFLOP/s':>8}  max|err|")
    for name, heads_q, heads_kv, dim in (("llama2-7b", 32, 32, 128), ("llama-1b", 32, 8, 64)):
        for seq in (512, 2048):
            k_cache = torch.zeros(1, heads_kv, max_seq, dim, device=dev, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            q = torch.randn(1, seq, heads_q, dim, device=dev, dtype=dtype).transpose(1, 2)
            k = torch.randn(1, seq, heads_kv, dim, device=dev, dtype=dtype).transpose(1, 2)
            v = torch.randn(1, seq, heads_kv, dim, device=dev, dtype=dtype).transpose(1, 2)
            positions = torch.arange(seq, device=dev)[None]
            scale = dim ** -0.5

            def run():
                return cached_attention_triton(q, k, v, k_cache, v_cache, positions, scale)

            def ref():
                return cached_attention_reference(q, k, v, k_cache, v_cache, positions, scale)

            err = (run().float() - ref().float()).abs().max().item()
            flops = 2 * heads_q * dim * seq * seq
            t, t_ref = do_bench(run) * 1e-3, do_bench(ref) * 1e-3
            print(f"prefill  {name:10} {seq:5} {t * 1e6:10.1f} {flops / t / 1e12:8.1f} {t_ref * 1e6:9.1f} "
                  f"{flops / t_ref / 1e12:8.1f}  {err:.2e}")


if __name__ == "__main__":
    benchmark()
