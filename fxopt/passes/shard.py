"""``shard``: split a graph for tensor parallelism, from its dataflow.

Every rank compiles the same model with ``fxopt.compile(model, passes=[..., "shard", ...], tp=N)``
and gets its own graph: the same ops on its slices of the weights, with the collectives that make
the result equal to the unsharded model's. What to split is read off the graph, never off module
names (Megatron's rule, found by propagation):

- a linear whose input is replicated is tried **column-parallel** (weight split by output
  features): its output is *sharded*;
- a sharded value flows through ops that work per feature or per head — elementwise ops,
  reshapes that keep the split dim whole, transposes, rotary's slices and cats, attention over
  sharded heads, the GQA repeat of k/v, reductions over other dims;
- a linear that contracts the sharded dim is **row-parallel** (weight split by input features),
  and an all-reduce follows it (``torch.ops._c10d_functional``: traceable and CUDA-graph
  capturable). Its bias is added once, after the all-reduce;
- an op that would mix a sharded value with a replicated one (a residual add, a norm over the
  hidden dim, an index) is a *conflict*: the column linears the value comes from are left
  replicated, and propagation starts over. It stops when nothing conflicts, so a region the
  heads cannot be split for (9 heads on 2 ranks) stays whole on every rank, and the rest is split.

Head counts: a ``reshape`` whose target shape spells out a head count (OPT's ``[B, -1, 4, 12]``,
the GQA repeat's ``expand``) is rewritten from the local shapes. GQA: the kv heads are split when
``tp`` divides them; when ``tp`` is a multiple of them instead, each rank keeps the one kv head its
query heads read (the k/v projections are replicated in ``num_kv_heads`` groups); otherwise the
attention stays replicated. A fused q/k/v projection followed by a split (GPT-2's ``c_attn``) is
split block by block, so each rank gets its share of q, of k and of v.

Vocabulary: the embedding is vocab-parallel (each rank looks up the ids in its rows, zeros the
others, all-reduce), and so is a linear whose output leaves the graph (the LM head): its
logits are all-gathered. A vocabulary ``tp`` does not divide is padded with zero rows.

Every weight that is sliced records its provenance for the loader (``meta['param_sources']``
entries ``(name, first row, end row, Slice)``): ``fxopt.load_plan`` then reads only this rank's
slices from the checkpoint. Every node gets its ``ShardSpec`` in ``meta['fxopt']['shard']``
(shown in the dumps), and :func:`check` re-derives the specs of the rewritten graph and refuses
one where a sharded value meets a replicated one unreduced.

Options: ``tp`` (ranks; 1 makes the pass a no-op), ``rank`` (default: this process's rank in
``torch.distributed``; give it to plan one rank's graph without a process group),
``shard_strict=True`` to make any region left replicated an error instead of a note,
``tp_allreduce="symm_mem"`` to emit ``fxopt.all_reduce`` (``kernels/collectives.py``: a one-shot
all-reduce over symmetric memory for decode-sized tensors on CUDA, NCCL otherwise) instead of the
functional NCCL all-reduce.

Example::

    >>> # torchrun --nproc-per-node 2 script.py
    >>> fxopt.distributed.setup()
    >>> compiled = fxopt.compile(model, passes=["canonicalize", "shard", "kv_cache", "dce"], tp=2)
    >>> compiled.report()  # shard: 14 column, 14 row, 28 all-reduce, vocab-parallel embedding + head
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import sympy
import torch
import torch.fx as fx

from .. import kernels  # noqa: F401 - registers torch.ops.fxopt.all_reduce
from ..checkpoint import Slice
from ..errors import PassError
from ..ir import describe, is_op, module_path, propagate_meta, shape_of, val
from .base import CompileContext, Pass, PassResult, register_pass
from .canonicalize import getattr_path

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
FXOPT_ALL_REDUCE = torch.ops.fxopt.all_reduce.default
ALL_REDUCE_MODES = ("nccl", "symm_mem")

# ---------------------------------------------------------------------------------------------
# The spec of a value
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """How one value is laid out over the ranks.

    ``dim`` None: replicated (every rank holds all of it). Otherwise split along ``dim``: the dim
    is ``blocks`` (global sizes, concatenated; one block by default) and each block is cut in
    ``parts`` equal slices; rank r holds slice ``r * parts // tp`` of every block (``parts < tp``:
    groups of ranks share a slice, e.g. one kv head). ``sub`` > 1: dim + 1 is cut too, in ``sub``
    slices by ``r % sub`` (the GQA repeat of a shared kv head). ``padded``: the global size before
    padding to a multiple of ``parts`` (vocabulary). ``origins``: the column linears it comes from.
    """

    dim: int | None = None
    parts: int = 1
    blocks: tuple | None = None
    sub: int = 1
    padded: int | None = None
    origins: frozenset = frozenset()
    partial: bool = False  # each rank holds a partial sum (only while checking a sharded graph)

    @property
    def split(self) -> bool:
        return self.dim is not None

    def __str__(self) -> str:
        if self.partial:
            return "P"
        if not self.split:
            return "R"
        extra = [f"{self.parts} parts"]
        if self.blocks and len(self.blocks) > 1:
            extra.append(f"blocks {list(self.blocks)}")
        if self.sub > 1:
            extra.append(f"dim {self.dim + 1} in {self.sub}")
        if self.padded is not None:
            extra.append(f"padded from {self.padded}")
        return f"S({self.dim}; {', '.join(extra)})"


R = ShardSpec()
P = ShardSpec(partial=True)


class _Conflict(Exception):
    """A sharded value cannot go through ``node``: its origins must stay replicated."""

    def __init__(self, node: fx.Node, origins, reason: str, size: int | None = None):
        super().__init__(reason)
        self.node, self.origins, self.reason = node, frozenset(origins), reason
        self.size = size  # a reshape: the size the split dim would land in


class _Adjust(Exception):
    """A column linear must be split differently (``parts`` or ``blocks``); retry."""

    def __init__(self, linear: fx.Node, **changes):
        super().__init__(str(changes))
        self.linear, self.changes = linear, changes


@dataclass
class _Decision:
    """What happens to one linear or embedding."""

    kind: str  # "column", "row", "replicate", "vocab"
    parts: int = 1
    blocks: tuple | None = None
    pad: bool = False
    why: str = ""


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def _expr(d):
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))


def _prod(dims) -> sympy.Expr:
    out = sympy.Integer(1)
    for d in dims:
        out = out * _expr(d)
    return out


def _same(a, b) -> bool:
    return sympy.expand(a - b) == 0


def _int(d) -> int | None:
    e = _expr(d)
    return int(e) if e.is_number else None


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _is_weight(gm: fx.GraphModule, node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        t = getattr_path(gm, node.target)
    except AttributeError:
        return False
    return isinstance(t, torch.Tensor)


# ---------------------------------------------------------------------------------------------
# Propagation
# ---------------------------------------------------------------------------------------------

ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.sub.Scalar,
    aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar, aten.neg.default, aten.silu.default, aten.gelu.default,
    aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.exp.default, aten.pow.Tensor_Scalar,
    aten.rsqrt.default, aten.sqrt.default, aten.to.dtype, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.type_as.default, aten.where.self, aten.masked_fill.Scalar,
    aten.minimum.default, aten.maximum.default, aten.clamp.default, aten.abs.default, aten.erf.default,
    aten.dropout.default, aten.square.default, aten.reciprocal.default, aten.log.default,
}
RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
# Ops a padded (vocabulary) value may go through on its way out: they keep zero rows harmless.
PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.mul.Tensor, aten.div.Tensor, aten.tanh.default,
                aten.clone.default, aten.contiguous.default, aten.alias.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.log_softmax.int}


class _Propagator:
    """Derive every node's ShardSpec under the current decisions; raise on the first conflict."""

    def __init__(self, gm: fx.GraphModule, tp: int, decisions: dict, verify: bool = False):
        self.gm, self.tp, self.decisions, self.verify = gm, tp, decisions, verify
        self.nodes = list(gm.graph.nodes)
        self.specs: dict[fx.Node, object] = {}
        self.gather: list[fx.Node] = []  # sharded values that leave the graph

    def run(self, start: int = 0) -> dict:
        """The specs of the nodes from index ``start`` on. Those before keep the specs of the last
        run: in topological order they depend only on earlier nodes and decisions, so when a
        decision changes, propagation resumes at the changed linear instead of the top."""
        self.gather = []  # filled by the output node, always past ``start``
        for node in self.nodes[start:]:
            self.specs[node] = self.rule(node)
        return self.specs

    def spec(self, a) -> ShardSpec:
        s = self.specs.get(a, R) if isinstance(a, fx.Node) else R
        return s if isinstance(s, ShardSpec) else R

    def inputs(self, node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes]

    # -- the rules ----------------------------------------------------------------------------
    def rule(self, node: fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return R
        if node.op == "output":
            return self.output(node)
        if node.op != "call_function":
            return self.unknown(node)
        split = [a for a in self.inputs(node) if self.spec(a).split]
        t = node.target
        if t is operator.getitem:
            src = self.specs.get(node.args[0])
            return src[node.args[1]] if isinstance(src, (list, tuple)) else self.spec(node.args[0])
        if is_op(node, aten.linear.default):
            return self.linear(node)
        if is_op(node, aten.embedding.default):
            return self.embedding(node)
        if t is c10d.wait_tensor.default:
            return self.spec(node.args[0])
        if t is c10d.all_reduce.default or t is FXOPT_ALL_REDUCE:
            if self.verify and not self.spec(node.args[0]).partial:
                raise _Conflict(node, (), "an all-reduce of a value that is not a partial sum")
            return R
        if t is c10d.all_gather_into_tensor.default:
            return R
        partial = [a for a in self.inputs(node) if self.spec(a).partial]
        if partial:
            if is_op(node, aten.masked_fill.Scalar) and node.args[2] == 0 and not self.spec(node.args[1]).split:
                return P
            raise _Conflict(node, (), f"the partial sums %{partial[0].name} meet {node.target} before an all-reduce")
        if not split:
            return R
        if t in ELEMENTWISE:
            return self.elementwise(node)
        if t in RESHAPES:
            return self.reshape(node)
        if is_op(node, aten.transpose.int):
            return self.transpose(node)
        if is_op(node, aten.permute.default):
            return self.permute(node)
        if is_op(node, aten.movedim.int):
            return self.movedim(node)
        if is_op(node, aten.unsqueeze.default):
            return self.unsqueeze(node)
        if is_op(node, aten.squeeze.dim, aten.squeeze.dims):
            return self.squeeze(node)
        if is_op(node, aten.expand.default):
            return self.expand(node)
        if is_op(node, aten.slice.Tensor):
            return self.along_other(node, node.args[1] if len(node.args) > 1 else 0)
        if is_op(node, aten.cat.default):
            return self.cat(node)
        if is_op(node, aten.split.Tensor, aten.split_with_sizes.default):
            return self.split(node)
        if t in REDUCTIONS:
            return self.reduction(node)
        if t in SOFTMAX:
            return self.along_other(node, node.args[1])
        if is_op(node, aten.layer_norm.default):
            return self.layer_norm(node)
        if is_op(node, aten.scaled_dot_product_attention.default):
            return self.attention(node)
        if is_op(node, aten.matmul.default, aten.bmm.default):
            return self.matmul(node)
        if is_op(node, aten.sym_size.int):
            s = self.spec(node.args[0])
            if _norm_dim(node.args[1], len(shape_of(node.args[0]))) == s.dim:
                raise _Conflict(node, s.origins, "reads the size of the split dim")
            return R
        return self.unknown(node)

    def unknown(self, node):
        origins = frozenset().union(*(self.spec(a).origins for a in self.inputs(node)))
        if any(self.spec(a).split for a in self.inputs(node)):
            raise _Conflict(node, origins, f"{node.target} has no sharding rule")
        return R

    def output(self, node):
        for a in self.inputs(node):
            s = self.spec(a)
            if s.partial:
                raise _Conflict(a, (), "partial sums leave the graph without an all-reduce")
            if s.split:
                if s.blocks and len(s.blocks) > 1 or s.sub > 1 or s.parts != self.tp:
                    raise _Conflict(a, s.origins, "a split value leaves the graph and cannot be gathered")
                self.gather.append(a)
        return R

    def linear(self, node):
        x, w = node.args[0], node.args[1]
        s = self.spec(x)
        d = self.decisions.get(node)
        if s.split:
            rank = len(shape_of(x))
            if s.dim != rank - 1 or s.sub > 1 or s.parts != self.tp or s.padded is not None:
                raise _Conflict(node, s.origins, f"linear over an input split as {s}")
            if not _is_weight(self.gm, w):
                raise _Conflict(node, s.origins, "linear with a computed weight")
            if self.verify:
                return P
            self.decisions[node] = _Decision("row", s.parts, s.blocks)
            return R  # all-reduced right after
        if d is None or d.kind != "column":
            return R
        out = shape_of(node)
        n = _int(out[-1])
        blocks = d.blocks or (n,)
        if not self.verify and any(b % d.parts for b in blocks) and not d.pad:
            raise _Conflict(node, {node}, f"{n} output features do not split in {d.parts}")
        return ShardSpec(len(out) - 1, d.parts, d.blocks, padded=n if d.pad and n % d.parts else None,
                         origins=frozenset({node}))

    def embedding(self, node):
        if self.spec(node.args[1]).split:
            raise _Conflict(node, self.spec(node.args[1]).origins, "embedding of split ids")
        if self.verify and getattr(node.meta.get("fxopt_shard"), "kind", None) == "vocab":
            return P
        return R

    def elementwise(self, node):
        out = shape_of(node)
        rank = len(out) if out is not None else 0
        found: ShardSpec | None = None
        origins = frozenset()
        for a in self.inputs(node):
            s, shape = self.spec(a), shape_of(a)
            origins |= s.origins
            if not s.split:
                continue
            d = s.dim + rank - len(shape)
            cand = replace(s, dim=d)
            if found is not None and (found.dim, found.parts, found.blocks, found.sub) != (d, s.parts, s.blocks, s.sub):
                raise _Conflict(node, origins | found.origins, f"operands split as {found} and {s}")
            found = replace(cand, origins=cand.origins | (found.origins if found else frozenset()))
        for a in self.inputs(node):
            s, shape = self.spec(a), shape_of(a)
            if s.split or shape is None:
                continue
            d = found.dim - (rank - len(shape))
            if 0 <= d < len(shape) and _int(shape[d]) != 1:
                raise _Conflict(node, origins, f"a replicated operand %{a.name} meets a value split as {found}")
            if found.sub > 1 and 0 <= d + 1 < len(shape) and _int(shape[d + 1]) != 1:
                raise _Conflict(node, origins, f"a replicated operand %{a.name} meets a value split as {found}")
        if found.padded is not None and node.target not in PASS_THROUGH:
            raise _Conflict(node, origins, "padded vocabulary rows meet an op that would see them")
        return found

    def reshape(self, node):
        s = self.spec(node.args[0])
        src, dst = shape_of(node.args[0]), shape_of(node)
        before = _prod(src[:s.dim])
        if s.sub > 1:  # the GQA repeat: (kv heads, repeat) merge into query heads
            for j in range(len(dst) + 1):
                if _same(_prod(dst[:j]), before):
                    if j < len(dst) and _same(_expr(dst[j]), _expr(src[s.dim]) * _expr(src[s.dim + 1])):
                        return ShardSpec(j, self.tp, origins=s.origins)
                    break
            raise _Conflict(node, s.origins, "the repeated kv heads are not merged into query heads")
        unit = s.parts * (len(s.blocks) if s.blocks else 1)
        land = None
        for j in range(len(dst)):
            if _same(_prod(dst[:j]), before):
                land = _int(dst[j])
                if self.verify or land is not None and land % unit == 0 and \
                        (s.blocks is None or len(s.blocks) == 1 or _same(_expr(dst[j]), _expr(src[s.dim]))):
                    return replace(s, dim=j)
                break
        raise _Conflict(node, s.origins, f"the reshape {list(src)} → {list(dst)} cuts the split dim "
                                         f"({s}) into pieces that are not whole slices", size=land)

    def transpose(self, node):
        s = self.spec(node.args[0])
        rank = len(shape_of(node))
        a, b = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
        if s.sub > 1 and {s.dim, s.dim + 1} & {a, b}:
            raise _Conflict(node, s.origins, "transpose of a repeated kv head")
        return replace(s, dim=b if s.dim == a else a if s.dim == b else s.dim)

    def permute(self, node):
        s = self.spec(node.args[0])
        order = [_norm_dim(d, len(node.args[1])) for d in node.args[1]]
        if s.sub > 1:
            raise _Conflict(node, s.origins, "permute of a repeated kv head")
        return replace(s, dim=order.index(s.dim))

    def movedim(self, node):
        s = self.spec(node.args[0])
        rank = len(shape_of(node))
        order = list(range(rank))
        src, dst = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
        order.pop(src)
        order.insert(dst, src)
        return replace(s, dim=order.index(s.dim))

    def unsqueeze(self, node):
        s = self.spec(node.args[0])
        d = _norm_dim(node.args[1], len(shape_of(node)))
        if s.sub > 1 and d <= s.dim + 1:
            raise _Conflict(node, s.origins, "unsqueeze inside a repeated kv head")
        return replace(s, dim=s.dim + 1 if d <= s.dim else s.dim)

    def squeeze(self, node):
        s = self.spec(node.args[0])
        shape = shape_of(node.args[0])
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [_norm_dim(d, len(shape)) for d in dims if _int(shape[_norm_dim(d, len(shape))]) == 1]
        if s.dim in dims:
            raise _Conflict(node, s.origins, "squeeze of the split dim")
        return replace(s, dim=s.dim - sum(d < s.dim for d in dims))

    def expand(self, node):
        s = self.spec(node.args[0])
        src, dst = shape_of(node.args[0]), shape_of(node)
        d = s.dim + len(dst) - len(src)
        if s.parts == self.tp or s.sub > 1:
            return replace(s, dim=d)
        # A kv head shared by a group of ranks, repeated for the query heads: each rank takes its
        # share of the repeat (dim d + 1), so that merging the two gives its query heads.
        k = self.tp // s.parts
        if d + 1 < len(dst) and _int(src[s.dim + 1]) == 1 and _int(dst[d + 1]) is not None and \
                (self.verify or _int(dst[d + 1]) % k == 0):
            return replace(s, dim=d, sub=k)
        raise _Conflict(node, s.origins, f"expand of a value split as {s}")

    def along_other(self, node, dim):
        s = self.spec(node.args[0])
        rank = len(shape_of(node.args[0]))
        if _norm_dim(dim, rank) in (s.dim, s.dim + 1 if s.sub > 1 else -99):
            raise _Conflict(node, s.origins, f"{node.target} along the split dim")
        return s

    def cat(self, node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        specs = {(self.spec(t).dim, self.spec(t).parts, self.spec(t).blocks, self.spec(t).sub) for t in tensors}
        origins = frozenset().union(*(self.spec(t).origins for t in tensors))
        first = self.spec(tensors[0])
        if len(specs) != 1 or not first.split or _norm_dim(dim, len(shape_of(node))) == first.dim:
            raise _Conflict(node, origins, "cat of values split differently, or along the split dim")
        return replace(first, origins=origins)

    def split(self, node):
        s = self.spec(node.args[0])
        shape = shape_of(node.args[0])
        dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, len(shape))
        if dim != s.dim:
            return [s] * len(val(node))
        n = _int(shape[dim])
        sizes = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else \
            [node.args[1]] * (n // node.args[1]) + ([n % node.args[1]] if n % node.args[1] else [])
        if s.blocks is not None and (list(s.blocks) == sizes or self.verify and len(s.blocks) == len(sizes)):
            return [replace(s, blocks=None) for _ in sizes]
        if (s.blocks is None or len(s.blocks) == 1) and len(s.origins) == 1 and s.padded is None:
            raise _Adjust(next(iter(s.origins)), blocks=tuple(sizes))
        raise _Conflict(node, s.origins, f"split {sizes} of a value split as {s}")

    def reduction(self, node):
        s = self.spec(node.args[0])
        rank = len(shape_of(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else None
        dims = list(range(rank)) if not dims else [_norm_dim(d, rank) for d in dims]
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if s.dim in dims or (s.sub > 1 and s.dim + 1 in dims):
            raise _Conflict(node, s.origins, "reduction over the split dim")
        return s if keep else replace(s, dim=s.dim - sum(d < s.dim for d in dims))

    def layer_norm(self, node):
        s = self.spec(node.args[0])
        rank = len(shape_of(node.args[0]))
        if s.dim >= rank - len(node.args[1]) or any(self.spec(a).split for a in node.args[2:4] if a is not None):
            raise _Conflict(node, s.origins, "layer_norm over the split dim")
        return s

    def attention(self, node):
        q, k, v = node.args[:3]
        specs = [self.spec(a) for a in (q, k, v)]
        origins = frozenset().union(*(x.origins for x in specs))
        rank = len(shape_of(q))
        if any((x.dim, x.parts, x.sub) != (rank - 3, self.tp, 1) for x in specs):
            raise _Conflict(node, origins, f"attention over q/k/v split as {', '.join(map(str, specs))}")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            ms = shape_of(mask)
            if self.spec(mask).split or (len(ms) >= 3 and _int(ms[-3]) != 1):
                raise _Conflict(node, origins, "an attention mask per head")
        return replace(specs[0], origins=origins)

    def matmul(self, node):
        a, b = node.args[:2]
        sa, sb = self.spec(a), self.spec(b)
        ra, rb = len(shape_of(a)), len(shape_of(b))
        origins = sa.origins | sb.origins
        if ra == rb and sa.split and sb.split and sa.dim == sb.dim < ra - 2 and \
                (sa.parts, sa.sub) == (sb.parts, sb.sub):
            return replace(sa, origins=origins)
        raise _Conflict(node, origins, "matmul of split values")


# ---------------------------------------------------------------------------------------------
# Deciding
# ---------------------------------------------------------------------------------------------


def _reaches_output(gm: fx.GraphModule) -> set:
    """Nodes whose value reaches the graph output through ops that keep it elementwise."""
    keep = PASS_THROUGH
    out = set()
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "output":
            out.update(node.all_input_nodes)
        elif node in out and node.op == "call_function" and node.target in keep:
            out.update(node.all_input_nodes)
    return out


def decide(gm: fx.GraphModule, tp: int, max_rounds: int = 1000):
    """Decisions for every linear and embedding, the final specs and the notes of what stayed
    replicated and why. Column candidates: every linear with a weight; conflicts revert them."""
    leaves = _reaches_output(gm)
    decisions: dict[fx.Node, _Decision] = {}
    tables = [n for n in gm.graph.nodes if is_op(n, aten.embedding.default) and _is_weight(gm, n.args[0])]
    sizes = [int(shape_of(n.args[0])[0]) for n in tables]
    # the vocabulary: the table as large as an LM head's output (a tiny GPT-2 or OPT has more
    # positions than tokens), else the largest
    heads = {_int(shape_of(n.args[1])[0]) for n in leaves if is_op(n, aten.linear.default)}
    vocab = max((s for s in sizes if s in heads), default=max(sizes, default=0))
    for node in gm.graph.nodes:
        if is_op(node, aten.linear.default) and _is_weight(gm, node.args[1]):
            decisions[node] = _Decision("column", tp, pad=node in leaves)
        elif node in tables and int(shape_of(node.args[0])[0]) == vocab:
            # the vocabulary; smaller tables (GPT-2's positions) stay whole: an all-reduce would cost more
            decisions[node] = _Decision("vocab", tp)
    notes: list[str] = []
    prop = _Propagator(gm, tp, decisions)
    index = {n: i for i, n in enumerate(prop.nodes)}
    start = 0  # where the last change of decisions can first show
    for _ in range(max_rounds):
        for node, d in decisions.items():
            if d.kind == "row" and index[node] >= start:
                d.kind = "column"  # re-derived from its input below
        try:
            specs = prop.run(start)
        except _Adjust as e:
            d = decisions[e.linear]
            for k, v in e.changes.items():
                setattr(d, k, v)
            start = index[e.linear]
            continue
        except _Conflict as e:
            origins = [o for o in e.origins if decisions.get(o) is not None and decisions[o].kind == "column"]
            if not origins:
                raise PassError(f"shard: cannot split at {describe(e.node)}: {e.reason}") from None
            start = min(index[o] for o in origins)
            if _kv_retry(e, decisions, tp):
                continue
            for o in origins:
                decisions[o] = _Decision("replicate", why=f"{e.reason} at {describe(e.node)}")
            notes.append(f"replicated {', '.join(_label(o) for o in sorted(origins, key=_order(gm)))}: "
                         f"{e.reason} at {describe(e.node)}")
            continue
        return decisions, specs, prop.gather, notes
    raise PassError("shard: the split decisions did not settle")  # pragma: no cover


def _kv_retry(e: _Conflict, decisions: dict, tp: int) -> bool:
    """GQA with fewer kv heads than ranks: a reshape that makes ``heads`` (not divisible by tp,
    but dividing it) from one column linear retries that linear in ``heads`` parts."""
    node = e.node
    if not is_op(node, *RESHAPES) or len(e.origins) != 1:
        return False
    origin = next(iter(e.origins))
    d = decisions.get(origin)
    if d is None or d.kind != "column" or d.parts != tp or d.blocks:
        return False
    h = e.size
    if h and h < tp and tp % h == 0:
        d.parts = h
        return True
    return False


def _label(node: fx.Node) -> str:
    return f"%{node.name}" + (f" ({module_path(node)})" if module_path(node) else "")


def _order(gm):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


# ---------------------------------------------------------------------------------------------
# Rewriting
# ---------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Which rows of a dim of ``size`` one rank holds: a list of (start, end) in the global dim,
    and the local size (padding included)."""

    ranges: list
    local: int


def _layout(size: int, parts: int, blocks, index: int, pad: bool) -> _Layout:
    if pad and size % parts:
        per = -(-size // parts)
        start = index * per
        return _Layout([(start, min(start + per, size))], per)
    ranges, offset = [], 0
    for b in blocks or (size,):
        per = b // parts
        ranges.append((offset + index * per, offset + (index + 1) * per))
        offset += b
    return _Layout(ranges, sum(e - s for s, e in ranges))


@dataclass
class _Sharder:
    gm: fx.GraphModule
    tp: int
    rank: int
    group: str
    mode: str = "nccl"  # how all-reduces are spelled (ALL_REDUCE_MODES)
    sliced: dict = field(default_factory=dict)  # (target, key) -> new target
    stats: dict = field(default_factory=lambda: {"column": 0, "row": 0, "all_reduce": 0, "vocab": 0, "gather": 0})

    def index(self, parts: int) -> int:
        return self.rank * parts // self.tp

    def slice_weight(self, wnode: fx.Node, dim: int, layout: _Layout, size: int) -> fx.Node:
        """A get_attr of this rank's rows (dim 0) or columns (dim 1) of ``wnode``'s tensor,
        zero-padded to ``layout.local``, with its checkpoint provenance."""
        full = getattr_path(self.gm, wnode.target)
        if "param_sources" in wnode.meta or "quant" in wnode.meta:
            raise PassError(f"shard: {describe(wnode)} is already concatenated or quantized; put 'shard' before "
                            "'fuse' and 'quantize' in the pipeline")
        key = (dim, tuple(layout.ranges), layout.local)
        target = self.sliced.get((wnode.target, key))
        if target is None:
            pieces = [full.narrow(dim, s, e - s) for s, e in layout.ranges]
            have = sum(e - s for s, e in layout.ranges)
            if have < layout.local:
                pad_shape = list(full.shape)
                pad_shape[dim] = layout.local - have
                pieces.append(full.new_zeros(pad_shape))
            value = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0].clone()
            # Replace the attribute in place only when nothing else reads it: another reader (a tied
            # weight used replicated elsewhere) must keep seeing the whole tensor.
            readers = [n for n in self.gm.graph.find_nodes(op="get_attr") if n.target == wnode.target]
            sole = readers == [wnode] and len(wnode.users) == 1
            target = self._register(wnode.target, value,
                                    first=sole and not any(k[0] == wnode.target for k in self.sliced))
            self.sliced[(wnode.target, key)] = target
        with self.gm.graph.inserting_before(wnode):
            new = self.gm.graph.get_attr(target)
        new.meta.update({k: v for k, v in wnode.meta.items() if k not in ("val", "param_slices")})
        name = wnode.meta.get("param", wnode.target)
        sources, row = [], 0
        for s, e in layout.ranges:
            if dim == 0:
                sources.append((name, row, row + e - s, Slice(0, s, e, size)))
                row += e - s
            else:
                sources.append((name, 0, int(full.shape[0]), Slice(1, s, e, size)))
        if dim == 0 and row < layout.local:
            sources.append((None, row, layout.local, None))
        new.meta["param_sources"] = sources
        transform = wnode.meta.get("param_transform")
        if transform:
            new.meta["param_transforms"] = {name: transform}
        new.meta.setdefault("fxopt", {})
        new.meta["fxopt"] = {**new.meta["fxopt"], "shard": f"{'rows' if dim == 0 else 'columns'} "
                             f"{', '.join(f'{s}:{e}' for s, e in layout.ranges)} of {size}"}
        return new

    def _register(self, target: str, value: torch.Tensor, first: bool) -> str:
        *parents, leaf = target.split(".")
        owner = self.gm.get_submodule(".".join(parents)) if parents else self.gm
        name = leaf if first else f"{leaf}_tp{len(self.sliced)}"
        param = torch.nn.Parameter(value, requires_grad=False) if isinstance(
            getattr(owner, leaf, None), torch.nn.Parameter) else value
        if first and leaf in owner._buffers:
            owner._buffers[leaf] = value
        elif first and leaf in owner._parameters:
            owner._parameters[leaf] = param
        else:
            owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
        return ".".join([*parents, name])

    def restore_names(self) -> None:
        """A weight sliced under a new name (it had other readers while slicing) takes its own name
        back when the whole original is no longer read and it was sliced one way only: dumps,
        load plans and state dicts keep the model's names."""
        graph = self.gm.graph
        news: dict[str, set] = {}
        for (orig, _key), new in self.sliced.items():
            news.setdefault(orig, set()).add(new)
        read = {n.target for n in graph.find_nodes(op="get_attr")}
        for orig, targets in news.items():
            if len(targets) != 1 or orig in read:
                continue
            new = next(iter(targets))
            if new == orig:
                continue
            *parents, leaf = orig.split(".")
            owner = self.gm.get_submodule(".".join(parents)) if parents else self.gm
            value = getattr_path(self.gm, new)
            owner._buffers.pop(leaf, None)
            owner._parameters[leaf] = value if isinstance(value, torch.nn.Parameter) else \
                torch.nn.Parameter(value, requires_grad=False)
            *new_parents, new_leaf = new.split(".")
            new_owner = self.gm.get_submodule(".".join(new_parents)) if new_parents else self.gm
            new_owner._parameters.pop(new_leaf, None)
            for n in graph.find_nodes(op="get_attr"):
                if n.target == new:
                    n.target = orig

    def collective(self, before: fx.Node, op, *args) -> fx.Node:
        graph = self.gm.graph
        with graph.inserting_after(before):
            c = graph.call_function(op, args)
        with graph.inserting_after(c):
            w = graph.call_function(c10d.wait_tensor.default, (c,))
        for n in (c, w):
            n.meta["nn_module_stack"] = before.meta.get("nn_module_stack", {})
        return w

    def all_reduce(self, node: fx.Node) -> fx.Node:
        users = list(node.users)
        if self.mode == "symm_mem":
            with self.gm.graph.inserting_after(node):
                w = self.gm.graph.call_function(FXOPT_ALL_REDUCE, (node, self.group))
            w.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        else:
            w = self.collective(node, c10d.all_reduce.default, node, "sum", self.group)
        for u in users:
            u.replace_input_with(node, w)
        self.stats["all_reduce"] += 1
        return w

    # -- per decision -------------------------------------------------------------------------
    def column(self, node: fx.Node, d: _Decision) -> None:
        w = node.args[1]
        size = int(shape_of(w)[0])
        layout = _layout(size, d.parts, d.blocks, self.index(d.parts), d.pad)
        args = list(node.args)
        args[1] = self.slice_weight(w, 0, layout, size)
        if len(args) > 2 and args[2] is not None:
            args[2] = self.slice_weight(args[2], 0, layout, size)
        node.args = tuple(args)
        self.stats["column"] += 1

    def row(self, node: fx.Node, d: _Decision) -> None:
        w = node.args[1]
        size = int(shape_of(w)[1])
        layout = _layout(size, d.parts, d.blocks, self.index(d.parts), False)
        bias = node.args[2] if len(node.args) > 2 else None
        node.args = (node.args[0], self.slice_weight(w, 1, layout, size))
        out = self.all_reduce(node)
        if bias is not None:  # added once, after the sum
            users = list(out.users)
            with self.gm.graph.inserting_after(out):
                added = self.gm.graph.call_function(aten.add.Tensor, (out, bias))
            added.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            for u in users:
                u.replace_input_with(out, added)
        self.stats["row"] += 1

    def vocab(self, node: fx.Node, d: _Decision) -> None:
        """embedding(W, ids) → this rank's rows; ids outside them look up row 0 and are zeroed;
        all-reduce."""
        w, ids = node.args[0], node.args[1]
        size = int(shape_of(w)[0])
        layout = _layout(size, self.tp, None, self.rank, True)
        start, end = layout.ranges[0]
        graph = self.gm.graph
        with graph.inserting_before(node):
            local = graph.call_function(aten.sub.Tensor, (ids, start))
            below = graph.call_function(aten.lt.Scalar, (local, 0))
            above = graph.call_function(aten.ge.Scalar, (local, end - start))
            outside = graph.call_function(aten.logical_or.default, (below, above))
            safe = graph.call_function(aten.masked_fill.Scalar, (local, outside, 0))
            mask = graph.call_function(aten.unsqueeze.default, (outside, -1))
        node.args = (self.slice_weight(w, 0, layout, size), safe, *node.args[2:])
        users = list(node.users)
        with graph.inserting_after(node):
            zeroed = graph.call_function(aten.masked_fill.Scalar, (node, mask, 0.0))
        for u in users:
            u.replace_input_with(node, zeroed)
        for n in (local, below, above, outside, safe, mask, zeroed):
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        self.all_reduce(zeroed)
        self.stats["vocab"] += 1

    def gather(self, node: fx.Node, spec: ShardSpec) -> None:
        """A split value that leaves the graph: all-gather along its dim (then drop padding)."""
        graph = self.gm.graph
        users = [u for u in node.users if u.op == "output"]
        with graph.inserting_after(node):
            first = graph.call_function(aten.movedim.int, (node, spec.dim, 0))
        with graph.inserting_after(first):
            contig = graph.call_function(aten.contiguous.default, (first,))
        gathered = self.collective(contig, c10d.all_gather_into_tensor.default, contig, self.tp, self.group)
        with graph.inserting_after(gathered):
            back = graph.call_function(aten.movedim.int, (gathered, 0, spec.dim))
        last = back
        if spec.padded is not None:
            with graph.inserting_after(back):
                last = graph.call_function(aten.slice.Tensor, (back, spec.dim, 0, spec.padded))
        with graph.inserting_after(last):
            out = graph.call_function(aten.contiguous.default, (last,))
        for n in (first, contig, back, last, out):
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        for u in users:
            u.replace_input_with(node, out)
        self.stats["gather"] += 1

    def local_shape_args(self, node: fx.Node, spec_in: ShardSpec, spec_out) -> None:
        """Shape constants of reshape / expand / split that count global features → local."""
        if node.target in RESHAPES or is_op(node, aten.expand.default):
            sizes = list(node.args[1])
            out = spec_out if isinstance(spec_out, ShardSpec) else spec_in
            dims = [(out.dim, out.parts)]
            if is_op(node, aten.expand.default) and out.sub > 1:
                dims = [(out.dim, out.parts), (out.dim + 1, out.sub)]
            for d, parts in dims:
                if isinstance(sizes[d], int) and sizes[d] != -1:
                    sizes[d] = sizes[d] // parts if out.padded is None else -(-sizes[d] // parts)
            node.args = (node.args[0], sizes, *node.args[2:])
        elif is_op(node, aten.split.Tensor, aten.split_with_sizes.default):
            dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, len(shape_of(node.args[0])))
            if dim != spec_in.dim:
                return
            sizes = node.args[1]
            parts = spec_in.parts
            new = [s // parts for s in sizes] if isinstance(sizes, (list, tuple)) else sizes // parts
            node.args = (node.args[0], new, *node.args[2:])


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def _rank_and_group(ctx: CompileContext, tp: int) -> tuple[int, str]:
    import torch.distributed as dist

    rank = ctx.option("rank")
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world != tp:
            raise PassError(f"shard: tp={tp} but torch.distributed has {world} processes; launch with "
                            f"torchrun --nproc-per-node {tp}")
        if rank is not None and int(rank) != dist.get_rank():
            raise PassError(f"shard: rank={rank} given, but this process is rank {dist.get_rank()}")
        return dist.get_rank(), dist.group.WORLD.group_name
    if rank is None:
        raise PassError(f"shard: tp={tp} needs torch.distributed: launch with torchrun --nproc-per-node {tp} and call "
                        "fxopt.distributed.setup() first (or pass rank=... to plan one rank's graph without running it)")
    if not 0 <= int(rank) < tp:
        raise PassError(f"shard: rank {rank} is not in 0..{tp - 1}")
    return int(rank), "unset"


@register_pass("shard")
class Shard(Pass):
    preserves_meta = True  # run() ends with propagate_meta and check(), which read the new shapes
    name = "shard"

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        tp = int(ctx.option("tp", 1) or 1)
        if tp < 1:
            raise PassError(f"shard: tp must be at least 1, got {tp}")
        if tp == 1:
            return PassResult(changed=False, stats={"tp": 1})
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("fxopt."):
                raise PassError(f"shard: {describe(node)} is already rewritten; put 'shard' right after 'canonicalize', "
                                "before 'kv_cache', 'fuse' and 'quantize'")
        rank, group = _rank_and_group(ctx, tp)
        decisions, specs, gather, notes = decide(gm, tp)
        if notes and ctx.option("shard_strict", False):
            raise PassError("shard: shard_strict=True and " + notes[0])
        mode = ctx.option("tp_allreduce", "nccl")
        if mode not in ALL_REDUCE_MODES:
            raise PassError(f"shard: tp_allreduce must be one of {ALL_REDUCE_MODES}, got {mode!r}")
        if mode == "symm_mem":
            from ..kernels.collectives import use_symm_mem
            if torch.cuda.is_available() and not use_symm_mem():
                raise PassError("shard: tp_allreduce='symm_mem' needs torch.distributed._symmetric_memory "
                                "(torch >= 2.6 with CUDA)")
        sharder = _Sharder(gm, tp, rank, group, mode)
        # shape constants first: they read the specs of the graph as it was
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            ins = [specs.get(a) for a in node.all_input_nodes]
            if any(isinstance(s, ShardSpec) and s.split for s in ins) and node.args and isinstance(node.args[0], fx.Node):
                sharder.local_shape_args(node, specs.get(node.args[0], R), specs.get(node))
        for node, d in list(decisions.items()):
            if d.kind == "column":
                sharder.column(node, d)
            elif d.kind == "row":
                sharder.row(node, d)
            elif d.kind == "vocab":
                sharder.vocab(node, d)
        for node in gather:
            sharder.gather(node, specs[node])
        for node, s in specs.items():
            if node.op == "call_function":
                text = str(s) if isinstance(s, ShardSpec) else "(" + ", ".join(map(str, s)) + ")"
                node.meta["fxopt"] = {**(node.meta.get("fxopt") or {}), "shard": text}
        for node, d in decisions.items():
            node.meta["fxopt_shard"] = d
            if d.kind == "replicate":
                node.meta["fxopt"] = {**(node.meta.get("fxopt") or {}), "shard": f"replicated: {d.why}"}
            elif d.kind != "column":
                node.meta["fxopt"] = {**(node.meta.get("fxopt") or {}), "shard": f"{d.kind}-parallel"}
        gm.graph.eliminate_dead_code()
        sharder.restore_names()
        _drop_unused_attributes(gm)
        gm.recompile()
        propagate_meta(gm)
        for node, s in check(gm, tp).items():  # the nodes the rewrite inserted: their verified specs
            if node.op == "call_function" and "shard" not in (node.meta.get("fxopt") or {}):
                text = str(s) if isinstance(s, ShardSpec) else "(" + ", ".join(map(str, s)) + ")"
                node.meta["fxopt"] = {**(node.meta.get("fxopt") or {}), "shard": text}
        layout = {"tp": tp, "rank": rank, "group": group, "notes": notes,
                  "decisions": {n.name: d.kind for n, d in decisions.items()}}
        if ctx.info is not None:
            ctx.info.state["shard"] = layout
        stats = {"tp": tp, "rank": rank, **sharder.stats, "replicated": sum(d.kind == "replicate" for d in decisions.values())}
        if notes:
            stats["notes"] = notes[:3] + ([f"... {len(notes) - 3} more"] if len(notes) > 3 else [])
        return PassResult(changed=True, stats=stats)


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """The full-size weights the sliced ones replaced: drop them so the graph holds only its share."""
    used = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            *parents, leaf = name.split(".")
            owner = gm.get_submodule(".".join(parents)) if parents else gm
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)


def check(gm: fx.GraphModule, tp: int) -> dict:
    """Re-derive the specs of a sharded graph from its collectives: every linear is replicated
    unless the recorded decision says otherwise, and a split value must never meet a replicated
    one unreduced. Raises PassError naming the node; returns the specs ``{node: ShardSpec}``."""
    decisions = {n: n.meta["fxopt_shard"] for n in gm.graph.nodes
                 if getattr(n.meta.get("fxopt_shard"), "kind", None) == "column"}
    prop = _Propagator(gm, tp, decisions, verify=True)
    try:
        return prop.run()
    except (_Conflict, _Adjust) as e:
        node = getattr(e, "node", None) or getattr(e, "linear", None)
        raise PassError(f"shard: the sharded graph is inconsistent at {describe(node)}: {e}") from None
