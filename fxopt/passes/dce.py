"""``dce``: remove nodes whose values nobody uses, and the weights only they read.

Side-effecting nodes (ops that write a cache in place) are kept: ``torch.fx`` knows them from
their schemas.
"""
from __future__ import annotations

import torch.fx as fx

from .base import CompileContext, Pass, PassResult, register_pass


@register_pass("dce")
class DeadCodeElimination(Pass):
    name = "dce"
    preserves_meta = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        removed = before - len(gm.graph.nodes)
        freed = drop_unused_attributes(gm)
        stats = {"removed": removed}
        if freed:
            stats["weights_freed"] = freed
        return PassResult(changed=bool(removed or freed), stats=stats)


def drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node reads; return how many went."""
    used = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    freed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used:
            continue
        *parents, leaf = name.split(".")
        owner = gm
        for part in parents:
            owner = getattr(owner, part)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
        freed += 1
    gm.delete_all_unused_submodules()
    return freed
