"""``kv_cache``: turn a stateless causal LM graph into one step of cached generation.

Every ``scaled_dot_product_attention`` whose q, k, v come from the tokens of this step is
replaced by ``fxopt.cached_attention`` (``fxopt/kernels/attention.py``), which writes k/v into
static cache buffers at the tokens' positions and attends over the cache. k/v are taken before
the GQA repeat (``unsqueeze → expand → reshape``), so the cache holds kv heads only. The mask
subgraph that fed the attentions dies and is removed.

Nothing here is per family: the pass reads the dataflow, and the positions input of the capture
contract (``position_ids``) tells where each token goes. Options (``fxopt.compile(...,
max_batch_size=8, max_seq_len=2048)``) size the cache; it is allocated once and never again.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..errors import PassError
from ..ir import describe, fake_mode_of, is_op, replace_node, shape_of, val
from ..kernels import attention  # noqa: F401 - registers torch.ops.fxopt.cached_attention
from .base import CompileContext, Pass, PassResult, register_pass

aten = torch.ops.aten
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ = 2048


def strip_gqa_repeat(node: fx.Node) -> fx.Node:
    """``reshape(expand(unsqueeze(kv, 2), [B, Hkv, n, S, D]), [B, Hkv*n, S, D])`` → ``kv``."""
    if not is_op(node, aten.reshape.default, aten.view.default):
        return node
    expand = node.args[0]
    if not is_op(expand, aten.expand.default):
        return node
    inner = expand.args[0]
    if not is_op(inner, aten.unsqueeze.default) or inner.args[1] != 2:
        return node
    source = inner.args[0]
    s, e = shape_of(source), shape_of(expand)
    if s is None or e is None or len(s) != 4 or len(e) != 5:
        return node
    return source


def positions_node(gm: fx.GraphModule) -> fx.Node | None:
    """The ``position_ids`` input of a captured causal LM (the capture contract), or None."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.name == "position_ids":
            return node
    return None


def _positions_node(gm: fx.GraphModule) -> fx.Node:
    node = positions_node(gm)
    if node is None:
        raise PassError("kv_cache: the graph has no 'position_ids' input; capture the causal LM with fxopt.capture, "
                        "which adds it")
    return node


@register_pass("kv_cache")
class KVCache(Pass):
    name = "kv_cache"
    # Each new node carries its value (the attention's is the SDPA's it replaces, the caches'
    # are made in the graph's fake mode): no re-propagation of the whole graph, which costs
    # more than the rewrite (1-2 s on a 32-layer model).
    preserves_meta = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        info = ctx.info
        if info is not None and info.kind != "causal_lm":
            raise PassError(f"kv_cache: {info.model_class} is not a causal LM; the pass only serves generation")
        attentions = [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention.default)]
        if not attentions:
            return PassResult(changed=False, stats={"attentions": 0})
        positions = _positions_node(gm)
        config = getattr(info, "config", None)
        max_batch = int(ctx.option("max_batch_size", DEFAULT_MAX_BATCH))
        max_seq = int(ctx.option("max_seq_len", min(DEFAULT_MAX_SEQ, getattr(config, "max_position_embeddings", DEFAULT_MAX_SEQ) or DEFAULT_MAX_SEQ)))
        window = getattr(config, "sliding_window", None) or 0
        window = window if window and window < max_seq else 0

        before = len(gm.graph.nodes)
        layers = []
        for i, sdpa in enumerate(attentions):
            layers.append(self._rewrite(gm, sdpa, i, positions, max_batch, max_seq, window))
        gm.graph.eliminate_dead_code()
        if info is not None:
            info.state["kv_cache"] = {"max_batch_size": max_batch, "max_seq_len": max_seq, "layers": layers,
                                      "window": window}
        stats = {"attentions": len(attentions), "removed": before - len(gm.graph.nodes),
                 "cache_MiB": round(sum(getattr(gm, k).nbytes + getattr(gm, v).nbytes for k, v in layers) / 2**20, 1)}
        return PassResult(changed=True, stats=stats)

    def _rewrite(self, gm, sdpa: fx.Node, index: int, positions: fx.Node, max_batch: int, max_seq: int, window: int):
        args = list(sdpa.args) + [None] * (8 - len(sdpa.args))
        q, k, v = args[0], args[1], args[2]
        dropout = sdpa.kwargs.get("dropout_p", args[4] or 0.0)
        if dropout:
            raise PassError(f"kv_cache: {describe(sdpa)} has dropout {dropout}; put the model in eval mode")
        k, v = strip_gqa_repeat(k), strip_gqa_repeat(v)
        qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
        if not (qs and ks and vs and len(qs) == len(ks) == 4):
            raise PassError(f"kv_cache: {describe(sdpa)} has q/k/v shapes {qs}/{ks}/{vs}; expected 4-D [B, H, S, D]")
        heads_kv, head_dim = int(ks[1]), int(ks[3])
        if int(qs[1]) % heads_kv:
            raise PassError(f"kv_cache: {describe(sdpa)}: {qs[1]} query heads vs {heads_kv} kv heads")
        scale = sdpa.kwargs.get("scale", args[6])
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(qs[3]))
        kv = val(k)
        names = []
        for which, dim in (("k", head_dim), ("v", int(vs[3]))):
            name = f"kv_cache_{index}_{which}"
            cache = torch.zeros(max_batch, heads_kv, max_seq, dim, dtype=kv.dtype, device=_real_device(gm, kv))
            gm.register_buffer(name, cache, persistent=False)
            names.append(name)
        graph = gm.graph
        with graph.inserting_before(sdpa):
            kc = graph.get_attr(names[0])
            vc = graph.get_attr(names[1])
            new = graph.call_function(torch.ops.fxopt.cached_attention.default,
                                      (q, k, v, kc, vc, positions, scale, window))
        with fake_mode_of(gm):
            for node, name in ((kc, names[0]), (vc, names[1])):
                cache = getattr(gm, name)
                node.meta["val"] = torch.empty(cache.shape, dtype=cache.dtype, device=kv.device)
        new.meta.update(sdpa.meta)  # the cached attention's output is the SDPA's, shape and dtype
        new.meta["fxopt"] = {"kv_cache_layer": index}
        replace_node(sdpa, new)
        return tuple(names)


def _real_device(gm: fx.GraphModule, fake: torch.Tensor) -> torch.device:
    """Where the cache lives: with the weights (the fake value's device is the capture device)."""
    for p in gm.parameters():
        return p.device if p.device.type != "meta" else fake.device
    return fake.device
