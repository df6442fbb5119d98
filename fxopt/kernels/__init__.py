"""Ops fxopt introduces: each a torch custom op (namespace ``fxopt``) with a plain-PyTorch
reference, a fake implementation for shapes, and where it pays a Triton kernel for CUDA."""
from . import attention  # noqa: F401
