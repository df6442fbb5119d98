"""The prefill graph: logits for one position per row instead of every position, and attention
over the prompt alone.

Generation only needs the logits of each prompt's last token, but a causal LM's graph computes
the LM head over every position: for a 2048-token prompt and a 128k vocabulary that is a
2048 × 128k matrix product and a 1 GiB fp32 result, for one row of it. :func:`last_token_graph`
copies the compiled graph (the copy shares every weight and cache buffer) and gathers the hidden
state of one position per row right before the head::

    h [B, S, H] ──gather(index [B])──▶ [B, 1, H] ──head──▶ logits [B, 1, V]

The head is found from the dataflow, as ``quantize`` finds it: the linear (float or quantized)
whose output reaches the graph's output with no linear below it. The copy takes one more input,
``last_index``, after the model's own. Graphs without exactly one such head, or whose head input
is not ``[B, S, H]``, get no prefill graph (None) and generation computes all the logits.

A prefill starts a sequence: every row's tokens sit at positions 0..S-1. So the copy's
``cached_attention`` nodes become ``prompt_attention``, which writes the same cache slots and
computes the same values but attends over the prompt's own k/v (on CUDA, cuDNN's fused kernel)
instead of over the cache (``kernels/attention.py``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir import TensorSpec, input_specs, is_op, shape_of, static_dim

from ..kernels import attention  # noqa: F401 - registers torch.ops.fxopt.prompt_attention

aten = torch.ops.aten
CACHED_ATTENTION = torch.ops.fxopt.cached_attention.default
PROMPT_ATTENTION = torch.ops.fxopt.prompt_attention.default


def prompt_positions(batch: int, seq: int, device) -> torch.Tensor:
    """The positions of a prefill: 0..seq-1 in every row ([batch, seq], rows broadcast)."""
    return torch.arange(seq, device=device).expand(batch, seq)


def _head(gm: fx.GraphModule) -> fx.Node | None:
    from ..passes.quantize import LINEARS

    output = gm.graph.output_node()
    below: dict[fx.Node, bool] = {}
    reaches: dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        below[node] = any(is_op(u, *LINEARS) or below.get(u, False) for u in node.users)
        reaches[node] = node is output or any(reaches.get(u, False) for u in node.users)
    heads = [n for n in gm.graph.nodes if is_op(n, *LINEARS) and reaches[n] and not below[n]]
    return heads[0] if len(heads) == 1 else None


def last_token_graph(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of ``gm`` whose head sees only position ``last_index[b]`` of row ``b`` (or None)."""
    specs = input_specs(gm)
    head = _head(gm)
    if head is None or specs is None:
        return None
    h = head.args[0]
    shape = shape_of(h)
    if shape is None or len(shape) != 3 or static_dim(shape[2]) is None:
        return None
    hidden = static_dim(shape[2])
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        index = graph.placeholder("last_index")
    new_h = env[h]
    with graph.inserting_after(new_h):
        rows = graph.call_function(aten.reshape.default, (index, [-1, 1, 1]))
    with graph.inserting_after(rows):
        wide = graph.call_function(aten.expand.default, (rows, [-1, -1, hidden]))
    with graph.inserting_after(wide):
        picked = graph.call_function(aten.gather.default, (new_h, 1, wide))
    new_head = env[head]
    new_head.args = (picked, *new_head.args[1:])
    for node in graph.find_nodes(op="call_function", target=CACHED_ATTENTION):
        node.target = PROMPT_ATTENTION
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    device = next((s.device for s in specs if isinstance(s, TensorSpec)), torch.device("cpu"))
    copy.meta["fxopt_inputs"] = list(specs) + [TensorSpec(torch.long, device, (None,), (2,))]
    # No shape propagation here: it would cost a second or more on the first generate() of a
    # large graph, and nothing that runs this copy reads meta['val'].
    return copy
