"""Normalization with the preceding residual add folded in.

    y = rms_norm(x, weight, eps)
    y, h = add_rms_norm(x, residual, weight, eps)        # h = x + residual; y = rms_norm(h)
    y = layer_norm(x, weight, bias, eps)
    y, h = add_layer_norm(x, residual, weight, bias, eps)

The references follow transformers' arithmetic exactly (LlamaRMSNorm: normalize in float32, cast
back to the input dtype, then scale by the weight), so a fused graph matches the eager model
bit for bit on the CPU. Triton kernels register themselves for CUDA on top of these ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@torch.library.custom_op("fxopt::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)


@torch.library.custom_op("fxopt::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    h = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype),
                    device=x.device)
    return torch.empty(h.shape, dtype=torch.promote_types(weight.dtype, h.dtype), device=x.device), h


@torch.library.custom_op("fxopt::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return layer_norm_reference(x, weight, bias, eps)


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("fxopt::add_layer_norm", mutates_args=())
def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor]:
    h = x + residual
    return layer_norm_reference(h, weight, bias, eps), h


@add_layer_norm.register_fake
def _(x, residual, weight, bias, eps):
    h = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype),
                    device=x.device)
    return torch.empty_like(h), h
