"""Rotary position embedding applied to q and k in one op.

    q_out, k_out = rotary(q, k, cos, sin)

q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D] (shared by every head), in the
"rotate half" convention of transformers' Llama family:
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``.
The reference reproduces transformers' arithmetic (same dtypes, same order), so a fused graph
matches the eager model on the CPU. A Triton kernel registers itself for CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@torch.library.custom_op("fxopt::rotary", mutates_args=())
def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rotary_reference(q, k, cos, sin)


@rotary.register_fake
def _(q, k, cos, sin):
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype))
