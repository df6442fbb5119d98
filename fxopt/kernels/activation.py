"""The MLP activation with its gate, in one op.

    y = gated_act(gate_up, kind)     # gate_up [..., 2I] = [gate | up] → act(gate) * up   [..., I]
    y = act(x, kind)                 # plain activation, for MLPs without a gate

``kind`` is ``silu`` (SwiGLU), ``gelu`` (GeGLU, exact erf), ``gelu_tanh`` (tanh approximation,
GPT-2's ``gelu_new``) or ``relu``. ``gated_act`` takes the output of the fused gate/up projection
(``fuse`` concatenates the two weights once, at compile time), so one kernel reads it once and
writes half as much. Triton kernels register themselves for CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("silu", "gelu", "gelu_tanh", "relu")


def act_reference(x: Tensor, kind: str) -> Tensor:
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation '{kind}'; known: {', '.join(KINDS)}")


def gated_act_reference(gate_up: Tensor, kind: str) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return act_reference(gate, kind) * up


@torch.library.custom_op("fxopt::gated_act", mutates_args=())
def gated_act(gate_up: Tensor, kind: str) -> Tensor:
    return gated_act_reference(gate_up, kind)


@gated_act.register_fake
def _(gate_up, kind):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("fxopt::act", mutates_args=())
def act(x: Tensor, kind: str) -> Tensor:
    return act_reference(x, kind)


@act.register_fake
def _(x, kind):
    return torch.empty_like(x)
