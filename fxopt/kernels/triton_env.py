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

# Programmatic dependent launch (Hopper and later), opt-in with FXOPT_PDL=1: a kernel launched with
# ``launch_pdl=True`` may start while the kernel before it finishes its last programs; it calls
# ``gdc_wait()`` before it reads anything that kernel wrote (and before it writes anything), and
# ``gdc_launch_dependents()`` to let the next kernel start early in turn. The decode kernels
# (linear_triton, attention_triton, rotary_triton) support it. Off by default: on an H200
# (2026-11-27) it made the GEMVs with a norm prologue 2-8 % faster and those with a residual
# 5-18 % slower (``linear_triton.benchmark``), and whole decode steps moved by -2.5 % to +1.3 %.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a triton without grid dependency control: never asked for (see pdl())
    gdc_launch_dependents = gdc_wait = None

PDL_ENABLED = os.environ.get("FXOPT_PDL", "0") == "1"
_PDL_DEVICES: dict = {}


def pdl(device) -> bool:
    """Whether launches on ``device`` use programmatic dependent launch: a CUDA device of compute
    capability 9.0 or more, a triton that has it, not the interpreter, and ``PDL_ENABLED``."""
    if not PDL_ENABLED or INTERPRET or gdc_wait is None or getattr(device, "type", None) != "cuda":
        return False
    index = device.index if device.index is not None else -1
    if index not in _PDL_DEVICES:
        import torch

        _PDL_DEVICES[index] = torch.cuda.get_device_capability(device)[0] >= 9
    return _PDL_DEVICES[index]

