"""Triton implementation of ``fxopt::rotary`` (see ``rotary.py`` for the semantics).

One kernel rotates q and k. Grid ``(B * S, n_q_blocks + n_k_blocks)``: a program owns one token
``(b, s)`` and a block of ``BLOCK_H`` heads, either of q (the first ``cdiv(Hq, BLOCK_H)`` programs
of the second axis) or of k (the rest). It loads the token's cos/sin row once and applies it to all
its heads, a ``[BLOCK_H, D/2]`` tile per half of the head dim::

    out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2]        x1 = x[:D/2], x2 = x[D/2:]
    out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]        (rotate_half(x) = cat(-x2, x1))

The head dim is padded to a power of two (masked), so D = 48, 80, 96 work as well as 64 or 128.
``BLOCK_H`` follows the token count (shapes only, so CUDA-graph capturable): decode (a token or a
few) spreads the heads over many small programs so that more SMs share the few bytes; prefill
gives each program a few heads so that cos/sin are read once for several.

q/k may have any strides: they are transposes of linear outputs ([B, S, H, D] viewed as
[B, H, S, D]), read in place. cos/sin [B, S, D] may have any strides too, a batch of 1 broadcast
over B with stride 0. Outputs are new contiguous [B, H, S, D] tensors, or given ones of any strides
with the head dim's 1 (``prompt_attention`` passes token-major ones: [B, S, H, D] in memory).

Numerics follow the reference, which rounds after each product and after the sum (eager PyTorch
on bf16 does): products and sums are in fp32, each rounded to the output dtype
``promote(x, cos)`` where the reference rounds, and the kernel is compiled without FMA
contraction so that those roundings survive: the result is bit-identical to the reference's.

CPU: under ``TRITON_INTERPRET=1`` (set before this module is imported) the launcher runs on CPU
tensors, which is how the tests exercise it. The interpreter has no bf16: test there in fp32/fp16.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .rotary import rotary, rotary_reference

from .triton_env import INTERPRET, jit as _jit, tl, triton

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tokens below which a program takes a single head (decode), and the lanes a prefill program aims for.
FEW_TOKENS = 64
PREFILL_LANES = 1024


# --------------------------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------------------------- #

@_jit
def _rotate_heads(
    X, OUT, b, s, h0, H,
    sx_b, sx_h, sx_s, sx_d, so_b, so_h, so_s,
    c1, c2, s1, s2,
    CACHE, slot, in_cache, sc_b, sc_h, sc_s,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, TO_CACHE: tl.constexpr,
):
    """Heads h0 .. h0 + BLOCK_H - 1 (those < H) of token (b, s) of X, rotated into OUT [B, H, S, D]
    (strides so_*, the head dim's 1); with TO_CACHE also into CACHE at slot ``slot`` of row b (if
    ``in_cache``, 0 or 1), rounded from OUT's dtype to the cache's."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < H)[:, None] & (offs_d < HALF)[None, :]
    x_ptr = X + b * sx_b + s * sx_s + offs_h[:, None] * sx_h + offs_d[None, :] * sx_d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
    dt = OUT.dtype.element_ty
    # Round each product and the sum to the output dtype, as the reference's separate ops do (no-ops
    # in fp32). The sine term of the first half is (-x2) * sin: negation is exact, so -(x2 * sin).
    o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) - (x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    o_ptr = OUT + b * so_b + s * so_s + offs_h[:, None] * so_h + offs_d[None, :]
    tl.store(o_ptr, o1, mask=mask)
    tl.store(o_ptr + HALF, o2, mask=mask)
    if TO_CACHE:
        _store_slot(CACHE, b, slot, in_cache, offs_h, offs_d, H, sc_b, sc_h, sc_s, o1, o2, HALF)


@_jit
def _store_slot(CACHE, b, slot, in_cache, offs_h, offs_d, H, sc_b, sc_h, sc_s, x1, x2, HALF: tl.constexpr):
    """Both halves of heads ``offs_h`` into slot ``slot`` of row b of CACHE [B, H, max_seq, D] (the
    head dim's stride 1), in its dtype; nothing where ``in_cache`` is 0 (a slot outside the cache).
    (The bound is folded into the head mask: the interpreter turns ``vector & scalar`` into ints,
    which tl.store rejects.)"""
    mask = (offs_h < H * in_cache)[:, None] & (offs_d < HALF)[None, :]
    ptr = CACHE + b * sc_b + slot * sc_s + offs_h[:, None] * sc_h + offs_d[None, :]
    dt = CACHE.dtype.element_ty
    tl.store(ptr, x1.to(dt), mask=mask)
    tl.store(ptr + HALF, x2.to(dt), mask=mask)


@_jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO, V, KC, VC, POS,
    S, HQ, HKV, max_seq,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d,
    sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
    sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
    sv_b, sv_h, sv_s, sv_d, skc_b, skc_h, skc_s, svc_b, svc_h, svc_s, sp_b, sp_s,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, CACHE: tl.constexpr,
):
    """One token (b, s), one block of BLOCK_H heads of q or of k -- or, with CACHE, of v: then the
    rotated k and v also go to KC and VC at slot POS[b, s] (skipped outside [0, max_seq))."""
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)  # int64: b * batch stride can pass 2**31 for long prompts
    s = (tok % S).to(tl.int64)
    blk = tl.program_id(1)

    # cos/sin of this token, both halves (they need not repeat: read all D), once for all the heads.
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    c_ptr = COS + b * sc_b + s * sc_s + offs_d * sc_d
    s_ptr = SIN + b * ss_b + s * ss_s + offs_d * ss_d
    c1 = tl.load(c_ptr, mask=mask_d, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF * sc_d, mask=mask_d, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=mask_d, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + HALF * ss_d, mask=mask_d, other=0.0).to(tl.float32)
    slot = 0
    in_cache = 0
    if CACHE:
        slot = tl.load(POS + b * sp_b + s * sp_s).to(tl.int64)
        in_cache = ((slot >= 0) & (slot < max_seq)).to(tl.int32)

    n_q_blocks = tl.cdiv(HQ, BLOCK_H)
    n_k_blocks = tl.cdiv(HKV, BLOCK_H)
    if blk < n_q_blocks:
        _rotate_heads(Q, QO, b, s, blk * BLOCK_H, HQ, sq_b, sq_h, sq_s, sq_d, sqo_b, sqo_h, sqo_s,
                      c1, c2, s1, s2, KC, slot, in_cache, skc_b, skc_h, skc_s, HALF, BLOCK_H, BLOCK_HALF, False)
    elif blk < n_q_blocks + n_k_blocks:
        _rotate_heads(K, KO, b, s, (blk - n_q_blocks) * BLOCK_H, HKV, sk_b, sk_h, sk_s, sk_d,
                      sko_b, sko_h, sko_s, c1, c2, s1, s2, KC, slot, in_cache, skc_b, skc_h, skc_s,
                      HALF, BLOCK_H, BLOCK_HALF, CACHE)
    else:  # CACHE only: v to its cache as it is
        offs_h = (blk - n_q_blocks - n_k_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (offs_h < HKV)[:, None] & mask_d[None, :]
        v_ptr = V + b * sv_b + s * sv_s + offs_h[:, None] * sv_h + offs_d[None, :] * sv_d
        _store_slot(VC, b, slot, in_cache, offs_h, offs_d, HKV, svc_b, svc_h, svc_s,
                    tl.load(v_ptr, mask=mask, other=0.0), tl.load(v_ptr + HALF * sv_d, mask=mask, other=0.0), HALF)


# --------------------------------------------------------------------------------------------- #
# Launcher
# --------------------------------------------------------------------------------------------- #

def _block_h(tokens: int, heads: int, block_half: int) -> int:
    if tokens < FEW_TOKENS:
        return 1  # decode: one head per program, as many programs as heads
    return min(triton.next_power_of_2(heads), max(1, PREFILL_LANES // block_half))


def supported(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether the kernel takes these arguments; the CUDA implementation falls back to the reference
    otherwise (odd head dim, fp64, cos/sin of another shape or dtypes that differ)."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or sin.dtype != cos.dtype:
        return False
    if any(t.dtype not in DTYPES for t in (q, k, cos)):
        return False
    batch, _, seq, dim = q.shape
    if dim % 2 or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        return False
    return cos.shape[1:] == (seq, dim) and cos.shape[0] in (1, batch)


def _out(out: Tensor | None, shape, dtype, device, name: str) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"rotary_triton: {name} must be a {dtype} tensor of shape {tuple(shape)} on {device} "
                         f"with the last dim's stride 1")
    return out


def rotary_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
                  q_out: Tensor | None = None, k_out: Tensor | None = None,
                  cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``rotary_reference`` on the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1).
    ``q_out``/``k_out`` (q/k's shape and device, ``promote(x, cos)``, any strides with the last dim's 1;
    distinct memory from q/k) are written instead of new tensors. ``cache = (v, k_cache, v_cache,
    positions)``: in the same launch, the rotated k and v [B, Hkv, S, D] also go into the caches
    [>= B, Hkv, max_seq, D] at slots ``positions`` [B, S] (what ``attention_triton.write_cache`` does
    after the rotary, a read of k and a launch less; see ``cache_supported``). No host sync: safe to
    capture in a CUDA graph."""
    if triton is None:
        raise RuntimeError("rotary_triton: triton is not installed")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("rotary_triton: CPU tensors need TRITON_INTERPRET=1 set before fxopt is imported")
    if not supported(q, k, cos, sin):
        raise ValueError("rotary_triton: unsupported arguments (see supported()); use the reference")
    if cache is not None and not cache_supported(k, *cache):
        raise ValueError("rotary_triton: the caches do not fit k (see cache_supported())")
    batch, heads_q, seq, dim = q.shape
    heads_kv = k.shape[1]
    q_out = _out(q_out, q.shape, torch.promote_types(q.dtype, cos.dtype), q.device, "q_out")
    k_out = _out(k_out, k.shape, torch.promote_types(k.dtype, cos.dtype), k.device, "k_out")
    tokens = batch * seq
    if tokens == 0 or dim == 0:
        return q_out, k_out
    cos, sin = cos.expand(batch, seq, dim), sin.expand(batch, seq, dim)  # a batch of 1: stride 0, no copy
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = _block_h(tokens, max(heads_q, heads_kv), block_half)
    kv_blocks = triton.cdiv(heads_kv, block_h)
    grid = (tokens, triton.cdiv(heads_q, block_h) + kv_blocks * (2 if cache is not None else 1))
    v, k_cache, v_cache, positions = cache if cache is not None else (k, k_out, k_out, q_out)  # unread
    _rotary_kernel[grid](
        q, k, cos, sin, q_out, k_out, v, k_cache, v_cache, positions,
        seq, heads_q, heads_kv, k_cache.shape[2],
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(), *q_out.stride()[:3], *k_out.stride()[:3],
        *v.stride(), *k_cache.stride()[:3], *v_cache.stride()[:3], *positions.stride()[:2],
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, CACHE=cache is not None,
        num_warps=min(max(block_h * block_half // 256, 1), 8),
        # No FMA contraction: it would fuse a product into the sum and skip the product's rounding
        # (LLVM narrows the fp32 ops between bf16/fp16 casts to native bf16x2/f16x2 ones, then
        # contracts mul + sub into fma): 1-ulp differences from the reference in a quarter of the
        # elements, measured on H200. Costs nothing in a memory-bound kernel.
        enable_fp_fusion=False,
    )
    return q_out, k_out


def cache_supported(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor) -> bool:
    """Whether ``rotary_triton(..., cache=(v, k_cache, v_cache, positions))`` takes these: v of k's
    shape, caches [>= B, Hkv, max_seq, D] on k's device with the head dim's stride 1 (any dtype: the
    values are rounded to it), positions [B, S] of integers."""
    batch, heads_kv, seq, dim = k.shape
    return (v.shape == k.shape and v.dtype in DTYPES and positions.shape == (batch, seq)
            and not positions.is_floating_point() and positions.device == k.device
            and all(c.dim() == 4 and c.shape[0] >= batch and c.shape[1] == heads_kv and c.shape[3] == dim
                    and c.stride(-1) == 1 and c.device == k.device and c.dtype in DTYPES for c in (k_cache, v_cache)))


# --------------------------------------------------------------------------------------------- #
# Registration as the CUDA implementation of the custom op
# --------------------------------------------------------------------------------------------- #

def _rotary_cuda(q, k, cos, sin):
    if supported(q, k, cos, sin):
        return rotary_triton(q, k, cos, sin)
    return rotary_reference(q, k, cos, sin)


def register() -> bool:
    """Make the Triton launcher the CUDA implementation of ``torch.ops.fxopt.rotary``. Idempotent
    (re-registering replaces the function). Returns False when triton is missing."""
    if triton is None:
        return False
    rotary.register_kernel("cuda")(_rotary_cuda)
    return True


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.rotary_triton
# --------------------------------------------------------------------------------------------- #

def benchmark(dtype: torch.dtype = torch.bfloat16) -> None:
    """Triton vs the reference at llama-7b shapes (32 q and 32 kv heads of 128) and a GQA one.
    q/k are made as the model makes them: [B, S, H, D] linear outputs transposed. GB/s counts q/k
    read and written once plus cos/sin read once."""
    from triton.testing import do_bench, do_bench_cudagraph

    torch.manual_seed(0)
    dev = torch.device("cuda")
    es = torch.tensor([], dtype=dtype).element_size()
    print(f"{torch.cuda.get_device_name()}  dtype={dtype}")
    print(f"{'heads q/kv':10} {'B':>3} {'S':>5} {'graph us':>9} {'GB/s':>7} {'eager us':>9} {'ref graph us':>12} "
          f"{'ref GB/s':>8}  max|err|")
    for heads_q, heads_kv, dim in ((32, 32, 128), (32, 8, 128)):
        for batch, seq in ((1, 1), (8, 1), (1, 2048)):
            q = torch.randn(batch, seq, heads_q, dim, device=dev, dtype=dtype).transpose(1, 2)
            k = torch.randn(batch, seq, heads_kv, dim, device=dev, dtype=dtype).transpose(1, 2)
            cos = torch.randn(batch, seq, dim, device=dev, dtype=dtype)
            sin = torch.randn(batch, seq, dim, device=dev, dtype=dtype)

            def run():
                return rotary_triton(q, k, cos, sin)

            def ref():
                return rotary_reference(q, k, cos, sin)

            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(run(), ref()))
            moved = (2 * batch * seq * (heads_q + heads_kv) * dim + 2 * batch * seq * dim) * es
            t_graph = do_bench_cudagraph(run) * 1e-3
            t_eager = do_bench(run) * 1e-3
            t_ref = do_bench_cudagraph(ref) * 1e-3
            print(f"{heads_q:4}/{heads_kv:<5} {batch:3} {seq:5} {t_graph * 1e6:9.1f} {moved / t_graph / 1e9:7.0f} "
                  f"{t_eager * 1e6:9.1f} {t_ref * 1e6:12.1f} {moved / t_ref / 1e9:8.0f}  {err:.2e}")


if __name__ == "__main__":
    benchmark()
