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

And in the copy each residual stream is updated in place: an ``fxopt.linear`` (or ``quant_linear``)
with a residual whose old value nothing reads afterwards becomes ``fxopt.linear_add_`` (or
``quant_linear_add_``: ``residual += linear(...)``),
and the linear's readers read the residual's node instead (:func:`accumulate_residuals`). Over a
prompt's many rows cuBLAS then accumulates into the residual, where an out-of-place add copies it
first. The decode graph keeps its out-of-place linears: at one row the GEMV adds the residual as
it writes, and nothing is copied.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ir import TensorSpec, input_specs, is_op, shape_of, static_dim

from ..kernels import attention, linear, quant  # noqa: F401 - registers prompt_attention, linear_add_, ...

aten = torch.ops.aten
CACHED_ATTENTION = torch.ops.fxopt.cached_attention.default
PROMPT_ATTENTION = torch.ops.fxopt.prompt_attention.default
# The linears whose residual can be updated in place, and their in-place forms.
IN_PLACE = {torch.ops.fxopt.linear.default: torch.ops.fxopt.linear_add_.default,
            torch.ops.fxopt.quant_linear.default: torch.ops.fxopt.quant_linear_add_.default}
# Whether prefill graphs made from now on update their residuals in place (accumulate_residuals);
# off only to measure what it saves (benchmarks/decode.py --prefill-in-place on off).
IN_PLACE_RESIDUALS = True


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
    if IN_PLACE_RESIDUALS:
        accumulate_residuals(graph)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    device = next((s.device for s in specs if isinstance(s, TensorSpec)), torch.device("cpu"))
    copy.meta["fxopt_inputs"] = list(specs) + [TensorSpec(torch.long, device, (None,), (2,))]
    # No shape propagation here: it would cost a second or more on the first generate() of a
    # large graph, and nothing that runs this copy reads meta['val'].
    return copy


def _returns_views(target) -> bool:
    """Whether a call of ``target`` may return a view of an input: anything but an op whose schema
    says its outputs alias nothing (every fxopt op, most aten ops)."""
    schema = getattr(target, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _fresh(node: fx.Node) -> bool:
    """Whether ``node``'s tensor owns its storage: the output of an op that returns no view of an
    input (every fxopt op; an aten op whose schema marks no output as an alias), or an item of a
    tuple such an op returned. Placeholders, weights and views are not."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and isinstance(source.meta.get("val"), (tuple, list)) and _fresh(source)
    return not _returns_views(node.target)


def _views(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that may share its storage: the users, transitively, that may return
    a view of it (``_returns_views``; a call of anything but a function counts as one)."""
    out, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in out and (user.op != "call_function" or _returns_views(user.target)):
                out.add(user)
                todo.append(user)
    return out


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    tensors = isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
    return tensors and va.shape == vb.shape and va.dtype == vb.dtype


def accumulate_residuals(graph: fx.Graph) -> int:
    """Rewrite, in place, each ``fxopt.linear`` (``quant_linear``) whose residual ``r`` can take
    the sum::

        y = fxopt.linear(x, w, bias, r, prologue, g, eps)      # readers of y ...
        # becomes
        fxopt.linear_add_(x, w, bias, r, prologue, g, eps)      # ... now read r

    when ``r`` owns its storage (``_fresh``), the linear reads it (or a view of it) only as its
    residual, every other reader of it or its views comes before the linear, and ``y`` and ``r``
    have the same shape and dtype (recorded ``meta['val']``; without it the linear stays). Returns
    how many linears were rewritten."""
    from ..passes.fold_linear import CORE, FOLDED, linear_fields

    count = 0
    for node in list(graph.nodes):
        if not is_op(node, *IN_PLACE):
            continue
        fields = linear_fields(node)
        r = fields["residual"]
        if not isinstance(r, fx.Node) or not _fresh(r) or not _same_value(node, r):
            continue
        views = _views(r)
        if any(isinstance(v, fx.Node) and v in views for k, v in fields.items() if k != "residual"):
            continue  # x is r or a view of it: the product would read what it overwrites
        order = {n: i for i, n in enumerate(graph.nodes)}
        if any(order[u] >= order[node] for v in views for u in v.users if u is not node):
            continue
        op = fields["op"]
        # linear's prefetch, a decode hint: dropped; the epilogue: "none" (never with a residual).
        args = tuple(fields[name] for name in ("x", *CORE[op], *FOLDED) if name != "epilogue")
        with graph.inserting_before(node):
            acc = graph.call_function(IN_PLACE[op], args)
        acc.meta = {k: v for k, v in node.meta.items() if k != "val"}
        node.replace_all_uses_with(r)
        graph.erase_node(node)
        count += 1
    return count
