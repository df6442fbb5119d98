"""``fuse``: find normalization, rotary and MLP subgraphs by pattern; replace them by fxopt ops.

In order:

a. **concatenated linears** — linears that read the same input node, with ``get_attr`` weights of
   one dtype, become one linear over the weights concatenated once, here, at compile time, then
   ``split_with_sizes`` into the original outputs (q/k/v; gate/up). Biases are concatenated too;
   a linear without a bias in a group where others have one gets zero rows (exact: ``+ 0``). The
   new ``get_attr`` nodes record where their rows come from: ``meta['param_sources'] =
   [(parameter name, first row, end row), ...]`` (``None`` for zero rows), for checkpoint loading
   and quantization. The old weights die in ``dce``.
b. **norms** — RMSNorm as transformers spells it (fp32 upcast, rsqrt, cast back, times weight) →
   ``fxopt.rms_norm``; with the residual add before it → ``fxopt.add_rms_norm`` returning (y, sum),
   the sum feeding the residual stream. ``aten.layer_norm`` → ``fxopt.layer_norm`` /
   ``fxopt.add_layer_norm`` the same way. A reshape between the add and the norm that keeps the
   last dim (OPT flattens tokens) is folded: the fused op runs on the add's shape, both results are
   reshaped.
c. **rotary** — ``x * cos + rotate_half(x) * sin`` on q and on k, sharing cos/sin ([B, S, D],
   unsqueezed at dim 1) → ``fxopt.rotary(q, k, cos, sin)``.
d. **activations** — ``act(gate) * up`` over the two halves of a concatenated gate/up linear →
   ``fxopt.gated_act(gate_up, kind)``; a plain activation right after a linear → ``fxopt.act``.
   ``kind``: silu, gelu, gelu_tanh (``F.gelu(approximate='tanh')`` or GPT-2's ``gelu_new`` spelled
   out in ATen), relu.
e. attention is ``kv_cache``'s business: an SDPA left in the graph stays as it is. But a
   ``fxopt.rotary`` whose two results only feed one ``fxopt.cached_attention`` as its q and k,
   with cos/sin of q's dtype, is **folded into it** (``cached_attention(..., cos, sin)``): at
   decode the attention kernel rotates q and the new k itself, one kernel a layer less.

The pass after it, ``fold_linear``, folds the norms, gated activations and residual adds it made
into the linears around them.

Everything is decided from the dataflow; names only label the report. User patterns
(``fxopt.patterns.register_pattern``) run after the built-in ones (``first=True``: before all).
Option ``fuse_skip=[...]``: names of patterns (or ``"concat"``) to leave out.

Stats: per pattern how many fired, and ``near_miss``: the best failed attempt of each pattern that
got far, e.g. ``rotary: matched 6 of 16 nodes; stopped at aten.slice in model.layers.0.self_attn
(argument 'step' is 2, expected 1)``; the stop node carries it in ``meta['fxopt']`` for the dumps.
"""
from __future__ import annotations

import inspect
import math
import operator
from collections import Counter, defaultdict

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import kernels  # noqa: F401 - registers torch.ops.fxopt.*
from ..ir import complete_meta, is_op, shape_of
from ..patterns import Pattern, annotate_near_miss, example, infer_meta, registered_patterns, rewrite
from .base import CompileContext, Pass, PassResult, register_pass
from .canonicalize import getattr_path

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt
ATTENTION = (aten.scaled_dot_product_attention.default, torch.ops.fxopt.cached_attention.default)


def _dims(node) -> list[str]:
    """A node's shape as strings, so symbolic dims compare (``s44 == s44``)."""
    return [str(d) for d in shape_of(node) or ()]


# ---------------------------------------------------------------------------------------------
# a. Concatenated linears
# ---------------------------------------------------------------------------------------------


def _param(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The plain tensor a get_attr node reads (None for anything else, e.g. packed weights)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    t = getattr_path(gm, node.target)
    return t if type(t) in (torch.Tensor, torch.nn.Parameter) else None


def _concat_key(gm: fx.GraphModule, lin: fx.Node, x: fx.Node):
    """What a linear reading ``x`` must share with the others to be concatenated; None: it can't."""
    if not is_op(lin, aten.linear.default) or lin.args[0] is not x or lin.kwargs:
        return None
    w = _param(gm, lin.args[1])
    bias = lin.args[2] if len(lin.args) > 2 else None
    b = _param(gm, bias) if bias is not None else None
    if w is None or w.dim() != 2 or (bias is not None and (b is None or b.dim() != 1 or b.dtype != w.dtype)):
        return None
    return (w.dtype, w.device, w.shape[1])


def concat_linears(gm: fx.GraphModule) -> Counter:
    """Fuse every group of linears that read one node (see the module docstring); count by label."""
    counts = Counter()
    for x in list(gm.graph.nodes):
        groups = defaultdict(list)
        for user in list(x.users):
            key = _concat_key(gm, user, x)
            if key is not None:
                groups[key].append(user)
        for linears in groups.values():
            if len(linears) > 1:
                counts[_concat(gm, sorted(linears))] += 1
    return counts


def _concat(gm: fx.GraphModule, linears: list[fx.Node]) -> str:
    graph = gm.graph
    weights = [lin.args[1] for lin in linears]
    biases = [lin.args[2] if len(lin.args) > 2 else None for lin in linears]
    rows = [_param(gm, w).shape[0] for w in weights]
    starts = [sum(rows[:i]) for i in range(len(rows))]
    owner, prefix, leaf = _fused_module(gm, [w.target for w in weights])
    owner.register_parameter(f"{leaf}_weight", torch.nn.Parameter(
        torch.cat([_param(gm, w).detach() for w in weights]), requires_grad=False))
    with_bias = any(b is not None for b in biases)
    if with_bias:
        like = _param(gm, weights[0])
        parts = [_param(gm, b).detach() if b is not None else like.new_zeros(r) for b, r in zip(biases, rows)]
        owner.register_parameter(f"{leaf}_bias", torch.nn.Parameter(torch.cat(parts), requires_grad=False))
    with graph.inserting_before(linears[0]):
        w_node = graph.get_attr(f"{prefix}{leaf}_weight")
        w_node.meta["param_sources"] = [e for w, s, r in zip(weights, starts, rows) for e in _row_sources(w, s, r)]
        transforms = {w.target: w.meta["param_transform"] for w in weights if "param_transform" in w.meta}
        for w in weights:  # a sharded weight records its transform per source
            transforms.update(w.meta.get("param_transforms") or {})
        if transforms:
            w_node.meta["param_transforms"] = transforms
        args = [linears[0].args[0], w_node]
        if with_bias:
            b_node = graph.get_attr(f"{prefix}{leaf}_bias")
            b_node.meta["param_sources"] = [e for b, s, r in zip(biases, starts, rows)
                                            for e in (_row_sources(b, s, r) if b is not None else [(None, s, s + r)])]
            args.append(b_node)
        fused = graph.call_function(aten.linear.default, tuple(args))
        split = graph.call_function(aten.split_with_sizes.default, (fused, rows, -1))
        outs = [graph.call_function(operator.getitem, (split, i)) for i in range(len(linears))]
    stack = _common_stack(linears)
    for node in [w_node, *args[2:], fused]:
        infer_meta(gm, node)
    fused.meta["nn_module_stack"] = split.meta["nn_module_stack"] = stack
    split.meta["val"] = [lin.meta.get("val") for lin in linears]  # the pieces are what the linears made
    for lin, out in zip(linears, outs):
        out.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
        out.meta["val"] = lin.meta.get("val")
        lin.replace_all_uses_with(out)
        graph.erase_node(lin)
    label = _label(outs)
    fused.meta["fxopt"] = {"pattern": label}
    return label


def _row_sources(node: fx.Node, start: int, rows: int) -> list[tuple]:
    """Where the ``rows`` rows of ``node``'s tensor come from, placed at ``start`` of a concatenation:
    its own ``param_sources`` shifted (a weight ``shard`` sliced), or the whole parameter."""
    own = node.meta.get("param_sources")
    if own:
        return [(e[0], start + e[1], start + e[2], *e[3:]) for e in own]
    return [(node.meta.get("param", node.target), start, start + rows)]


def _fused_module(gm: fx.GraphModule, targets: list[str]) -> tuple[torch.nn.Module, str, str]:
    """Where the concatenated weight lives: the modules' common parent, under a name made of the
    parts that differ: ``model.layers.0.self_attn.`` + ``fused_q_proj_k_proj_v_proj`` (+ ``_weight``)."""
    paths = [t.split(".")[:-1] for t in targets]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    rest = ["_".join(p[len(common):]) or "self" for p in paths]
    owner = gm.get_submodule(".".join(common)) if common else gm
    leaf, i = "fused_" + "_".join(rest), 1
    while hasattr(owner, f"{leaf}_weight"):
        i += 1
        leaf = f"fused_{'_'.join(rest)}_{i}"
    return owner, "".join(f"{c}." for c in common), leaf


def _common_stack(nodes: list[fx.Node]) -> dict:
    stacks = [list(n.meta.get("nn_module_stack", {}).items()) for n in nodes]
    common = []
    for entries in zip(*stacks):
        if any(e != entries[0] for e in entries):
            break
        common.append(entries[0])
    return dict(common)


def _downstream(node: fx.Node, depth: int) -> set[fx.Node]:
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
    return seen


def _label(outs: list[fx.Node]) -> str:
    """A name for the report, read off the dataflow: q/k/v feed attention, gate/up meet at a mul."""
    if any(is_op(n, *ATTENTION) for o in outs for n in _downstream(o, 8)):
        return "qkv_concat"
    if len(outs) == 2 and any(is_op(n, aten.mul) for n in _downstream(outs[0], 3) & _downstream(outs[1], 3)):
        return "gate_up_concat"
    return "linear_concat"


# ---------------------------------------------------------------------------------------------
# b. Norms
# ---------------------------------------------------------------------------------------------


def _rms(h, w, eps):
    """transformers' LlamaRMSNorm.forward (Mistral, Qwen2 and most others spell it the same)."""
    dtype = h.dtype
    h = h.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def _layer_norm(h, w, b, eps, d):
    return F.layer_norm(h, (d,), w, b, eps)


def rms_norm(x, w, eps):
    return _rms(x, w, eps)


def add_rms_norm(x, r, w, eps):
    h = x + r
    return _rms(h, w, eps), h


def add_rms_norm_reshaped(x, r, w, eps, shape):
    h = (x + r).reshape(shape)
    return _rms(h, w, eps), h


def layer_norm(x, w, b, eps, d):
    return _layer_norm(x, w, b, eps, d)


def add_layer_norm(x, r, w, b, eps, d):
    h = x + r
    return _layer_norm(h, w, b, eps, d), h


def add_layer_norm_reshaped(x, r, w, b, eps, d, shape):
    h = (x + r).reshape(shape)
    return _layer_norm(h, w, b, eps, d), h


def _norm_ok(m):
    """The weight (and bias) scale the last dim; a residual add adds equal shapes (no broadcast)."""
    d = _dims(m["x"])[-1:]
    for name in ("w", "b"):
        if name in m.bindings and _dims(m[name]) != d:
            return f"{name} has shape {_dims(m[name])}, expected {d}"
    if "r" in m.bindings and _dims(m["x"]) != _dims(m["r"]):
        return f"the residual add broadcasts: {_dims(m['x'])} + {_dims(m['r'])}"
    if "shape" in m.bindings and _dims(m.outputs[1])[-1:] != d:
        return "the reshape between the add and the norm changes the last dim"
    return True


def _emit_norm(op, names):
    """A replacement calling ``op`` on the bound inputs ``names``; a reshaped variant runs the op on
    the add's shape and reshapes both results."""
    def replace(m):
        out = m.call(op, *(m[n] for n in names))
        if "shape" in m.bindings:
            return tuple(m.call(aten.reshape.default, o, m["shape"]) for o in out)
        return out
    return replace


def norm_patterns() -> list[Pattern]:
    # scalar examples must be distinctive: they are found in the captured graph by value
    x, d, eps, shape = example(2, 3, 24), example(24), 1.2345e-5, [6, 24]
    rms_in = dict(x=x, r=x, w=d, eps=eps, shape=shape)
    ln_in = dict(x=x, r=x, w=d, b=d, eps=eps, d=24, shape=shape)
    pick = lambda inputs, fn: {k: inputs[k] for k in inspect.signature(fn).parameters}  # noqa: E731
    add_rms, add_ln = fxopt_ops.add_rms_norm.default, fxopt_ops.add_layer_norm.default
    table = [
        ("add_rms_norm/reshape", add_rms_norm_reshaped, rms_in, add_rms, ("x", "r", "w", "eps")),
        ("add_rms_norm", add_rms_norm, rms_in, add_rms, ("x", "r", "w", "eps")),
        ("rms_norm", rms_norm, rms_in, fxopt_ops.rms_norm.default, ("x", "w", "eps")),
        ("add_layer_norm/reshape", add_layer_norm_reshaped, ln_in, add_ln, ("x", "r", "w", "b", "eps")),
        ("add_layer_norm", add_layer_norm, ln_in, add_ln, ("x", "r", "w", "b", "eps")),
        ("layer_norm", layer_norm, ln_in, fxopt_ops.layer_norm.default, ("x", "w", "b", "eps")),
    ]
    return [Pattern(name, fn, pick(inputs, fn), _emit_norm(op, args), _norm_ok)
            for name, fn, inputs, op, args in table]


# ---------------------------------------------------------------------------------------------
# c. Rotary
# ---------------------------------------------------------------------------------------------


def rotary(q, k, cos, sin, half):
    """transformers' apply_rotary_pos_emb with rotate_half (Llama, Mistral, Qwen2, ...)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x):
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rotary_ok(m):
    q, k, cos, sin = (_dims(m[n]) for n in ("q", "k", "cos", "sin"))
    if len(q) != 4 or len(k) != 4 or len(cos) != 3:
        return f"q/k must be [B, H, S, D] and cos/sin [B, S, D]; got {q}, {k}, {cos}"
    if cos != sin or cos != [q[0], q[2], q[3]] or k[0] != q[0] or k[2:] != q[2:]:
        return f"cos/sin {cos} / {sin} do not fit q {q} and k {k} as [B, S, D]"
    if q[3] != str(2 * m["half"]):
        return f"rotate_half splits at {m['half']}, not at half the head dim {q[3]}"
    return True


def rotary_pattern() -> Pattern:
    inputs = dict(q=example(2, 3, 5, 22), k=example(2, 1, 5, 22), cos=example(2, 5, 22), sin=example(2, 5, 22),
                  half=11)
    return Pattern("rotary", rotary, inputs,
                   lambda m: m.call(fxopt_ops.rotary.default, m["q"], m["k"], m["cos"], m["sin"]), _rotary_ok)


# ---------------------------------------------------------------------------------------------
# d. Activations
# ---------------------------------------------------------------------------------------------


def gelu_new(x):
    """GPT-2's gelu_new (transformers' NewGELUActivation), the tanh approximation spelled out."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = [  # (pattern name suffix, kind of fxopt.act, the function as models write it)
    ("gelu_tanh/spelled", "gelu_tanh", gelu_new),
    ("silu", "silu", F.silu),
    ("gelu", "gelu", F.gelu),
    ("gelu_tanh", "gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("relu", "relu", F.relu),
]


def _gated(act):
    def gated(gate_up, i):
        gate, up = gate_up.split_with_sizes([i, i], -1)
        return act(gate) * up
    return gated


def _plain(act):
    def plain(x):
        return act(x)
    return plain


def _after_linear(m):
    return is_op(m["x"], aten.linear.default) or f"the input %{m['x'].name} is not a linear's output"


def _halves(m):
    return _dims(m["gate_up"])[-1:] == [str(2 * m["i"])] or "gate/up are not two halves of the last dim"


def activation_patterns() -> list[Pattern]:
    patterns = []
    for suffix, kind, act in ACTIVATIONS:
        patterns.append(Pattern(f"gated_act:{suffix}", _gated(act), dict(gate_up=example(2, 3, 74), i=37),
                                lambda m, kind=kind: m.call(fxopt_ops.gated_act.default, m["gate_up"], kind), _halves))
    for suffix, kind, act in ACTIVATIONS:
        patterns.append(Pattern(f"act:{suffix}", _plain(act), dict(x=example(2, 3, 24)),
                                lambda m, kind=kind: m.call(fxopt_ops.act.default, m["x"], kind), _after_linear))
    return patterns


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------

_BUILTIN: list[Pattern] | None = None


def builtin_patterns() -> list[Pattern]:
    """The patterns ``fuse`` applies, in order (captured once per process, on first use)."""
    global _BUILTIN
    if _BUILTIN is None:
        _BUILTIN = norm_patterns() + [rotary_pattern()] + activation_patterns()
    return _BUILTIN


def stat_name(pattern: Pattern) -> str:
    """The report key of a pattern: variants (``add_rms_norm/reshape``) count with their op."""
    return pattern.name.split("/")[0]


def fold_rotary(gm: fx.GraphModule) -> int:
    """Step e: ``cached_attention(rotary(q, k, cos, sin)[0], [1], v, ...)`` →
    ``cached_attention(q, k, v, ..., cos, sin)``; returns how many folded."""
    count = 0
    for attn in list(gm.graph.find_nodes(op="call_function", target=fxopt_ops.cached_attention.default)):
        q_r, k_r = attn.args[:2]
        if len(attn.args) > 8 or attn.kwargs or not all(is_op(a, operator.getitem) for a in (q_r, k_r)):
            continue
        rot = q_r.args[0]
        if not is_op(rot, fxopt_ops.rotary.default) or k_r.args[0] is not rot or (q_r.args[1], k_r.args[1]) != (0, 1):
            continue
        if set(rot.users) != {q_r, k_r} or set(q_r.users) != {attn} or set(k_r.users) != {attn}:
            continue
        q, k, cos, sin = rot.args
        dtypes = {getattr(a.meta.get("val"), "dtype", None) for a in (q, k, cos, sin)}
        if len(dtypes) != 1 or None in dtypes:
            continue  # the rotated values would change dtype: leave the rotary its own op
        window = attn.args[7] if len(attn.args) > 7 else 0
        attn.args = (q, k, *attn.args[2:7], window, cos, sin)
        attn.meta["fxopt"] = {**attn.meta.get("fxopt", {}), "folded": "rotary"}
        for node in (q_r, k_r, rot):
            gm.graph.erase_node(node)
        count += 1
    return count


@register_pass("fuse")
class Fuse(Pass):
    name = "fuse"
    # Every node a rewrite makes gets its value from its arguments' (infer_meta), and what it
    # replaces keeps its own; the graph is propagated again only if one could not be inferred.
    preserves_meta = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        skip = set(ctx.option("fuse_skip", ()) or ())
        steps = [*registered_patterns(first=True), "concat", *builtin_patterns(), *registered_patterns(first=False)]
        fired, misses = Counter(), {}
        for step in steps:
            if step == "concat":
                if "concat" not in skip:
                    fired.update(concat_linears(gm))
                continue
            if step.name in skip or stat_name(step) in skip:
                continue
            found = rewrite(gm, step)
            fired[stat_name(step)] += len(found)
            misses[step.name] = found.near_misses
        if "rotary_into_attention" not in skip:
            fired["rotary_into_attention"] += fold_rotary(gm)
        gm.graph.lint()
        propagated = complete_meta(gm)
        fired = {k: v for k, v in fired.items() if v}
        near = [str(m) for m in self._near_misses(misses)]
        if ctx.info is not None:
            ctx.info.state["fuse"] = {"fired": dict(fired), "near_misses": near}
        stats = dict(fired, near_miss=" | ".join(near)) if near else dict(fired)
        if propagated:
            stats["propagated_for"] = propagated
        return PassResult(changed=bool(fired), stats=stats)

    @staticmethod
    def _near_misses(misses: dict) -> list:
        """Per pattern, its best attempt that is still in the graph (not fused by another
        pattern since) and was the best attempt of any pattern at its anchor (the three RMSNorm
        variants stop at the same node; the closest one speaks), best first; each is written on
        the node where it stopped."""
        live = sorted((m for found in misses.values() for m in found if not m.stale()),
                      key=lambda m: -m.matched / m.total)
        per_anchor = {}
        for miss in live:
            per_anchor.setdefault(miss.anchor, miss)
        per_pattern = {}
        for miss in per_anchor.values():
            per_pattern.setdefault(miss.pattern, miss)
        best = sorted(per_pattern.values(), key=lambda m: (-m.matched / m.total, m.pattern))
        for miss in best:
            annotate_near_miss(miss)
        return best
