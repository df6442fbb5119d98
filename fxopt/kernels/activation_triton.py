"""Triton implementations of ``fxopt::gated_act`` and ``fxopt::act`` (see ``activation.py``).

``gated_act``: ``gate_up [rows, 2I] = [gate | up]`` → ``act(gate) * up [rows, I]``. Grid
``(rows, cdiv(I, BLOCK))``: a program takes ``BLOCK`` columns of one row, loads the gate and the up
values of those columns (the two halves of the same row, ``I`` apart), and writes one output
block. gate_up is read once and half as many bytes are written: the whole cost of the op.

``act``: elementwise over the flattened tensor, ``BLOCK`` elements per program.

Activations, in fp32 whatever the storage dtype (as PyTorch's CUDA kernels compute them):

* ``silu``:      ``x / (1 + exp(-x))``
* ``gelu``:      ``0.5 x (1 + erf(x / √2))`` with ``tl.math.erf`` (present in triton 3.6 and 3.9;
                 a rational approximation, |error| < 1.5e-7, if a triton lacks it)
* ``gelu_tanh``: ``0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))``, written as ``x · sigmoid(2 u)``
                 (the same function, ``0.5 (1 + tanh u) = sigmoid(2 u)``): triton has no
                 ``tl.math.tanh`` (only libdevice's, which the interpreter lacks), and this form
                 saturates cleanly (exp overflow gives x or -0, never NaN)
* ``relu``:      ``x < 0 ? 0 : x`` (NaN stays NaN, as torch.relu)

Rounding follows the reference: ``act(gate)`` is rounded to the storage dtype before the product
with ``up``, as the two separate eager ops do.

The launchers allocate only their outputs and never sync with the host: CUDA-graph capturable.

CPU: under ``TRITON_INTERPRET=1`` (set before this module is imported) the launchers run on CPU
tensors, which is how the tests exercise them. The interpreter has no bf16: test there in fp32/fp16.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .activation import KINDS, act, act_reference, gated_act, gated_act_reference

from .triton_env import INTERPRET, jit as _jit, pdl_code, tl, triton

if triton is not None:
    from .triton_env import pdl_trigger, pdl_wait
# A global read inside a kernel must be a constexpr.
_HAS_ERF = tl.constexpr(triton is not None and hasattr(tl.math, "erf"))

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATED_BLOCK = 1024  # columns per program
ACT_BLOCK = 1024  # elements per program
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------- #
# The activations (fp32 in, fp32 out)
# --------------------------------------------------------------------------------------------- #

@_jit
def _erf(x):
    if _HAS_ERF:
        y = tl.math.erf(x)
    else:
        # Abramowitz & Stegun 7.1.26: erf(|x|) = 1 - poly(t) exp(-x²), t = 1 / (1 + p|x|).
        a = tl.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        y = 1.0 - poly * tl.exp(-a * a)
        y = tl.where(x < 0.0, -y, y)
    return y


@_jit
def _activation(x, KIND: tl.constexpr):
    if KIND == "silu":
        y = x / (1.0 + tl.exp(-x))
    elif KIND == "gelu":
        y = 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))
    elif KIND == "gelu_tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x / (1.0 + tl.exp(-2.0 * u))
    else:  # relu
        y = tl.where(x < 0.0, 0.0, x)
    return y


@_jit
def gated_pairs(y, KIND: tl.constexpr, DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A GEMV's gated epilogue: y (fp32 ``[BLOCK_M, BLOCK_N]``, its columns (gate, up) pairs) ->
    ``act(gate) * up`` (fp32 ``[BLOCK_M, BLOCK_N // 2]``), rounded as the unfused ops round: the
    linear's output to DT, ``act(gate)`` to DT; the caller rounds the product as it stores it."""
    y = y.to(DT).to(tl.float32)
    gate, up = tl.split(tl.reshape(y, [BLOCK_M, BLOCK_N // 2, 2]))
    return _activation(gate, KIND).to(DT).to(tl.float32) * up


# --------------------------------------------------------------------------------------------- #
# gated_act
# --------------------------------------------------------------------------------------------- #

@_jit
def _gated_act_kernel(GU, Y, I, stride_gu, stride_y, KIND: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = 0):
    """Columns [pid1 * BLOCK, +BLOCK) of one row: y = act(gate) * up, gate = GU[:I], up = GU[I:].
    PDL (triton_env): waits for the kernel that wrote GU, lets the next one launch once it has
    loaded (between two decode GEMVs, an INT8 model's gate/up and down projections)."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 for long prompts
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    pdl_wait(PDL)
    gate = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(GU + row * stride_gu + I + cols, mask=mask, other=0.0)
    pdl_trigger(PDL)
    # act(gate) rounded to the storage dtype before the product, as the reference's two ops.
    a = _activation(gate.to(tl.float32), KIND).to(gate.dtype).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (a * up.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def gated_act_triton(gate_up: Tensor, kind: str, *, out: Tensor | None = None) -> Tensor:
    """``gated_act_reference`` on the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1).
    ``out`` (contiguous, ``[..., I]``, gate_up's dtype) is written instead of a new tensor."""
    _check("gated_act_triton", gate_up, kind)
    if gate_up.shape[-1] % 2:
        raise ValueError("gated_act_triton: the last dim of gate_up must be even ([gate | up])")
    inner = gate_up.shape[-1] // 2
    out = _out(out, (*gate_up.shape[:-1], inner), gate_up.dtype, gate_up.device, "gated_act_triton")
    if out.numel() == 0:
        return out
    gu = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    gu = gu.reshape(-1, 2 * inner)  # a view when the leading dims merge (the usual [B, S, 2I])
    y = out.view(-1, inner)
    grid = (gu.shape[0], triton.cdiv(inner, GATED_BLOCK))
    pdl = pdl_code(gate_up.device)
    _gated_act_kernel[grid](gu, y, inner, gu.stride(0), y.stride(0), KIND=kind, BLOCK=GATED_BLOCK, PDL=pdl,
                            num_warps=NUM_WARPS, launch_pdl=pdl > 0)
    return out


# --------------------------------------------------------------------------------------------- #
# act
# --------------------------------------------------------------------------------------------- #

@_jit
def _act_kernel(X, Y, numel, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK elements of the flattened tensor."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0)
    tl.store(Y + offs, _activation(x.to(tl.float32), KIND).to(Y.dtype.element_ty), mask=mask)


def act_triton(x: Tensor, kind: str, *, out: Tensor | None = None) -> Tensor:
    """``act_reference`` on the Triton kernel. ``out`` (contiguous, x's shape and dtype) is written
    instead of a new tensor. A non-contiguous x is copied first."""
    _check("act_triton", x, kind)
    out = _out(out, x.shape, x.dtype, x.device, "act_triton")
    if out.numel() == 0:
        return out
    x = x.contiguous()
    _act_kernel[(triton.cdiv(x.numel(), ACT_BLOCK),)](x, out, x.numel(), KIND=kind, BLOCK=ACT_BLOCK,
                                                        num_warps=NUM_WARPS)
    return out


# --------------------------------------------------------------------------------------------- #
# Shared checks
# --------------------------------------------------------------------------------------------- #

def supported(x: Tensor, kind: str) -> bool:
    """Whether the kernels take these arguments (float16/bfloat16/float32, a known kind, at least
    one dim); the CUDA implementations fall back to the reference otherwise."""
    return kind in KINDS and x.dtype in DTYPES and x.dim() > 0


def _check(name: str, x: Tensor, kind: str) -> None:
    if triton is None:
        raise RuntimeError(f"{name}: triton is not installed")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name}: CPU tensors need TRITON_INTERPRET=1 set before fxopt is imported")
    if kind not in KINDS:
        raise ValueError(f"unknown activation '{kind}'; known: {', '.join(KINDS)}")
    if not supported(x, kind):
        raise ValueError(f"{name}: unsupported arguments (see supported()); use the reference")


def _out(out: Tensor | None, shape, dtype, device, name: str) -> Tensor:
    shape = torch.Size(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"{name}: out must be a contiguous {dtype} tensor of shape {tuple(shape)}")
    return out


# --------------------------------------------------------------------------------------------- #
# Registration as the CUDA implementations of the custom ops
# --------------------------------------------------------------------------------------------- #

def _gated_act_cuda(gate_up, kind):
    if supported(gate_up, kind) and gate_up.shape[-1] % 2 == 0:
        return gated_act_triton(gate_up, kind)
    return gated_act_reference(gate_up, kind)


def _act_cuda(x, kind):
    if supported(x, kind):
        return act_triton(x, kind)
    return act_reference(x, kind)


def register() -> bool:
    """Make the Triton launchers the CUDA implementations of ``torch.ops.fxopt.gated_act`` and
    ``torch.ops.fxopt.act``. Idempotent. Returns False when triton is missing."""
    if triton is None:
        return False
    gated_act.register_kernel("cuda")(_gated_act_cuda)
    act.register_kernel("cuda")(_act_cuda)
    return True


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.activation_triton
# --------------------------------------------------------------------------------------------- #

def benchmark(dtype: torch.dtype = torch.bfloat16, inner: int = 11008) -> None:
    """gated_act (SwiGLU, GeGLU) at llama-7b's MLP width, Triton vs the reference. GB/s counts
    gate_up read once and the output written once."""
    from triton.testing import do_bench, do_bench_cudagraph

    torch.manual_seed(0)
    dev = torch.device("cuda")
    es = torch.tensor([], dtype=dtype).element_size()
    print(f"{torch.cuda.get_device_name()}  dtype={dtype}  I={inner}")
    print(f"{'op':16} {'rows':>5} {'graph us':>9} {'GB/s':>7} {'eager us':>9} {'ref graph us':>12} "
          f"{'ref GB/s':>8}  max|err|")
    for rows in (1, 8, 32, 2048):
        gate_up = torch.randn(rows, 2 * inner, device=dev, dtype=dtype)
        for name, kind in (("gated_act silu", "silu"), ("gated_act gelu", "gelu")):
            def run():
                return gated_act_triton(gate_up, kind)

            def ref():
                return gated_act_reference(gate_up, kind)

            err = (run().float() - ref().float()).abs().max().item()
            moved = 3 * rows * inner * es
            t_graph = do_bench_cudagraph(run) * 1e-3
            t_eager = do_bench(run) * 1e-3
            t_ref = do_bench_cudagraph(ref) * 1e-3
            print(f"{name:16} {rows:5} {t_graph * 1e6:9.1f} {moved / t_graph / 1e9:7.0f} {t_eager * 1e6:9.1f} "
                  f"{t_ref * 1e6:12.1f} {moved / t_ref / 1e9:8.0f}  {err:.2e}")


if __name__ == "__main__":
    benchmark()
