"""``fxopt.linear`` on the CPU: the reference's composition, with its matmul in oneDNN.

On the CPU every fxopt op runs its plain-PyTorch reference, and a decoded token is mostly the
matmuls of its linears: one row of activations against every weight, which streams the weights
from memory once. For fp32, ``F.linear`` hands that to MKL's GEMM; on an AMD EPYC (2 cores) it
reads a weight at 10-11 GB/s, where oneDNN's inner product -- the library ``F.linear`` already
uses for bf16 -- reads 22 GB/s on the same weight, in its usual row-major layout (no packed copy,
no extra memory). So ``fxopt.linear`` and ``fxopt.linear_add_`` get a CPU kernel: the same
prologue, epilogue and residual as ``linear_reference``, the matmul through
``torch.ops.mkldnn._linear_pointwise`` (what torch.compile's CPU backend calls) when the inputs
suit it -- fp32, a contiguous 2-D weight, no autograd -- and ``F.linear`` otherwise. The two
differ by rounding only (another order of the sums; tests/test_linear_cpu.py holds them to 2e-5).

    >>> linear_cpu(x, w)                  # == linear_reference(x, w) up to rounding
    >>> with enabled(False): ...          # the references again (benchmarks/cpu_decode.py's A/B)

``register()`` makes them the ops' CPU kernels (``fxopt.kernels`` calls it on import where oneDNN
is there) and lists them in ``KERNELS``, which ``fxopt.runtime.direct`` calls instead of the
references. ``enabled(False)`` gives the matmul back to ``F.linear``, for comparisons.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import linear, linear_add_, linear_add_reference, linear_reference


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a torch build without it
        return None


_LINEAR_POINTWISE = _onednn_op()
AVAILABLE = _LINEAR_POINTWISE is not None
_ON = True  # enabled(False) sets it off for a while
KERNELS: dict = {}  # op overload -> its CPU kernel, once registered (runtime/direct.py calls them)


def _suits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and x.numel() > 0
            and (bias is None or (bias.dtype == torch.float32 and bias.dim() == 1))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


def onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where it suits (see the module docstring)."""
    if _LINEAR_POINTWISE is None or not _ON or not _suits(x, weight, bias):
        return F.linear(x, weight, bias)
    y = _LINEAR_POINTWISE(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])


def linear_cpu(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
               prologue: str = "none", norm_weight: Tensor | None = None, eps: float = 0.0,
               epilogue: str = "none", prefetch: Tensor | None = None) -> Tensor:
    """``fxopt.linear``'s CPU kernel (``prefetch``, a CUDA hint, is ignored)."""
    return linear_reference(x, weight, bias, residual, prologue, norm_weight, eps, epilogue, matmul=onednn_matmul)


def linear_add_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, prologue: str = "none",
                   norm_weight: Tensor | None = None, eps: float = 0.0) -> None:
    """``fxopt.linear_add_``'s CPU kernel."""
    linear_add_reference(x, weight, bias, residual, prologue, norm_weight, eps, matmul=onednn_matmul)


def register() -> bool:
    """Make the functions above the ops' CPU kernels; False (nothing registered) without oneDNN."""
    if not AVAILABLE:
        return False
    for op, kernel in ((linear, linear_cpu), (linear_add_, linear_add_cpu)):
        op.register_kernel("cpu")(kernel)
        KERNELS[op._opoverload] = kernel
    return True


@contextmanager
def enabled(on: bool):
    """Inside, the matmul is oneDNN's (``on``, where it suits) or ``F.linear`` (the references')."""
    global _ON
    before, _ON = _ON, on
    try:
        yield
    finally:
        _ON = before
