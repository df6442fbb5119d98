"""A linear layer with what surrounds it in a decoder block folded in: ``torch.ops.fxopt.linear``.

    y = linear(x, weight, bias, residual, prologue, norm_weight, eps, epilogue)

is, in plain PyTorch (``linear_reference``)::

    a = x                                       # prologue "none"
    a = rms_norm(x, norm_weight, eps)           # prologue "rms_norm"
    a = gated_act(x, kind)                      # prologue "gated_<kind>": x = [gate | up], kind silu/gelu/...
    y = F.linear(a, weight, bias)
    y = gated_act(y, kind)                      # epilogue "gated_<kind>": the weight's rows are [gate | up]
    y = y + residual                            # when residual is given (never with an epilogue)

In a Llama block the four linears become::

    qkv  = linear(h,     w_qkv,  prologue="rms_norm", norm_weight=g_attn)
    h    = linear(attn,  w_o,    residual=h)
    gu   = linear(h,     w_gu,   prologue="rms_norm", norm_weight=g_mlp)
    h    = linear(gu,    w_down, residual=h, prologue="gated_silu")

or, with the activation as the gate/up projection's epilogue (computed once a feature instead of
once a program of the down projection)::

    a    = linear(h,     w_gu,   prologue="rms_norm", norm_weight=g_mlp, epilogue="gated_silu")
    h    = linear(a,     w_down, residual=h)

so a decoded token runs one kernel per projection instead of norm + GEMV + activation + add: at
batch 1 every one of those small kernels costs a launch and a tail inside the CUDA graph, which
is most of what separates a decode step from the memory-bandwidth floor. ``fuse`` writes these
nodes; the Triton kernel (``linear_triton.py``) computes prologue and epilogue in registers around
a GEMV for the few-row (decode) case and composes norm/activation kernels with cuBLAS for prompts.

The reference is the unfused composition, op for op, so on the CPU a graph with ``fxopt.linear``
computes exactly what the graph before it did.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import KINDS, gated_act_reference
from .norm import rms_norm_reference

PROLOGUES = ("none", "rms_norm", *(f"gated_{kind}" for kind in KINDS))
EPILOGUES = ("none", *(f"gated_{kind}" for kind in KINDS))


def gated_kind(prologue: str) -> str | None:
    """``"gated_silu"`` -> ``"silu"``; None for a prologue that is not a gated activation."""
    return prologue[len("gated_"):] if prologue.startswith("gated_") else None


def check_prologue(prologue: str, norm_weight: Tensor | None) -> None:
    if prologue not in PROLOGUES:
        raise ValueError(f"fxopt.linear: unknown prologue '{prologue}'; known: {', '.join(PROLOGUES)}")
    if (prologue == "rms_norm") != (norm_weight is not None):
        raise ValueError("fxopt.linear: norm_weight goes with prologue 'rms_norm', and only with it")


def check_epilogue(epilogue: str, out_features: int, residual) -> None:
    """A gated epilogue halves the output (``[gate | up]`` -> ``act(gate) * up``): the weight needs
    an even number of rows, and a residual would be added to the halved output -- never written by
    ``fold_linear``, refused here."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"fxopt.linear: unknown epilogue '{epilogue}'; known: {', '.join(EPILOGUES)}")
    if epilogue != "none" and (out_features % 2 or residual is not None):
        raise ValueError(f"fxopt.linear: epilogue '{epilogue}' needs an even number of output features "
                         f"(got {out_features}) and no residual")


def output_features(out_features: int, epilogue: str) -> int:
    """Features of the op's output: the weight's rows, half of them after a gated epilogue."""
    return out_features // 2 if epilogue != "none" else out_features


def apply_epilogue(y: Tensor, epilogue: str) -> Tensor:
    """The linear's output after its epilogue, computed the way the unfused op computes it."""
    kind = gated_kind(epilogue)
    return gated_act_reference(y, kind) if kind else y


def apply_prologue(x: Tensor, prologue: str, norm_weight: Tensor | None, eps: float) -> Tensor:
    """The linear's input after its prologue, computed the way the unfused ops compute it."""
    if prologue == "rms_norm":
        return rms_norm_reference(x, norm_weight, eps)
    kind = gated_kind(prologue)
    return gated_act_reference(x, kind) if kind else x


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                     prologue: str = "none", norm_weight: Tensor | None = None, eps: float = 0.0,
                     epilogue: str = "none", *, matmul=F.linear) -> Tensor:
    """``matmul``: what computes ``x @ weight.T + bias`` (``linear_cpu`` hands oneDNN's in)."""
    check_prologue(prologue, norm_weight)
    check_epilogue(epilogue, weight.shape[0], residual)
    y = apply_epilogue(matmul(apply_prologue(x, prologue, norm_weight, eps), weight, bias), epilogue)
    return y if residual is None else y + residual


def linear_add_reference(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, prologue: str = "none",
                         norm_weight: Tensor | None = None, eps: float = 0.0, *, matmul=F.linear) -> None:
    """``residual += linear(x, weight, bias, prologue=...)``, in place."""
    check_prologue(prologue, norm_weight)
    residual.add_(matmul(apply_prologue(x, prologue, norm_weight, eps), weight, bias))


@torch.library.custom_op("fxopt::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
           prologue: str = "none", norm_weight: Tensor | None = None, eps: float = 0.0,
           epilogue: str = "none", prefetch: Tensor | None = None) -> Tensor:
    """``prefetch``: a weight the decode kernel warms the L2 with once its own loop is done (the
    ``prefetch`` pass, ``passes/prefetch.py``); a hint, ignored here."""
    return linear_reference(x, weight, bias, residual, prologue, norm_weight, eps, epilogue)


@torch.library.custom_op("fxopt::linear_add_", mutates_args=("residual",))
def linear_add_(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, prologue: str = "none",
                norm_weight: Tensor | None = None, eps: float = 0.0) -> None:
    """``residual += linear(x, weight, bias, prologue=...)``, in place: ``fxopt.linear`` with a
    residual, for a graph in which nothing reads the residual's old value afterwards (the prefill
    graph, ``runtime/last_token.py``). On CUDA cuBLAS then accumulates into the residual, where
    the out-of-place ``addmm`` first copies it into a new tensor: for a 2048-token prompt of a
    4096-wide model that copy moves 32 MiB, twice a layer. Same values as ``fxopt.linear``."""
    linear_add_reference(x, weight, bias, residual, prologue, norm_weight, eps)


@linear_add_.register_fake
def _(x, weight, bias, residual, prologue="none", norm_weight=None, eps=0.0):
    return None


def empty_output(x: Tensor, out_features: int, residual: Tensor | None, norm_weight: Tensor | None,
                 epilogue: str = "none") -> Tensor:
    """An empty tensor shaped like the output of a folded linear (the ops' fake implementations)."""
    dtype = x.dtype if norm_weight is None else torch.promote_types(x.dtype, norm_weight.dtype)
    shape = (*x.shape[:-1], output_features(out_features, epilogue))
    if residual is not None:
        shape = torch.broadcast_shapes(shape, residual.shape)
        dtype = torch.promote_types(dtype, residual.dtype)
    return x.new_empty(shape, dtype=dtype)


@linear.register_fake
def _(x, weight, bias=None, residual=None, prologue="none", norm_weight=None, eps=0.0, epilogue="none",
      prefetch=None):
    return empty_output(x, weight.shape[0], residual, norm_weight, epilogue)
