"""What every ``*_triton.py`` kernel file needs to know about Triton, in one place.

    from .triton_env import INTERPRET, jit, tl, triton

- ``triton`` is None on an install without Triton: fxopt still imports, and the ops keep their
  plain-PyTorch references (``tl`` is then a stand-in, so kernel annotations still evaluate).
- ``INTERPRET`` is read once, at import: ``triton.jit`` makes interpreter functions (kernels that
  run on CPU tensors) if and only if ``TRITON_INTERPRET=1`` was set before.
"""
import os
import types

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = types.SimpleNamespace(constexpr=int)

jit = triton.jit if triton is not None else (lambda fn: fn)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
