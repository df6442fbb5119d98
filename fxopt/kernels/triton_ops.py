"""Register every Triton kernel as the CUDA implementation of its ``torch.ops.fxopt`` op.

    from fxopt.kernels.triton_ops import register_all
    register_all()   # -> ["attention_triton", "norm_triton", "rotary_triton", "activation_triton"]

Each ``*_triton`` module has a ``register()`` that calls ``<custom_op>.register_kernel("cuda")``;
this calls them all. Without triton or without CUDA it does nothing and returns ``[]``: the ops keep
their plain-PyTorch references. Idempotent (registering again replaces the same functions).
"""
from __future__ import annotations

import importlib

import torch

# In the order they are registered. A module that is missing (attention_triton is written
# separately) or whose register() returns False is skipped.
MODULES = ("attention_triton", "norm_triton", "rotary_triton", "activation_triton", "quant_triton", "linear_triton",
           "sampling_triton")


def register_all() -> list[str]:
    """Register the CUDA implementations; returns the names of the modules that registered."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    registered = []
    for name in MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise  # the module exists but something it imports is missing: a real error
            continue
        if module.register():
            registered.append(name)
    return registered
