"""Ops fxopt introduces: each a torch custom op (namespace ``fxopt``) with a plain-PyTorch
reference, a fake implementation for shapes, and where it pays a Triton kernel for CUDA.

One file per op family: ``attention`` (cached attention, and prompt attention for prefills), ``norm`` (RMSNorm / LayerNorm with the
residual add), ``rotary`` (RoPE on q and k), ``activation`` (gated MLP activations), ``sampling``
(greedy decoding's argmax). Files named
``*_triton.py`` hold the Triton kernels and register them as the CUDA implementations;
``linear_cpu.py`` the linear's CPU kernel (the reference with its matmul in oneDNN).
"""
from . import activation, attention, collectives, linear, norm, quant, rotary, sampling  # noqa: F401 - define torch.ops.fxopt.*

import os as _os

import torch as _torch

from . import linear_cpu as _linear_cpu

_linear_cpu.register()  # fxopt.linear's CPU kernel: the matmul in oneDNN (where torch has it)

if _torch.cuda.is_available() and _os.environ.get("FXOPT_NO_TRITON") != "1":
    from .triton_ops import register_all as _register_all

    _register_all()  # CUDA implementations of the ops above (FXOPT_NO_TRITON=1: the references)
