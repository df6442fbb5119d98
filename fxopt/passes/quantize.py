"""``quantize``: weight-only INT8 / INT4 quantization of linears, with an accuracy report.

Every chosen ``aten.linear(x, W, b)`` whose weight ``W`` [out, in] is a ``get_attr`` becomes
``fxopt.quant_linear(x, qweight, scales, b, group_size, bits, in_features)`` (``fxopt/kernels/quant.py``):
symmetric, one scale per output channel per group of ``group_size`` input features; the last group
is shorter when the group size does not divide ``in`` (SmolLM2's 576 = 4.5 × 128). INT8 stores one
value a byte; INT4 two (``[out, ceil(in/2)]`` uint8). The bias stays in float.

Options (``fxopt.compile(..., quant_bits=8, quant_group_size=64)``):

===================== ============ ===============================================================
``quant_bits``         8            8 or 4
``quant_group_size``   128          input features per scale: an int (32, 64, 128, ...), or
                                    ``None`` / ``"row"`` for one scale per whole row
``quant_lm_head``      False        also quantize the head (see below)
``quant_include``      None         parameter-name globs; only linears whose weight matches one
``quant_exclude``      None         parameter-name globs; linears whose weight matches one stay float
``quant_placeholders`` False        plan only: meta placeholders, nothing quantized (for loaders)
``quant_tp_groups``    "align"      after ``shard``, a row-parallel slice whose cuts miss the group
                                    grid: ``"align"`` (smaller groups on the grid), ``"local"``
                                    (keep the size, report it) or ``"error"``; see below
``quant_verify_tolerance`` None     ``verify=True``: the relative output error accepted from this
                                    pass (default: :func:`verify_bound`)
===================== ============ ===============================================================

Which linears: by default every linear inside the decoder blocks, decided from the dataflow, not
from names. A linear is a **head** when no other linear is downstream of it and its output reaches
the graph's output (a causal LM's ``lm_head``: everything else feeds it), or when its weight is
also read by an embedding lookup (tied embeddings). Heads stay float unless ``quant_lm_head=True``.
Globs match the original parameter names: for a weight ``fuse`` concatenated (q/k/v, gate/up), its
sources (``meta['param_sources']``); the fused weight is quantized when every source is chosen,
and stays float (the report says why) when the globs split it.

Run it after ``fuse``: a concatenated q/k/v or gate/up weight is quantized as one tensor (the
groups run along the input features, so concatenating rows never mixes groups).

The new ``get_attr`` buffers live next to the weight they replace (``...o_proj.qweight`` /
``...o_proj.scales``; ``...fused_q_proj_k_proj_v_proj_qweight`` / ``..._scales``) and carry
``meta['quant'] = {'of', 'role', 'group_size', 'bits', 'in_features'}`` and the original weight's
``meta['param']``, ``meta['param_sources']`` and ``meta['param_transform(s)']``: a checkpoint
loader quantizes on the fly from them. A weight on the meta device (a model built without weights),
or any weight with the option ``quant_placeholders=True`` (``fxopt.quantized_io.load_quantized``),
is planned but not quantized: meta-device placeholders of the right shape and dtype stand in, and
the loader fills them. The float weight goes when nothing else reads it (a tied LM head keeps it
for the embedding).

Accuracy: the graph before the rewrite runs once on the capture's example inputs; per quantized
linear the report keeps the relative weight error ``‖W − deq(Q)‖ / ‖W‖`` and the relative error
of the linear's output on the very inputs it saw (quantized vs float, the inputs themselves
float: the error of this layer alone, not accumulated). Each rewritten node carries them in
``meta['fxopt']`` (the dumps print them), the stats carry the worst, and
``ctx.info.state['quantize']`` (:func:`quant_report`) the full per-layer table.

Verification: the pass changes the numbers on purpose, and says by how much
(:meth:`Quantize.tolerance`, :func:`verify_bound`: 6x the expected weight error of one layer at
the bits and group size used, e.g. 0.042 at INT8 g128, 0.77 at INT4 g128, on top of the dtype's
tolerance). With ``verify=True`` the pass manager checks the quantized graph against the float
graph with that bound and the later passes tightly against the quantized graph.

Tensor parallelism: after ``shard`` each rank quantizes its local slices. Column-parallel slices
(rows) are always quantized as the unsharded model is. A row-parallel slice (input features: the
groups' axis, ``meta['param_sources']`` entries with a ``Slice`` of dim 1) holds groups of the
unsharded model only when the cuts fall on multiples of the group size; when they do not,
:func:`tp_group_size` keeps the unsharded grid with a smaller group (``quant_tp_groups="align"``,
the default), keeps the size and reports the layer (``"local"``), or refuses (``"error"``). The
report's rows say which (``tp_slice``, ``tp_groups``, ``requested_group_size``, ``tp_note``), and
``ctx.info.state['quantize']`` lists ``regrouped`` and ``groups_differ``.
:func:`group_aligned_split` says where a row-parallel split would have to cut to keep a group size.

Sweeps: :func:`quantize_compiled` quantizes a copy of a compiled float model (no second capture).
Save and load: ``fxopt/quantized_io.py``. Docs: ``docs/quantization.md``.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import PassError
from ..ir import is_op, module_path
from ..kernels import quant  # noqa: F401 - registers torch.ops.fxopt.quant_linear
from ..kernels.quant import QMAX, dequantize_weight, n_groups, quant_linear_reference, quantize_weight
from ..verify import rel_error
from ..verify import tolerance as verify_tolerance
from .base import CompileContext, Pass, PassResult, register_pass
from .canonicalize import getattr_path
from .fold_linear import fold_by_options, unfold_linears
from .prefetch import retarget

aten = torch.ops.aten
QUANT_LINEAR = torch.ops.fxopt.quant_linear.default
LINEARS = (aten.linear.default, QUANT_LINEAR, torch.ops.fxopt.linear.default)
EMBEDDINGS = (aten.embedding.default,)
DEFAULT_BITS = 8
DEFAULT_GROUP_SIZE = 128
TP_GROUP_MODES = ("align", "local", "error")  # quant_tp_groups: see tp_group_size
MIN_ALIGNED_GROUP = 16  # "align" shrinks a group no further than this (then: groups differ, reported)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantOptions:
    bits: int = DEFAULT_BITS
    group_size: int | None = DEFAULT_GROUP_SIZE  # None: one group per whole row
    lm_head: bool = False
    include: tuple = ()
    exclude: tuple = ()
    placeholders: bool = False  # plan only: meta placeholders even for real weights (loaders)
    tp_groups: str = "align"  # a row-parallel slice off the unsharded group grid: TP_GROUP_MODES

    @classmethod
    def from_ctx(cls, ctx: CompileContext) -> "QuantOptions":
        bits = ctx.option("quant_bits", DEFAULT_BITS)
        if bits not in QMAX:
            raise PassError(f"quantize: quant_bits must be 8 or 4, got {bits!r}")
        return cls(bits=int(bits), group_size=parse_group_size(ctx.option("quant_group_size", DEFAULT_GROUP_SIZE)),
                   lm_head=bool(ctx.option("quant_lm_head", False)),
                   include=_globs("quant_include", ctx.option("quant_include")),
                   exclude=_globs("quant_exclude", ctx.option("quant_exclude")),
                   placeholders=bool(ctx.option("quant_placeholders", False)),
                   tp_groups=_tp_groups(ctx.option("quant_tp_groups", "align")))

    @property
    def group_label(self):
        """The group size as the report shows it: an int, or ``"row"``."""
        return "row" if self.group_size is None else self.group_size


def parse_group_size(value) -> int | None:
    """``quant_group_size`` → a positive int, or None for whole rows (``None`` / ``"row"``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("row", "rows", "none")):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or isinstance(value, float) and value != int(value) or size <= 0:
        raise PassError(f"quantize: quant_group_size must be a positive int (32, 64, 128, ...) or 'row', "
                        f"got {value!r}")
    return size


def _tp_groups(value) -> str:
    if value not in TP_GROUP_MODES:
        raise PassError(f"quantize: quant_tp_groups must be one of {', '.join(map(repr, TP_GROUP_MODES))}, "
                        f"got {value!r}")
    return value


def _globs(name: str, value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    value = tuple(value)
    if not all(isinstance(g, str) for g in value):
        raise PassError(f"quantize: {name} must be a list of parameter-name globs, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Which linears
# ---------------------------------------------------------------------------------------------


def head_linears(gm: fx.GraphModule) -> set[fx.Node]:
    """Linears that are heads (see the module docstring), decided from the dataflow alone."""
    graph = gm.graph
    output = graph.output_node()
    linear_below: dict[fx.Node, bool] = {}
    reaches_output: dict[fx.Node, bool] = {}
    for node in reversed(graph.nodes):
        linear_below[node] = any(is_op(u, *LINEARS) or linear_below.get(u, False) for u in node.users)
        reaches_output[node] = node is output or any(reaches_output.get(u, False) for u in node.users)
    heads = set()
    for node in graph.nodes:
        if not is_op(node, *LINEARS):
            continue
        last = reaches_output[node] and not linear_below[node]
        weight = node.args[1]
        tied = isinstance(weight, fx.Node) and any(is_op(u, *EMBEDDINGS) for u in weight.users)
        if last or tied:
            heads.add(node)
    return heads


def weight_names(wnode: fx.Node) -> list[str]:
    """The original parameter names behind a weight node (several for a concatenated weight)."""
    sources = wnode.meta.get("param_sources")
    if sources:
        return list(dict.fromkeys(entry[0] for entry in sources if entry[0] is not None))
    return [wnode.meta.get("param", wnode.target)]


def _select(opts: QuantOptions, wnode: fx.Node, head: bool) -> str | None:
    """None when the linear is to be quantized, else why not."""
    if head and not opts.lm_head:
        return "head (quant_lm_head=False)"
    names = weight_names(wnode)
    target_matches = lambda globs: any(fnmatch.fnmatchcase(wnode.target, g) for g in globs)  # noqa: E731
    if opts.include and not target_matches(opts.include):
        hits = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in opts.include)]
        if not hits:
            return "not in quant_include"
        if len(hits) != len(names):
            return (f"quant_include matches only {', '.join(hits)} of the concatenated "
                    f"{', '.join(names)}: quantized all or none")
    if opts.exclude:
        if target_matches(opts.exclude):
            return "in quant_exclude"
        hits = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in opts.exclude)]
        if hits:
            return f"in quant_exclude ({', '.join(hits)})" if len(names) > 1 else "in quant_exclude"
    return None


def _linear_args(node: fx.Node):
    args = list(node.args) + [None] * (3 - len(node.args))
    x, w, b = args[:3]
    if "bias" in node.kwargs:
        b = node.kwargs["bias"]
    return x, w, b


def _why_not_quantizable(gm, node: fx.Node) -> str | None:
    _x, w, b = _linear_args(node)
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return "weight is computed, not a get_attr"
    t = getattr_path(gm, w.target)
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
        return f"weight is not a 2-D float tensor ({getattr(t, 'dtype', type(t).__name__)})"
    if b is not None and not (isinstance(b, fx.Node)):
        return "bias is not a tensor node"
    return None


# ---------------------------------------------------------------------------------------------
# Tensor parallelism: groups of a row-parallel slice
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TPGroups:
    """How the groups of one rank's slice of a row-parallel weight relate to the unsharded model's.

    ``ranges``: the input features ``[start, end)`` of the full weight this rank holds, in local
    column order; ``size``: the full weight's in-features; ``requested``: the group size asked for
    (a whole row: ``size``); ``group_size``: the one used; ``status``: ``"aligned"`` (the
    requested groups lie on the unsharded grid), ``"regrouped"`` (``quant_tp_groups="align"``
    shrank them to a divisor that does) or ``"differ"`` (this rank's groups are not groups of the
    unsharded model; ``reason`` says why).
    """

    ranges: tuple
    size: int | None
    requested: int
    group_size: int
    status: str
    reason: str = ""

    @property
    def slice_label(self) -> str:
        cols = ", ".join(f"{s}:{e}" for s, e in self.ranges)
        return f"columns {cols} of {self.size}" if self.size else f"columns {cols}"


def input_feature_slices(wnode: fx.Node) -> tuple[list[tuple], int | None] | None:
    """The input features of the full weight that a tensor-parallel local weight holds, from
    ``shard``'s provenance (``meta['param_sources']`` entries ``(name, first row, end row,
    Slice(1, start, end, size))``): ``(blocks, size)``, one tuple of ``(start, end)`` ranges per
    block of rows (one block unless ``fuse`` concatenated sliced weights), in local column order.
    None when the weight is not split along its input features (column-parallel, replicated)."""
    blocks: dict = {}
    sizes = set()
    for entry in wnode.meta.get("param_sources") or ():
        sl = entry[3] if len(entry) > 3 else None
        if sl is not None and getattr(sl, "dim", None) == 1:
            blocks.setdefault((entry[1], entry[2]), []).append((int(sl.start), int(sl.end)))
            sizes.add(sl.size)
    if not blocks:
        return None
    size = sizes.pop() if len(sizes) == 1 else None
    return [tuple(r) for r in blocks.values()], (int(size) if size is not None else None)


def tp_group_size(wnode: fx.Node, in_features: int, group_size: int | None, mode: str = "align") -> TPGroups | None:
    """The group size for one rank's slice of a weight split along its input features (a
    row-parallel linear after ``shard``), or None for a weight that is not.

    The unsharded model's groups are ``[k·g, (k+1)·g)`` of the full in-features (``g``: the
    requested size, at most the row). A rank's local groups start at its first column, so they
    are groups of that grid exactly when every cut of the split is a multiple of ``g``. The split
    is equal (``shard``: every rank holds ``d`` columns at multiples of ``d``), so that is
    ``d % g == 0``, with ``d`` the gcd of this rank's slice starts and widths — the same on every
    rank, so all ranks decide alike (the slice start alone would not do: rank 0 always starts at 0).
    Otherwise, by ``mode`` (``quant_tp_groups``):

    - ``"align"`` (default): groups of ``gcd(g, d)``, the largest divisor of ``g`` on which every
      cut falls: the rank's quantization is then exactly a slice of the unsharded model's at that
      group size, and never less accurate than the requested one (each smaller group lies inside
      one requested group, so its scale, the step, is no larger), for more scales: SmolLM2's
      o_proj (576 in-features) at tp=3, g=128: 192 a rank → groups of 64. When that would be below
      ``MIN_ALIGNED_GROUP`` (16; or below ``g`` when ``g`` is smaller) the requested size is kept
      and the layer reported as ``"differ"``.
    - ``"local"``: keep ``g``, report ``"differ"``: this rank's groups start at its first column
      (same compression, an accuracy close to the unsharded one, but not equal to it).
    - ``"error"``: raise :class:`PassError` naming the weight.
    """
    found = input_feature_slices(wnode)
    if found is None:
        return None
    blocks, size = found
    ranges = tuple(r for block in blocks for r in block)
    requested = group_size if group_size is not None else (size or in_features)
    as_is = in_features if group_size is None else group_size  # what quantizing the local weight alone uses

    def result(status, used, reason=""):
        return TPGroups(ranges, size, requested, used, status, reason)

    if any(sum(e - s for s, e in block) != in_features for block in blocks):
        return result("differ", as_is, f"the local weight's {in_features} columns are not just its slices "
                                       f"({', '.join(f'{s}:{e}' for s, e in ranges)}): padded")
    g = min(requested, size) if size else requested
    d = 0
    for start, end in ranges:
        d = math.gcd(d, start, end - start)
    if d % g == 0:
        return result("aligned", as_is if g == requested else g)
    label = f"{wnode.target} holds input features {', '.join(f'{s}:{e}' for s, e in ranges)}" + (
        f" of {size}" if size else "")
    aligned = math.gcd(g, d)
    if mode == "error":
        raise PassError(f"quantize: {label} (a row-parallel slice): groups of {g} do not line up with the unsharded "
                        f"model's, the cuts fall every {d} features. quant_tp_groups='align' quantizes it with groups "
                        f"of {aligned} (a divisor of {g} that keeps the grid), 'local' keeps {g} on this rank's "
                        f"columns; or choose a group size dividing {d}")
    if mode == "local":
        return result("differ", as_is, f"quant_tp_groups='local': groups of {g} from this rank's first column, "
                                       f"the cuts fall every {d} features")
    floor = min(MIN_ALIGNED_GROUP, g)
    if aligned < floor:
        return result("differ", as_is, f"keeping the unsharded grid would take groups of {aligned} "
                                       f"(< {floor}): groups of {g} from this rank's first column")
    return result("regrouped", aligned, f"groups of {g} do not line up with the cuts (every {d} features): "
                                        f"groups of {aligned} keep the unsharded grid")


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


@register_pass("quantize")
class Quantize(Pass):
    name = "quantize"

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        opts = QuantOptions.from_ctx(ctx)
        graph = gm.graph
        # A graph that went through fold_linear already: its fxopt.linear nodes back to plain
        # linears, folded again at the end around whatever stays float. (Put quantize before
        # fold_linear and this does not happen: node names, and so verify's reports, stay put.)
        unfolded = unfold_linears(gm)
        heads = head_linears(gm)
        chosen, kept = [], []
        for node in list(graph.nodes):
            if not is_op(node, aten.linear.default):
                continue
            head = node in heads
            reason = _why_not_quantizable(gm, node) or _select(opts, _linear_args(node)[1], head)
            if reason is None:
                chosen.append(node)
            else:
                w = _linear_args(node)[1]
                kept.append({"name": w.target if isinstance(w, fx.Node) else str(w), "module": module_path(node),
                             "node": node.name, "head": head, "reason": reason})

        placeholders = opts.placeholders or any(
            getattr_path(gm, _linear_args(n)[1].target).is_meta for n in chosen)
        # the float graph's view of every chosen linear first (all float weights still there) ...
        seen, note = {}, None
        if chosen and placeholders:
            note = "weights not loaded (meta device or quant_placeholders): no accuracy measured"
        elif chosen:
            seen, note = _record(gm, ctx, chosen)
        # ... then one linear at a time: quantize, measure, rewrite, drop the float weight
        table = []
        for node in chosen:
            wnode = _linear_args(node)[1]
            w = getattr_path(gm, wnode.target)
            out_f, in_f = w.shape
            tp = tp_group_size(wnode, int(in_f), opts.group_size, opts.tp_groups)
            g = tp.group_size if tp is not None else (in_f if opts.group_size is None else opts.group_size)
            if placeholders:
                q_cols = in_f if opts.bits == 8 else -(-in_f // 2)
                q = torch.empty(out_f, q_cols, dtype=torch.int8 if opts.bits == 8 else torch.uint8, device="meta")
                s = torch.empty(out_f, n_groups(in_f, g), dtype=w.dtype, device="meta")
            else:
                with torch.no_grad():
                    q, s = quantize_weight(w.detach(), g, opts.bits)
            row = self._row(node, w, q, s, in_f, g, opts, node in heads, tp)
            if not placeholders:
                _measure(row, w, q, s, seen.pop(node, None))
            del w
            self._rewrite(gm, node, q, s, in_f, g, opts, row)
            table.append(row)

        if unfolded:
            fold_by_options(gm, ctx)
        stats = self._stats(table, kept, opts, placeholders)
        if ctx.info is not None:
            ctx.info.state["quantize"] = {
                "bits": opts.bits, "group_size": opts.group_label, "lm_head": opts.lm_head,
                "include": list(opts.include), "exclude": list(opts.exclude), "placeholders": placeholders,
                "layers": table, "kept_float": kept, "note": note, "tp_groups": opts.tp_groups,
                "regrouped": [r["name"] for r in table if r["tp_groups"] == "regrouped"],
                "groups_differ": [{"name": r["name"], "slice": r["tp_slice"], "group_size": r["group_size"],
                                   "reason": r["tp_note"]} for r in table if r["tp_groups"] == "differ"]}
        return PassResult(changed=bool(chosen), stats=stats)

    def tolerance(self, dtype, ctx: CompileContext) -> float | None:
        """What ``verify=True`` accepts from quantization: see :func:`verify_bound`."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            return None
        return verify_bound(ctx, dtype)

    # -- the table ------------------------------------------------------------------------
    @staticmethod
    def _row(node, w, q, s, in_f, g, opts, head, tp=None) -> dict:
        wnode = _linear_args(node)[1]
        return {
            "name": wnode.target, "module": module_path(node), "node": node.name,
            "sources": list(wnode.meta.get("param_sources") or []) or None,
            "out_features": int(w.shape[0]), "in_features": int(in_f), "group_size": int(g), "bits": opts.bits,
            "n_groups": n_groups(in_f, g), "head": head,
            "weight_rel_err": None, "output_rel_err": None,
            "float_bytes": w.numel() * w.element_size(),
            "quant_bytes": q.numel() * q.element_size() + s.numel() * s.element_size(),
            "bf16_bytes": w.numel() * 2,
            "qweight": None, "scales": None,
            # a row-parallel slice (shard): its input features, and whether its groups are the unsharded
            # model's ("aligned", "regrouped": see tp_group_size) or not ("differ", with the reason)
            "tp_slice": tp.slice_label if tp is not None else None,
            "tp_groups": tp.status if tp is not None else None,
            "requested_group_size": tp.requested if tp is not None else None,
            "tp_note": tp.reason if tp is not None and tp.reason else None,
        }

    # -- the rewrite ----------------------------------------------------------------------
    @staticmethod
    def _rewrite(gm, node, q, s, in_f, g, opts, row) -> None:
        graph = gm.graph
        x, wnode, bias = _linear_args(node)
        owner_path, leaf = wnode.target.rpartition(".")[::2]
        owner = gm.get_submodule(owner_path) if owner_path else gm
        qname, sname = _buffer_names(owner, leaf)
        owner.register_buffer(qname, q)
        owner.register_buffer(sname, s)
        prefix = f"{owner_path}." if owner_path else ""
        row["qweight"], row["scales"] = prefix + qname, prefix + sname
        with graph.inserting_before(node):
            qnode = graph.get_attr(prefix + qname)
            snode = graph.get_attr(prefix + sname)
            new = graph.call_function(QUANT_LINEAR, (x, qnode, snode, bias, g, opts.bits, in_f))
        for role, n in (("qweight", qnode), ("scales", snode)):
            n.meta["quant"] = {"of": wnode.target, "role": role, "group_size": g, "bits": opts.bits,
                               "in_features": in_f}
            for key in ("param", "param_sources", "param_transform", "param_transforms"):
                if key in wnode.meta:
                    n.meta[key] = wnode.meta[key]
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        note = dict(node.meta.get("fxopt") or {})
        note["quant"] = f"int{opts.bits} g{g}" if g != in_f or opts.group_size is not None else f"int{opts.bits} row"
        if row["weight_rel_err"] is not None:
            note["w_err"] = f"{row['weight_rel_err']:.2e}"
        if row["output_rel_err"] is not None:
            note["out_err"] = f"{row['output_rel_err']:.2e}"
        if row["tp_groups"] in ("regrouped", "differ"):
            note["tp_groups"] = (f"g{row['requested_group_size']}→g{g}" if row["tp_groups"] == "regrouped"
                                 else f"differ ({row['tp_slice']})")
        new.meta["fxopt"] = note
        row["node"] = new.name  # the quant_linear node in the final graph (and the dumps)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        retarget(wnode, qnode)  # an attention that prefetched W into L2 now prefetches the qweight
        if not wnode.users:
            target = wnode.target
            graph.erase_node(wnode)
            if not any(n.target == target for n in graph.find_nodes(op="get_attr")):
                _delete_attr(gm, target)

    # -- stats ----------------------------------------------------------------------------
    @staticmethod
    def _stats(table, kept, opts, placeholders) -> dict:
        stats = {"quantized": len(table), "bits": opts.bits, "group_size": opts.group_label}
        if kept:
            stats["kept_float"] = len(kept)
        for status in ("regrouped", "groups_differ"):
            n = sum(r["tp_groups"] == status.replace("groups_", "") for r in table)
            if n:
                stats[status] = n
        if not table:
            return stats
        mib = 2 ** 20
        stats["weight_MiB_before"] = round(sum(r["float_bytes"] for r in table) / mib, 2)
        stats["weight_MiB_after"] = round(sum(r["quant_bytes"] for r in table) / mib, 2)
        if placeholders:
            stats["placeholders"] = len(table)
            return stats
        w = [r for r in table if r["weight_rel_err"] is not None]
        o = [r for r in table if r["output_rel_err"] is not None]
        if w:
            stats["max_weight_rel_err"] = f"{max(r['weight_rel_err'] for r in w):.2e}"
        if o:
            worst = max(o, key=lambda r: r["output_rel_err"])
            stats["max_output_rel_err"] = f"{worst['output_rel_err']:.2e}"
            stats["worst"] = worst["name"]
        return stats


# ---------------------------------------------------------------------------------------------
# What verify=True accepts
# ---------------------------------------------------------------------------------------------

#: How much larger than one layer's expected weight error (layer_error_estimate) the relative
#: error of a model output may be under verify=True. Measured on the capture's example inputs
#: (random ids, [2, 7]; fp32, torch 2.13 CPU, 2026-11-28), logits error / layer_error_estimate at
#: the largest group used:
#:
#:   tiny llama / mistral / gpt2 / opt (tests/families.py, 2 blocks, in-features 48 and 80),
#:   INT8 and INT4, groups 32 / 64 / 128 / row, LM head float or quantized:
#:     llama 3.3-3.7, mistral 2.9-3.4, gpt2 2.0-2.9, opt 1.8-2.2
#:     (e.g. llama INT8 g32 + head: 2.18e-2 against 5.98e-3; INT4 g32 + head: 0.400 against 0.108)
#:   SmolLM2-135M (30 blocks, in-features 576 and 1536, real weights with heavier tails):
#:     INT8 g64 2.62e-2 (4.0), g128 2.48e-2 (3.5), row 3.49e-2 (4.0);
#:     INT4 g64 0.237 (2.0), g128 0.232 (1.8), row 0.264 (1.7)
#:
#: 6 leaves 1.5x above the worst of those (SmolLM2 INT8 g64 and row, the tiny llama). The bounds
#: it gives: INT8 0.036 (g32), 0.039 (g64), 0.042 (g128), 0.052 (rows of 1536); INT4 0.65, 0.71,
#: 0.77, 0.95. At INT8 that is tight enough to catch one layer gone wrong (one layer's scales 1.5x
#: too large: 0.18-0.29 on the tiny models' logits; tests/test_quantize.py); at INT4, where rounding alone
#: moves the logits by a quarter, it only catches gross errors (a wrong packing or scale layout:
#: ≈ 1, the error of unrelated logits being ≈ 1.4). quant_verify_tolerance overrides it.
VERIFY_AMPLIFICATION = 6.0


def layer_error_estimate(bits: int, group_size: int) -> float:
    """The expected relative error ``‖W − deq(Q)‖ / ‖W‖`` of symmetric round-to-nearest with
    groups of ``group_size`` for a Gaussian weight: a uniform quantizer's rounding error is
    step / √12, the step is max|w| / qmax over a group, and the largest of g Gaussian values is
    about σ·√(2 ln g). INT8: 6.0e-3 (g32), 6.6e-3 (g64), 7.1e-3 (g128); INT4: 0.11, 0.12, 0.13."""
    g = max(int(group_size), 2)
    return math.sqrt(2 * math.log(g)) / (QMAX[bits] * math.sqrt(12))


def verify_bound(ctx: CompileContext, dtype: torch.dtype) -> float:
    """The relative error of a model output that ``verify=True`` accepts from ``quantize``.

    ``quant_verify_tolerance`` (a float) overrides it; otherwise
    ``VERIFY_AMPLIFICATION × layer_error_estimate(bits, g) + fxopt.verify.tolerance(dtype)``
    with ``g`` the largest group the pass used (a whole row: its in-features; without a run,
    the option). Why 6×: see ``VERIFY_AMPLIFICATION``.
    """
    override = ctx.option("quant_verify_tolerance")
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, (int, float)) or not override > 0:
            raise PassError(f"quantize: quant_verify_tolerance must be a positive number, got {override!r}")
        return float(override)
    opts = QuantOptions.from_ctx(ctx)
    state = getattr(ctx.info, "state", {}).get("quantize") if ctx.info is not None else None
    groups = [min(r["group_size"], r["in_features"]) for r in (state or {}).get("layers", ())]
    g = max(groups) if groups else (opts.group_size or 4096)
    return VERIFY_AMPLIFICATION * layer_error_estimate(opts.bits, g) + verify_tolerance(dtype)


def _record(gm, ctx, chosen) -> tuple[dict, str | None]:
    """Run the float graph once on the example inputs; per chosen linear, (input, bias, output).
    Returns the records and a note when they could not be made (errors then stay unmeasured)."""
    info = ctx.info
    if info is None or not info.example_inputs:
        return {}, "no example inputs: output errors not measured"
    inputs = pytree.tree_leaves(((), info.example_inputs))
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs):
        return {}, "example inputs on the meta device: output errors not measured"
    if _collectives(gm) and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {}, ("one rank's graph planned without a process group (tp, rank=): it cannot run its collectives, "
                    "output errors not measured")
    recorder = _LinearRecorder(gm, set(chosen))
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as e:  # noqa: BLE001 - the report says so; quantization itself goes on
        return {}, f"output errors not measured: the graph failed on the example inputs ({type(e).__name__}: {e})"
    return recorder.seen, None


def _collectives(gm) -> bool:
    """Does the graph run collectives (``shard``'s all-reduces and gathers)?"""
    return any(n.op == "call_function" and (str(n.target).startswith("_c10d_functional.")
                                            or "all_reduce" in str(n.target)) for n in gm.graph.nodes)


def _measure(row: dict, w, q, s, seen) -> None:
    """The weight error, and the output error on the recorded input (see the module docstring)."""
    g, bits, in_f = row["group_size"], row["bits"], row["in_features"]
    with torch.no_grad():
        wf = w.detach().float()
        deq = dequantize_weight(q, s, g, bits, in_f, torch.float32)
        row["weight_rel_err"] = float(torch.linalg.vector_norm(wf - deq) / torch.linalg.vector_norm(wf).clamp_min(1e-30))
        del wf, deq
        if seen is not None:
            x, bias, ref = seen
            row["output_rel_err"] = rel_error(quant_linear_reference(x, q, s, bias, g, bits, in_f), ref)


class _LinearRecorder(fx.Interpreter):
    """Runs the graph and keeps, for the linears asked for, (input, bias, output)."""

    def __init__(self, gm, targets: set):
        super().__init__(gm, garbage_collect_values=True)
        self.targets = targets
        self.seen = {}

    def run_node(self, node):
        result = super().run_node(node)
        if node in self.targets:
            x, _w, b = _linear_args(node)
            bias = self.env[b] if isinstance(b, fx.Node) else None
            self.seen[node] = (self.env[x], bias, result)
        return result


def _buffer_names(owner: torch.nn.Module, leaf: str) -> tuple[str, str]:
    """``weight`` → ``qweight``/``scales``; ``fused_q_proj_k_proj_v_proj_weight`` →
    ``fused_q_proj_k_proj_v_proj_qweight``/``..._scales``; anything else gets a suffix."""
    if leaf == "weight":
        base = ("qweight", "scales")
    elif leaf.endswith("_weight"):
        stem = leaf[: -len("weight")]
        base = (f"{stem}qweight", f"{stem}scales")
    else:
        base = (f"{leaf}_qweight", f"{leaf}_scales")
    names, i = base, 1
    while any(hasattr(owner, n) for n in names):
        i += 1
        names = (f"{base[0]}_{i}", f"{base[1]}_{i}")
    return names


def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    *parents, leaf = target.split(".")
    owner = gm
    for part in parents:
        owner = getattr(owner, part)
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)


# ---------------------------------------------------------------------------------------------
# Quantizing a compiled float model again and again (sweeps)
# ---------------------------------------------------------------------------------------------


def quantize_compiled(compiled, passes=("quantize", "dce"), **options):
    """A quantized copy of a compiled *float* model, without capturing it again.

    The graph is copied (the float tensors are shared, not copied; the KV cache is fresh) and
    ``passes`` run on the copy with the original compile options updated by ``options``::

        base = fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", "dce"])
        for bits, group in [(8, 64), (8, 128), (4, 64)]:
            q = quantize_compiled(base, quant_bits=bits, quant_group_size=group)
            print(bits, group, quant_report(q)[0]["output_rel_err"])

    ``compiled`` is left as it was. Its report rows come first in the copy's report.
    """
    import copy
    import dataclasses

    from ..runtime.compiled import CompiledModel
    from .base import CompileContext
    from .manager import PassManager, Report

    gm, info = compiled.graph_module, compiled.info
    if "quantize" in info.state:
        raise PassError("quantize_compiled: the model is quantized already; start from a float compilation")
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    caches = {name for pair in (info.state.get("kv_cache") or {}).get("layers", ()) for name in pair}
    attrs = {n.target: getattr_path(gm, n.target) for n in gm.graph.find_nodes(op="get_attr")}
    new = fx.GraphModule({k: torch.zeros_like(v) if k in caches else v for k, v in attrs.items()}, graph)
    for name in caches:  # state, as in the original: not part of the state dict
        owner_path, leaf = name.rpartition(".")[::2]
        (new.get_submodule(owner_path) if owner_path else new)._non_persistent_buffers_set.add(leaf)
    new.meta = dict(gm.meta)
    new_info = dataclasses.replace(info, state=copy.deepcopy(info.state))
    new.meta["fxopt"] = new_info
    ctx = CompileContext(info=new_info, options={**compiled.ctx.options, **options})
    manager = PassManager(list(passes))
    new = manager.run(new, ctx)
    return CompiledModel(new, Report(list(compiled.report()) + list(manager.report)), ctx)


# ---------------------------------------------------------------------------------------------
# The report, and tensor parallelism
# ---------------------------------------------------------------------------------------------


def quant_report(compiled) -> list[dict]:
    """The per-layer table of a compiled model's ``quantize`` pass (``[]`` if it has none).

    One dict per quantized linear: ``name`` (weight target), ``module``, ``node``, ``sources``
    (parameter rows of a concatenated weight), ``out_features``, ``in_features``, ``group_size``,
    ``n_groups``, ``bits``, ``head``, ``weight_rel_err``, ``output_rel_err`` (None when not measured),
    ``float_bytes``, ``quant_bytes``, ``bf16_bytes``, ``qweight``, ``scales`` (buffer targets);
    for a row-parallel slice after ``shard`` (else None): ``tp_slice`` ("columns 192:384 of 576"),
    ``tp_groups`` (``"aligned"``, ``"regrouped"``, ``"differ"``: :class:`TPGroups`),
    ``requested_group_size``, ``tp_note``.
    Linears left in float, and why: ``compiled.info.state['quantize']['kept_float']``; row-parallel
    slices regrouped / whose groups differ from the unsharded model's: ``...['regrouped']``,
    ``...['groups_differ']``.
    """
    info = getattr(compiled, "info", None)
    if info is None and isinstance(compiled, fx.GraphModule):
        info = compiled.meta.get("fxopt")
    state = getattr(info, "state", {}).get("quantize") if info is not None else None
    return list(state["layers"]) if state else []


def format_quant_report(rows: list[dict]) -> str:
    """The per-layer table as text (what ``examples/quantize.py`` prints)."""
    head = f"{'weight':<58} {'shape':>12} {'bits':>4} {'group':>5} {'w err':>9} {'out err':>9}"
    lines = [head, "-" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
    for r in rows:
        lines.append(f"{r['name'][-58:]:<58} {r['out_features']:>5}x{r['in_features']:<6} {r['bits']:>4} "
                     f"{r['group_size']:>5} {fmt(r['weight_rel_err']):>9} {fmt(r['output_rel_err']):>9}")
    return "\n".join(lines)


@dataclass(frozen=True)
class GroupSplit:
    """A row-parallel split of ``in_features`` into ``parts`` that falls on group boundaries.

    ``bounds[i]``: the input features ``[start, end)`` of part ``i`` (columns of W, of qweight for
    INT8, ``start//2 : end//2`` bytes for INT4); ``groups[i]``: its scale columns ``[start, end)``.
    ``even``: every part has the same width (the plain ``in_features / parts`` split is aligned).
    """

    in_features: int
    group_size: int
    parts: int
    bounds: tuple
    groups: tuple
    even: bool

    @property
    def widths(self) -> tuple:
        return tuple(e - s for s, e in self.bounds)


def group_aligned_split(in_features: int, group_size, parts: int, bits: int = 8) -> GroupSplit:
    """Where a row-parallel (input-feature) split of a quantized weight may cut.

    The rule: a cut must fall on a group boundary (a multiple of ``group_size``), so that every
    group, and so every scale, belongs to one part; each part then holds whole groups and its
    scales are a contiguous slice of scale columns. For INT4 a cut must also fall between bytes
    (an even feature index). When ``in_features / parts`` is a multiple of the group size the
    parts are equal (``even=True``); otherwise the cuts go to the group boundaries nearest the
    equal split (uneven parts, still exact). Raises ``ValueError`` when no aligned split exists
    (fewer groups than parts, e.g. whole-row groups): quantize each shard separately then, with a
    group size that divides ``in_features / parts`` (see :func:`aligned_group_size`).

    A column-parallel split (output features, the rows of W) is always aligned: qweight and
    scales rows split together.
    """
    g = in_features if parse_group_size(group_size) is None else parse_group_size(group_size)
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    groups = n_groups(in_features, g)
    if parts > groups:
        raise ValueError(f"cannot split {in_features} input features into {parts} parts on group boundaries: "
                         f"there are only {groups} group(s) of {g}; use a group size that divides "
                         f"{in_features}/{parts} (e.g. {aligned_group_size(in_features, parts)})")
    if bits == 4 and g % 2 and parts > 1:
        raise ValueError(f"INT4 packs two features a byte: group size {g} is odd, so a group boundary can fall "
                         "inside a byte")
    if in_features % parts == 0 and (in_features // parts) % g == 0:
        per = in_features // parts // g
        cuts = [i * per for i in range(parts + 1)]
    else:
        cuts = [0]
        for i in range(1, parts):
            k = round(i * in_features / (parts * g))
            k = min(max(k, cuts[-1] + 1), groups - (parts - i))
            cuts.append(k)
        cuts.append(groups)
    bounds = tuple((c * g, min(d * g, in_features)) for c, d in zip(cuts, cuts[1:]))
    widths = {e - s for s, e in bounds}
    return GroupSplit(in_features, g, parts, bounds, tuple(zip(cuts, cuts[1:])), len(widths) == 1)


def aligned_group_size(in_features: int, parts: int, candidates=(128, 64, 32, 16)) -> int | None:
    """The largest candidate group size for which an equal ``parts``-way row split is aligned."""
    if in_features % parts:
        return None
    width = in_features // parts
    return next((g for g in candidates if width % g == 0), None)


__all__ = ["Quantize", "QuantOptions", "GroupSplit", "TPGroups", "aligned_group_size", "format_quant_report",
           "quantize_compiled", "group_aligned_split", "head_linears", "input_feature_slices", "layer_error_estimate",
           "parse_group_size", "quant_report", "tp_group_size", "verify_bound"]
