"""``fold_linear``: fold the norm, the gated activation and the residual add around a linear into it.

Runs after ``fuse`` (and after ``quantize``, when there is one). After ``fuse``, a Llama block reads::

    n1, h1 = add_rms_norm(o_prev, h0, g1)       # o_prev: the previous block's down projection
    qkv    = linear(n1, w_qkv)
    ...
    o      = linear(attn, w_o)
    n2, h2 = add_rms_norm(o, h1, g2)
    gu     = linear(n2, w_gu)
    a      = gated_act(gu, "silu")
    down   = linear(a, w_down)

and afterwards (by default)::

    qkv = fxopt.linear(h1, w_qkv, prologue="rms_norm", norm_weight=g1)
    h2  = fxopt.linear(attn, w_o, residual=h1)
    gu  = fxopt.linear(h2, w_gu, prologue="rms_norm", norm_weight=g2)
    h3  = fxopt.linear(gu, w_down, residual=h2, prologue="gated_silu")

or, with the gated epilogue (rule 3, ``fold_float_linear=True``), the last two::

    a   = fxopt.linear(h2, w_gu, prologue="rms_norm", norm_weight=g2, epilogue="gated_silu")
    h3  = fxopt.linear(a, w_down, residual=h2)

Four kernels where there were seven, at batch 1 (``fxopt/kernels/linear_triton.py``). The rules,
in order, each read off the dataflow:

1. **residual**: ``add_rms_norm(y, r)`` where ``y`` is a linear's output and used nowhere else →
   ``h = fxopt.linear(..., residual=r)``, ``n = rms_norm(h)`` (either operand of the add); a plain
   ``add(y, r)`` of the same shape and dtype → ``h``;
2. **norm prologue**: ``linear(rms_norm(h), w)``, the norm used by this linear only →
   ``fxopt.linear(h, w, prologue="rms_norm")``;
3. **gated epilogue**: ``gated_act(linear(h, w_gu), kind)``, the linear's output (an even number
   of features, no residual) read by the activation only → ``fxopt.linear(h, w_gu,
   epilogue="gated_<kind>")``: the GEMV reduces each gate row beside its up row and writes
   ``act(gate) * up``;
4. **gated prologue**: ``linear(gated_act(gu, kind), w)``, the activation used here only →
   ``fxopt.linear(gu, w, prologue="gated_<kind>")`` (where rule 3 did not take it: every program
   of this linear then recomputes the activation over all of K);
5. **add + norm**: an ``add`` whose sum feeds an ``rms_norm`` (what ``unfold_linears`` leaves when
   the linear became a ``quant_linear``) → ``add_rms_norm`` again.

A linear after an all-reduce (tensor parallelism) is not followed by its add directly, so the
residual is never added before the reduction.

Which rules fire is an option per kind of linear: ``fold_float_linear`` and ``fold_quant_linear``
(defaults ``FLOAT_DEFAULT`` and ``QUANT_DEFAULT``), each True for every rule, False for none, or
some of the kinds ``("residual", "rms_norm", "gated_epilogue", "gated")`` (rules 1, 2, 3, 4) for
those alone. The INT8 decode kernel takes the same prologue and epilogue as the float one, but
every program computes its prologue over all of K, which costs more than the gated activation's
own kernel: for ``quant_linear`` nodes the default (``QUANT_DEFAULT``, its measurements beside it)
leaves the gated prologue out and takes the gated epilogue (rule 3) instead; float linears keep
the gated prologue by default (the epilogue measured the same there). Around an
unfolded ``quant_linear``, rule 5 keeps the residual add and the norm after it one kernel.
``unfold_linears`` is the inverse of rules 1-4 for ``fxopt.linear``, for a pass that meets them and
knows only plain linears (``quantize`` on an already folded graph unfolds, quantizes and folds
again).

Stats: per rule, how many times it fired.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx

from .. import kernels  # noqa: F401 - registers torch.ops.fxopt.*
from ..ir import complete_meta, is_op
from ..kernels.linear import gated_kind
from ..patterns import infer_meta
from .base import CompileContext, Pass, PassResult, register_pass

aten = torch.ops.aten
LINEAR = torch.ops.fxopt.linear.default
QUANT_LINEAR = torch.ops.fxopt.quant_linear.default
RMS_NORM = torch.ops.fxopt.rms_norm.default
ADD_RMS_NORM = torch.ops.fxopt.add_rms_norm.default
GATED_ACT = torch.ops.fxopt.gated_act.default
# What follows x in each kind of linear, then the folded fields every kind ends with.
CORE = {aten.linear.default: ("weight", "bias"), LINEAR: ("weight", "bias"),
        QUANT_LINEAR: ("qweight", "scales", "bias", "group_size", "bits", "in_features")}
FOLDED = ("residual", "prologue", "norm_weight", "eps", "epilogue")
DEFAULTS = dict(bias=None, residual=None, prologue="none", norm_weight=None, eps=0.0, epilogue="none")
# What ``fold_float_linear`` and ``fold_quant_linear`` may name: the residual (rule 1), the norm
# prologue (rule 2), the gated activation as the gate/up projection's epilogue (rule 3) and as the
# down projection's prologue (rule 4).
KINDS = ("residual", "rms_norm", "gated_epilogue", "gated")
# The defaults: what was measured to help. Float linears take the residuals, the norms and the gated
# activation as the down projection's prologue; INT8 linears the residuals, the norms and the gated
# activation as the gate/up projection's epilogue. On an H100 (2026-12-07, batch 1) against nothing
# folded, INT8: residuals and norms llama-1b 0.941 -> 0.877 ms a token, llama2-7b 3.222 -> 3.153;
# with the gated prologue too 0.918 / 3.279, the prologue alone 0.983 / 3.341 (the down
# projection's K = 11008 makes recomputing the activation in every program cost more than its
# kernel). The gated epilogue computes the activation once, in the gate/up GEMV, and takes its
# kernel away: INT8 llama-1b 0.866 -> 0.852 (batch 1), 0.982 -> 0.952 (batch 8); llama2-7b
# 3.112 -> 3.098, 3.679 -> 3.623. For float linears it changed nothing beyond the noise (within
# 0.4 % at all four points), so the measured prologue stays (docs/performance.md).
FLOAT_DEFAULT = ("residual", "rms_norm", "gated")
QUANT_DEFAULT = ("residual", "rms_norm", "gated_epilogue")


def linear_fields(node: fx.Node) -> dict | None:
    """The arguments of a linear (``aten.linear``, ``fxopt.linear`` or ``fxopt.quant_linear``) by
    name, with ``op``: the op that carries them once folded; None for any other node."""
    op = next((op for op in CORE if is_op(node, op)), None)
    if op is None:
        return None
    names = ("x", *CORE[op], *(FOLDED if op is not aten.linear.default else ()))
    fields = dict(DEFAULTS, **dict(zip(names, node.args)), **node.kwargs)
    fields["op"] = LINEAR if op is aten.linear.default else op
    return fields


def _replace(gm: fx.GraphModule, old: fx.Node, fields: dict, where: fx.Node | None = None) -> fx.Node:
    """The linear ``old`` again, with ``fields`` (as ``fxopt.linear`` when it was an
    ``aten.linear``), computed right before ``where`` (default: where ``old`` was)."""
    graph = gm.graph
    op = fields["op"]
    args = tuple(fields[f] for f in ("x", *CORE[op], *FOLDED))
    with graph.inserting_before(where or old):
        new = graph.call_function(op, args)
    new.meta["nn_module_stack"] = old.meta.get("nn_module_stack", {})
    folded = [p for p in (fields["prologue"],) if p != "none"] + ["residual"] * (fields["residual"] is not None)
    folded += [f"epilogue_{fields['epilogue']}"] * (fields["epilogue"] != "none")
    meta = dict(old.meta.get("fxopt", {}))
    meta.setdefault("pattern", "fold_linear")  # a concatenated q/k/v keeps its own label
    new.meta["fxopt"] = {**meta, "folded": "+".join(folded)}
    infer_meta(gm, new)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def _getitems(node: fx.Node) -> dict[int, list[fx.Node]] | None:
    """{index: its getitem nodes} of a tuple-returning node, None when something else uses it."""
    items = {}
    for user in node.users:
        if user.target is not operator.getitem:
            return None
        items.setdefault(user.args[1], []).append(user)
    return items


def _val(gm: fx.GraphModule, node: fx.Node):
    """``meta['val']`` of a node, inferred from its arguments' when a pass left it unset."""
    if "val" not in node.meta:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and "val" not in arg.meta:
                infer_meta(gm, arg)
        infer_meta(gm, node)
    return node.meta.get("val")


def _same(gm: fx.GraphModule, a: fx.Node, b: fx.Node) -> bool:
    va, vb = _val(gm, a), _val(gm, b)
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _take_residual(gm: fx.GraphModule, add: fx.Node, a, b, kinds: dict) -> fx.Node | None:
    """Rule 1: of the two addends of ``add``, the output of a linear that nothing else reads (and
    whose op ``kinds`` lets take a residual) takes the other as its residual; returns the new linear
    (computed where the add was: the residual may come after the linear), or None."""
    for y, other in ((a, b), (b, a)):
        fields = linear_fields(y) if isinstance(y, fx.Node) and isinstance(other, fx.Node) else None
        if fields is None or "residual" not in kinds[fields["op"]]:
            continue
        if fields["residual"] is not None or len(y.users) != 1 or not _same(gm, y, other):
            continue
        fields["residual"] = other
        return _replace(gm, y, fields, where=add)
    return None


def _fold_residual(gm: fx.GraphModule, node: fx.Node, kinds: dict) -> bool:
    """Rule 1 on an add_rms_norm node: the linear takes the add, an rms_norm of its output stays."""
    x, r, g, eps = node.args
    items = _getitems(node)
    if items is None:
        return False
    h = _take_residual(gm, node, x, r, kinds)
    if h is None:
        return False
    graph = gm.graph
    with graph.inserting_before(node):
        n = graph.call_function(RMS_NORM, (h, g, eps))
    n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    infer_meta(gm, n)
    for i, result in ((0, n), (1, h)):
        for item in items.get(i, ()):
            item.replace_all_uses_with(result)
            graph.erase_node(item)
    graph.erase_node(node)
    return True


def _fold_add(gm: fx.GraphModule, node: fx.Node, kinds: dict) -> bool:
    """Rule 1 on a plain ``add`` of two tensors (what ``unfold_linears`` leaves)."""
    if len(node.args) != 2 or node.kwargs:
        return False
    h = _take_residual(gm, node, *node.args, kinds)
    if h is None:
        return False
    node.replace_all_uses_with(h)
    gm.graph.erase_node(node)
    return True


def _fold_prologue(gm: fx.GraphModule, node: fx.Node, kinds: dict) -> str | None:
    """Rules 2 and 4 on a linear node (for the prologues ``kinds`` gives its op); returns the rule
    that fired."""
    fields = linear_fields(node)
    if fields is None or fields["prologue"] != "none":
        return None
    a = fields["x"]
    if not isinstance(a, fx.Node) or len(a.users) != 1:
        return None
    allowed = kinds[fields["op"]]
    if not ((is_op(a, RMS_NORM) and "rms_norm" in allowed) or (is_op(a, GATED_ACT) and "gated" in allowed)):
        return None
    if is_op(a, RMS_NORM):
        h, g, eps = a.args
        fields.update(x=h, prologue="rms_norm", norm_weight=g, eps=eps)
    elif is_op(a, GATED_ACT):
        fields.update(x=a.args[0], prologue=f"gated_{a.args[1]}")
    else:
        return None
    _replace(gm, node, fields)
    gm.graph.erase_node(a)
    return "linear_prologue_" + ("rms_norm" if fields["prologue"] == "rms_norm" else "gated")


def _fold_epilogue(gm: fx.GraphModule, act: fx.Node, kinds: dict) -> bool:
    """Rule 3 on a gated_act node: the linear whose output it alone reads takes it as its epilogue."""
    y, kind = act.args
    fields = linear_fields(y) if isinstance(y, fx.Node) and isinstance(kind, str) else None
    if fields is None or "gated_epilogue" not in kinds[fields["op"]] or len(y.users) != 1:
        return False
    val = _val(gm, y)
    if fields["residual"] is not None or fields["epilogue"] != "none" or val is None or val.shape[-1] % 2:
        return False
    fields["epilogue"] = f"gated_{kind}"
    new = _replace(gm, y, fields)
    act.replace_all_uses_with(new)
    gm.graph.erase_node(act)
    return True


def _refuse_add_norm(gm: fx.GraphModule, norm: fx.Node) -> bool:
    """Rule 5 on an rms_norm node."""
    s = norm.args[0]
    if not is_op(s, aten.add.Tensor) or len(s.args) != 2 or s.kwargs or not all(isinstance(a, fx.Node) for a in s.args):
        return False
    if not _same(gm, s.args[0], s.args[1]):
        return False
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = [a for a in norm.args[1:] if isinstance(a, fx.Node) and order[a] > order[s]]
    if any(a.op != "get_attr" for a in later):
        return False  # the norm's weight is computed after the add: leave the two alone
    for a in later:
        s.prepend(a)  # a get_attr reads no node: it may move up to the add
    with graph.inserting_before(s):
        fused = graph.call_function(ADD_RMS_NORM, (*s.args, *norm.args[1:]))
        n = graph.call_function(operator.getitem, (fused, 0))
        h = graph.call_function(operator.getitem, (fused, 1))
    for new in (fused, n, h):
        new.meta["nn_module_stack"] = norm.meta.get("nn_module_stack", {})
    infer_meta(gm, fused)
    n.meta["val"], h.meta["val"] = norm.meta.get("val"), s.meta.get("val")
    norm.replace_all_uses_with(n)
    s.replace_all_uses_with(h)
    graph.erase_node(norm)
    graph.erase_node(s)
    return True


def fold_kinds(option, name: str) -> frozenset:
    """The fold kinds a kind of linear takes, from its option ``name`` (False, True, or some of
    KINDS); raises ValueError naming an unknown kind."""
    if isinstance(option, bool) or option is None:
        return frozenset(KINDS) if option else frozenset()
    kinds = frozenset([option] if isinstance(option, str) else option)
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise ValueError(f"{name}: unknown kind(s) {unknown}; expected True, False or some of {KINDS}")
    return kinds


def fold_linears(gm: fx.GraphModule, quant=False, float_linear=FLOAT_DEFAULT) -> Counter:
    """Apply rules 1-5 everywhere: to float linears the kinds ``float_linear`` names, to
    ``quant_linear`` nodes those ``quant`` names (each True, False or some of KINDS, as
    ``fold_kinds`` reads them); counts by rule."""
    kinds = {LINEAR: fold_kinds(float_linear, "fold_float_linear"),
             QUANT_LINEAR: fold_kinds(quant, "fold_quant_linear")}
    counts = Counter()
    for node in list(gm.graph.nodes):
        if (is_op(node, ADD_RMS_NORM) and _fold_residual(gm, node, kinds)) or (
                is_op(node, aten.add.Tensor) and _fold_add(gm, node, kinds)):
            counts["linear_residual"] += 1
    for node in list(gm.graph.nodes):
        if is_op(node, GATED_ACT) and _fold_epilogue(gm, node, kinds):
            counts["linear_epilogue_gated"] += 1
    for node in list(gm.graph.nodes):
        rule = _fold_prologue(gm, node, kinds)
        if rule:
            counts[rule] += 1
    for node in list(gm.graph.nodes):
        if is_op(node, RMS_NORM) and _refuse_add_norm(gm, node):
            counts["add_rms_norm_refold"] += 1
    gm.graph.lint()
    return counts


def fold_by_options(gm: fx.GraphModule, ctx: CompileContext) -> Counter:
    """``fold_linears`` with the kinds the compile options name: ``fold_float_linear`` (default
    FLOAT_DEFAULT) and ``fold_quant_linear`` (QUANT_DEFAULT)."""
    return fold_linears(gm, quant=ctx.option("fold_quant_linear", QUANT_DEFAULT),
                        float_linear=ctx.option("fold_float_linear", FLOAT_DEFAULT))


def unfold_linears(gm: fx.GraphModule) -> int:
    """Rewrite every ``fxopt.linear`` as its parts: the prologue op, ``aten.linear``, the epilogue op,
    ``aten.add`` (so that a pass that knows plain linears, like ``quantize``, sees them). Returns how
    many."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if not is_op(node, LINEAR):
            continue
        f = linear_fields(node)
        stack = node.meta.get("nn_module_stack", {})
        new = []
        with graph.inserting_before(node):
            x = f["x"]
            if f["prologue"] == "rms_norm":
                x = graph.call_function(RMS_NORM, (x, f["norm_weight"], f["eps"]))
                new.append(x)
            elif f["prologue"] != "none":
                x = graph.call_function(GATED_ACT, (x, gated_kind(f["prologue"])))
                new.append(x)
            args = (x, f["weight"]) if f["bias"] is None else (x, f["weight"], f["bias"])
            y = graph.call_function(aten.linear.default, args)
            new.append(y)
            if f["epilogue"] != "none":
                y = graph.call_function(GATED_ACT, (y, gated_kind(f["epilogue"])))
                new.append(y)
            if f["residual"] is not None:
                y = graph.call_function(aten.add.Tensor, (y, f["residual"]))
                new.append(y)
        for n in new:
            n.meta["nn_module_stack"] = stack
            infer_meta(gm, n)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        count += 1
    return count


@register_pass("fold_linear")
class FoldLinear(Pass):
    name = "fold_linear"
    preserves_meta = True  # as fuse: the new nodes' values are inferred, else the graph propagated

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        counts = fold_by_options(gm, ctx)
        stats = dict(counts)
        propagated = complete_meta(gm)
        if propagated:
            stats["propagated_for"] = propagated
        return PassResult(changed=bool(counts), stats=stats)
