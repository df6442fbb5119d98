"""Weight-only quantized linear: INT8 (and 4-bit) weights, one scale per output channel per group.

    qweight, scales = quantize_weight(w, group_size=128, bits=8)
    y = quant_linear(x, qweight, scales, bias, group_size, bits)     # ≈ F.linear(x, w, bias)

Layout:
- ``bits=8``: ``qweight`` int8 [out, in], symmetric, values in [-127, 127];
- ``bits=4``: ``qweight`` uint8 [out, ceil(in / 2)], two values a byte (the even input feature in
  the low nibble), each stored as ``q + 8`` with ``q`` in [-7, 7];
- ``scales`` [out, n_groups] in the activation dtype, ``n_groups = ceil(in / group_size)``: the
  last group is shorter when ``group_size`` does not divide ``in`` (SmolLM2's 576 = 4.5 × 128);
  ``group_size = in`` is one scale per row.

The reference dequantizes and calls ``F.linear`` (the ground truth, runs anywhere); Triton kernels
with the dequantization fused in register themselves for CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import apply_epilogue, apply_prologue, check_epilogue, check_prologue, empty_output

QMAX = {8: 127, 4: 7}


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def quantize_weight(w: Tensor, group_size: int, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-(row, group) quantization of a [out, in] weight → (qweight, scales)."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    out_features, in_features = w.shape
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    groups = n_groups(in_features, group_size)
    padded = F.pad(w.float(), (0, groups * group_size - in_features))  # zeros never raise a max
    grouped = padded.reshape(out_features, groups, group_size)
    scales = grouped.abs().amax(dim=-1).clamp_min(1e-8) / QMAX[bits]
    q = torch.round(grouped / scales[..., None]).clamp_(-QMAX[bits], QMAX[bits])
    q = q.reshape(out_features, -1)[:, :in_features].to(torch.int8)
    return (q if bits == 8 else pack_int4(q)), scales.to(w.dtype)


def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-7, 7], [out, in] → uint8 [out, ceil(in/2)], even feature in the low nibble."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def dequantize_weight(qweight: Tensor, scales: Tensor, group_size: int, bits: int, in_features: int,
                      dtype: torch.dtype) -> Tensor:
    q = qweight if bits == 8 else unpack_int4(qweight, in_features)
    expanded = scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    return (q.float() * expanded).to(dtype)


def quant_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int,
                           bits: int, in_features: int, residual: Tensor | None = None, prologue: str = "none",
                           norm_weight: Tensor | None = None, eps: float = 0.0, epilogue: str = "none") -> Tensor:
    """``F.linear`` with the dequantized weight; ``residual`` / ``prologue`` / ``norm_weight`` /
    ``eps`` / ``epilogue`` fold the norm or gated activation before it, the gated activation or the
    residual add after it, exactly as ``fxopt.linear`` does (``fold_linear`` writes them)."""
    check_prologue(prologue, norm_weight)
    check_epilogue(epilogue, qweight.shape[0], residual)
    x = apply_prologue(x, prologue, norm_weight, eps)
    w = dequantize_weight(qweight, scales, group_size, bits, in_features, x.dtype)
    y = apply_epilogue(F.linear(x, w, None if bias is None else bias.to(x.dtype)), epilogue)
    return y if residual is None else y + residual


@torch.library.custom_op("fxopt::quant_linear", mutates_args=())
def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int, bits: int,
                 in_features: int, residual: Tensor | None = None, prologue: str = "none",
                 norm_weight: Tensor | None = None, eps: float = 0.0, epilogue: str = "none") -> Tensor:
    return quant_linear_reference(x, qweight, scales, bias, group_size, bits, in_features, residual, prologue,
                                  norm_weight, eps, epilogue)


@quant_linear.register_fake
def _(x, qweight, scales, bias, group_size, bits, in_features, residual=None, prologue="none", norm_weight=None,
      eps=0.0, epilogue="none"):
    return empty_output(x, qweight.shape[0], residual, norm_weight, epilogue)


@torch.library.custom_op("fxopt::quant_linear_add_", mutates_args=("residual",))
def quant_linear_add_(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int, bits: int,
                      in_features: int, residual: Tensor, prologue: str = "none", norm_weight: Tensor | None = None,
                      eps: float = 0.0) -> None:
    """``residual += quant_linear(x, ...)``, in place: ``fxopt.linear_add_`` (``linear.py``) for an
    INT8/INT4 weight, written by the prefill graph where nothing reads the residual's old value
    afterwards. Same values as ``fxopt.quant_linear`` with the residual."""
    residual.add_(quant_linear_reference(x, qweight, scales, bias, group_size, bits, in_features, None, prologue,
                                         norm_weight, eps))


@quant_linear_add_.register_fake
def _(x, qweight, scales, bias, group_size, bits, in_features, residual, prologue="none", norm_weight=None, eps=0.0):
    return None
