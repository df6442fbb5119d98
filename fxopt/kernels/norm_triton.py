"""Triton implementations of ``fxopt::rms_norm``, ``add_rms_norm``, ``layer_norm`` and ``add_layer_norm``
(see ``norm.py`` for the semantics).

One program per row. A row of ``N`` hidden values (``N`` up to 8192, any size: 48, 576, 4096 ...) is
loaded whole into registers as a block of ``BLOCK = next_power_of_2(N)`` lanes, the lanes past ``N``
masked off (loaded as 0, never stored), reduced in fp32 and written back in one pass: every byte of
the input is read once and every byte of the output written once, which is all a memory-bound norm
can do. The ``add_*`` variants also read the residual, store ``h = x + residual`` (the next layer's
residual stream) and normalise ``h`` from registers, so the sum never makes a round trip to memory.

Numerics follow the references exactly, rounding where they round:

* RMSNorm is transformers' ``LlamaRMSNorm``: ``h.float() * rsqrt(mean(h²) + eps)``, cast to the
  input dtype, *then* multiplied by the weight in ``promote(weight, x)`` (the output dtype, fp32 for
  an fp32 weight over bf16 activations).
* LayerNorm is ``F.layer_norm``: mean and biased variance in fp32, ``(h - mean) * rstd * w + b`` in
  fp32, one rounding to the input dtype at the end.
* ``h = x + residual`` is computed in fp32 and rounded to ``promote(x, residual)``, as PyTorch's add
  does, and the norm then starts from the rounded ``h``, as the reference does.

Inputs are viewed as ``[rows, N]`` with a row stride, so any tensor whose last dim is contiguous and
whose leading dims merge into one stride (slices, the usual activations) is read in place; anything
else is copied by ``.contiguous()``/``reshape`` first. Outputs are contiguous.

Launch cost: the launchers allocate only their outputs, never sync with the host and pick the
grid from shapes alone, so they can be captured in a CUDA graph (fxopt's decode path).

CPU: under ``TRITON_INTERPRET=1`` (set before this module is imported) the launchers run on CPU
tensors, which is how the tests exercise them. The interpreter has no bf16: test there in fp32/fp16.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .norm import (add_layer_norm, add_rms_norm, layer_norm, layer_norm_reference, rms_norm,
                   rms_norm_reference)

from .triton_env import INTERPRET, jit as _jit, pdl_code, tl, triton

if triton is not None:
    from .triton_env import pdl_trigger, pdl_wait

# A row lives in registers: past this many lanes it would spill. Wider rows take the reference.
MAX_BLOCK = 16384
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------- #
# RMSNorm (with the optional residual add)
# --------------------------------------------------------------------------------------------- #

@_jit
def _rms_norm_kernel(
    X, R, W, Y, H,
    stride_x, stride_r, stride_y, stride_h,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0,
):
    """One row: y = w * (h * rsqrt(mean(h²) + eps)).to(h.dtype), h = x (+ residual, stored to H).
    PDL (triton_env): waits for the kernel that wrote X and R, lets the next one launch once it
    has loaded them."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 for long prompts
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    pdl_wait(PDL)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to h's dtype first: it is what the reference stores and then normalises.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    pdl_trigger(PDL)
    xf = x.to(tl.float32)
    # Masked lanes hold 0, so they add nothing to the sum of squares; divide by the true N.
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    # LlamaRMSNorm casts back to the input dtype *before* the weight: keep that rounding.
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- #
# LayerNorm (with the optional residual add; weight and bias optional)
# --------------------------------------------------------------------------------------------- #

@_jit
def _layer_norm_kernel(
    X, R, W, B, Y, H,
    stride_x, stride_r, stride_y, stride_h,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row: y = (h - mean) * rsqrt(var + eps) * w + b in fp32, h = x (+ residual, stored to H)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / N
    # Two passes over registers (no Welford needed: the row is all here). Re-mask the centred
    # values, or the padding lanes would each add mean² to the variance.
    centred = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N  # biased, as F.layer_norm
    y = centred * tl.math.rsqrt(var + eps)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------------------------- #

def _num_warps(block: int) -> int:
    # About 512 lanes per warp, 1 to 8 warps: on H200 4, 8 and 16 warps are within 2% of one
    # another for hidden 4096 at 1 to 2048 rows, 8 a hair ahead.
    return min(max(block // 512, 1), 8)


def _rows(t: Tensor, n: int) -> Tensor:
    """t as [rows, n] with a unit column stride: a view when the leading dims merge, else a copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n)


def _out(out: Tensor | None, shape, dtype, device, name: str) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {tuple(shape)}, got "
                         f"{out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    return out


def supported(x: Tensor, residual: Tensor | None, *params: Tensor | None) -> bool:
    """Whether the kernels take these arguments; the CUDA implementations fall back to the
    reference otherwise (rows wider than MAX_BLOCK, fp64, broadcasting x + residual, odd weights)."""
    if x.dim() == 0 or x.dtype not in DTYPES or x.shape[-1] > MAX_BLOCK:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype not in DTYPES):
        return False
    return all(p is None or (p.shape == x.shape[-1:] and p.dtype in DTYPES) for p in params)


def _check(name, x, residual, *params):
    if triton is None:
        raise RuntimeError(f"{name}: triton is not installed")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name}: CPU tensors need TRITON_INTERPRET=1 set before fxopt is imported")
    if not supported(x, residual, *params):
        raise ValueError(f"{name}: unsupported arguments (see supported()); use the reference")


def _launch_rms(x, residual, weight, eps, out, residual_out):
    if x.numel() == 0:
        return
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    rows = x2.shape[0]
    h2 = residual_out.view(rows, n) if residual_out is not None else x2  # never touched without residual
    y2 = out.view(rows, n)
    block = triton.next_power_of_2(n)
    pdl = pdl_code(x.device)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight.contiguous(), y2, h2,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl, num_warps=_num_warps(block), launch_pdl=pdl > 0,
    )


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, *, out: Tensor | None = None) -> Tensor:
    """``rms_norm_reference`` on the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1).
    ``out`` (contiguous, ``x.shape``, ``promote(weight, x)``) is written instead of a new tensor."""
    _check("rms_norm_triton", x, None, weight)
    out = _out(out, x.shape, torch.promote_types(weight.dtype, x.dtype), x.device, "rms_norm_triton")
    _launch_rms(x, None, weight, eps, out, None)
    return out


def add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float, *,
                        out: Tensor | None = None, residual_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass over the row."""
    _check("add_rms_norm_triton", x, residual, weight)
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    residual_out = _out(residual_out, x.shape, h_dtype, x.device, "add_rms_norm_triton")
    out = _out(out, x.shape, torch.promote_types(weight.dtype, h_dtype), x.device, "add_rms_norm_triton")
    _launch_rms(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def _launch_layer(x, residual, weight, bias, eps, out, residual_out):
    if x.numel() == 0:
        return
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    rows = x2.shape[0]
    h2 = residual_out.view(rows, n) if residual_out is not None else x2
    y2 = out.view(rows, n)
    block = triton.next_power_of_2(n)
    _layer_norm_kernel[(rows,)](
        # A missing weight/bias gets some pointer (x): the constexpr flag keeps it from being read.
        x2, r2, weight.contiguous() if weight is not None else x2, bias.contiguous() if bias is not None else x2,
        y2, h2,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK=block, num_warps=_num_warps(block),
    )


def layer_norm_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
                      out: Tensor | None = None) -> Tensor:
    """``F.layer_norm`` over the last dim on the Triton kernel; output in x's dtype."""
    _check("layer_norm_triton", x, None, weight, bias)
    out = _out(out, x.shape, x.dtype, x.device, "layer_norm_triton")
    _launch_layer(x, None, weight, bias, eps, out, None)
    return out


def add_layer_norm_triton(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
                          out: Tensor | None = None, residual_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(layer_norm(x + residual), x + residual)`` in one pass over the row."""
    _check("add_layer_norm_triton", x, residual, weight, bias)
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    residual_out = _out(residual_out, x.shape, h_dtype, x.device, "add_layer_norm_triton")
    out = _out(out, x.shape, h_dtype, x.device, "add_layer_norm_triton")
    _launch_layer(x, residual, weight, bias, eps, out, residual_out)
    return out, residual_out


# --------------------------------------------------------------------------------------------- #
# Registration as the CUDA implementations of the custom ops
# --------------------------------------------------------------------------------------------- #

def _rms_norm_cuda(x, weight, eps):
    if supported(x, None, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def _add_rms_norm_cuda(x, residual, weight, eps):
    if supported(x, residual, weight):
        return add_rms_norm_triton(x, residual, weight, eps)
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


def _layer_norm_cuda(x, weight, bias, eps):
    if supported(x, None, weight, bias):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def _add_layer_norm_cuda(x, residual, weight, bias, eps):
    if supported(x, residual, weight, bias):
        return add_layer_norm_triton(x, residual, weight, bias, eps)
    h = x + residual
    return layer_norm_reference(h, weight, bias, eps), h


def register() -> bool:
    """Make the Triton launchers the CUDA implementations of ``torch.ops.fxopt.{rms_norm,
    add_rms_norm, layer_norm, add_layer_norm}``. Idempotent (re-registering replaces the
    function). Returns False when triton is missing."""
    if triton is None:
        return False
    rms_norm.register_kernel("cuda")(_rms_norm_cuda)
    add_rms_norm.register_kernel("cuda")(_add_rms_norm_cuda)
    layer_norm.register_kernel("cuda")(_layer_norm_cuda)
    add_layer_norm.register_kernel("cuda")(_add_layer_norm_cuda)
    return True


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.norm_triton
# --------------------------------------------------------------------------------------------- #

def benchmark(dtype: torch.dtype = torch.bfloat16, hidden: int = 4096) -> None:
    """Triton vs the reference at llama-7b shapes. GB/s counts the bytes the op must move (inputs
    read once, outputs written once, the weight once). ``graph`` times CUDA-graph replays (how fxopt
    runs decode: no launch overhead), ``eager`` includes the Python launch cost; the reference is
    timed in a CUDA graph too, so the comparison is of the kernels, not of launch counts."""
    from triton.testing import do_bench, do_bench_cudagraph

    torch.manual_seed(0)
    dev = torch.device("cuda")
    es = torch.tensor([], dtype=dtype).element_size()
    w = torch.randn(hidden, device=dev, dtype=dtype)
    b = torch.randn(hidden, device=dev, dtype=dtype)
    eps = 1e-6
    print(f"{torch.cuda.get_device_name()}  dtype={dtype}  hidden={hidden}")
    print(f"{'op':15} {'rows':>5} {'graph us':>9} {'GB/s':>7} {'eager us':>9} {'ref graph us':>12} "
          f"{'ref GB/s':>8}  max|err|")
    for rows in (1, 8, 32, 2048):
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        r = torch.randn(rows, hidden, device=dev, dtype=dtype)
        cases = {
            "rms_norm": (lambda: rms_norm_triton(x, w, eps), lambda: rms_norm_reference(x, w, eps), 2),
            "add_rms_norm": (lambda: add_rms_norm_triton(x, r, w, eps),
                             lambda: (rms_norm_reference(x + r, w, eps), None), 4),
            "layer_norm": (lambda: layer_norm_triton(x, w, b, eps), lambda: layer_norm_reference(x, w, b, eps), 2),
            "add_layer_norm": (lambda: add_layer_norm_triton(x, r, w, b, eps),
                               lambda: (layer_norm_reference(x + r, w, b, eps), None), 4),
        }
        for name, (run, ref, tensors) in cases.items():
            got, want = run(), ref()
            if isinstance(got, tuple):
                got, want = got[0], want[0]
            err = (got.float() - want.float()).abs().max().item()
            moved = (tensors * rows + 2) * hidden * es  # rows in/out, plus weight and bias
            t_graph = do_bench_cudagraph(run) * 1e-3
            t_eager = do_bench(run) * 1e-3
            t_ref = do_bench_cudagraph(ref) * 1e-3
            print(f"{name:15} {rows:5} {t_graph * 1e6:9.1f} {moved / t_graph / 1e9:7.0f} {t_eager * 1e6:9.1f} "
                  f"{t_ref * 1e6:12.1f} {moved / t_ref / 1e9:8.0f}  {err:.2e}")


if __name__ == "__main__":
    benchmark()
