"""``prefetch``: each decode attention warms the L2 with the weight of the linear it feeds.

At batch 1 a decode step streams every weight once, and the memory is busy the whole step but
for the attention: between the q/k/v projection and the output projection it reads only the KV
cache (a few MB at short contexts) for microseconds. After this pass a Llama block reads::

    attn = fxopt.cached_attention(q, k, v, k_cache, v_cache, pos, scale, prefetch=w_o)
    h2   = fxopt.linear(reshape(transpose(attn)), w_o, residual=h1)

and the attention's kernel first issues L2 prefetches for ``w_o`` (up to half the L2), so the output
projection finds its first rows in L2 instead of streaming them from HBM after the attention
(``kernels/triton_env.py``: ``l2_prefetch``; Hopper GPUs, decode only). Every value stays the same
bits: a prefetch is a hint, and the reference ignores it.

The linear comes from the dataflow: the attention's output, through view-like ops (transpose,
reshape, ...), is the input ``x`` of a linear (``aten.linear``, ``fxopt.linear`` or
``fxopt.quant_linear``) whose weight is a ``get_attr``, a constant. Run it after the passes that
rewrite linears (``shard``, ``quantize``, ``fold_linear``), so that the attention prefetches the
weight the kernel will read: a rank's shard, an INT8 ``qweight``. (``quantize`` run later anyway
moves the prefetch to the ``qweight`` it makes.)

With the option ``prefetch_linears=True`` every ``fxopt.linear`` also prefetches the first
PREFETCH_TAIL_BYTES of the weight of the next linear in the graph, from the programs that have
finished their loop while the last ones still run (unless an attention in between prefetches that
weight already).

The pass is opt-in until a GPU run shows what it gains (docs/fusion.md).

Stats: ``prefetch``, how many attentions prefetch a weight; ``prefetch_linears``, how many linears.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import kernels  # noqa: F401 - registers torch.ops.fxopt.*
from ..ir import is_op
from .base import CompileContext, Pass, PassResult, register_pass
from .fold_linear import linear_fields

aten = torch.ops.aten
ATTENTION = torch.ops.fxopt.cached_attention.default
LINEAR = torch.ops.fxopt.linear.default
# Ops that only re-view their first argument: the attention's output keeps its bytes through them.
VIEWS = (aten.transpose.int, aten.permute.default, aten.reshape.default, aten.view.default,
         aten._unsafe_view.default, aten.clone.default, aten.contiguous.default, aten.flatten.using_ints)
MAX_VIEWS = 4


def next_weight(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` weight of the linear that reads ``node``'s value as its input, through at
    most MAX_VIEWS view-like ops; None if there is none."""
    frontier = [node]
    for _ in range(MAX_VIEWS + 1):
        following = []
        for value in frontier:
            for user in value.users:
                fields = linear_fields(user)
                if fields is not None and fields["x"] is value:
                    if (weight := _constant_weight(fields)) is not None:
                        return weight
                elif is_op(user, *VIEWS) and user.args[0] is value:
                    following.append(user)
        frontier = following
    return None


def following_weight(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` weight of the first linear after ``node`` in the graph's order, the one a
    decode step streams next; None if that linear's weight is computed or there is none."""
    later = node.next
    while later.op != "root":
        fields = linear_fields(later)
        if fields is not None:
            return _constant_weight(fields)
        later = later.next
    return None


def _constant_weight(fields: dict) -> fx.Node | None:
    """The weight a linear (its ``linear_fields``) streams, if it is a ``get_attr``; else None."""
    weight = fields.get("qweight", fields.get("weight"))
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def set_prefetch(node: fx.Node, weight: fx.Node) -> None:
    """``node`` prefetches ``weight``, whose ``get_attr`` moves up before it if it came later (the
    linear that reads the weight comes after the attention)."""
    earlier = node.prev
    while earlier.op != "root" and earlier is not weight:
        earlier = earlier.prev
    if earlier is not weight:
        node.prepend(weight)
    node.update_kwarg("prefetch", weight)


def retarget(old: fx.Node, new: fx.Node) -> None:
    """Nodes that prefetch ``old`` prefetch ``new`` instead (a pass replaced that weight)."""
    for user in list(old.users):
        if user.kwargs.get("prefetch") is old:
            set_prefetch(user, new)


@register_pass("prefetch")
class Prefetch(Pass):
    name = "prefetch"
    preserves_meta = True  # a new input to existing nodes; no shape or dtype changes

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        stats = {"prefetch": 0}
        for attn in gm.graph.find_nodes(op="call_function", target=ATTENTION):
            stats["prefetch"] += _prefetch(attn, next_weight(attn))
        if ctx.option("prefetch_linears", False):
            stats["prefetch_linears"] = 0
            for linear in gm.graph.find_nodes(op="call_function", target=LINEAR):
                weight = following_weight(linear)
                taken = weight is not None and any(u.kwargs.get("prefetch") is weight for u in weight.users)
                stats["prefetch_linears"] += 0 if taken else _prefetch(linear, weight)
        return PassResult(changed=any(stats.values()), stats=stats)


def _prefetch(node: fx.Node, weight: fx.Node | None) -> int:
    """``node`` prefetches ``weight`` (noted in its meta for the dumps); 1 if that is new."""
    if weight is None or node.kwargs.get("prefetch") is weight:
        return 0
    set_prefetch(node, weight)
    node.meta["fxopt"] = {**node.meta.get("fxopt", {}), "prefetch": weight.target}
    return 1
