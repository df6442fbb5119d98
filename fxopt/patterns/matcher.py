"""A small subgraph matcher for fxopt graphs.

A :class:`Pattern` is a plain PyTorch function, captured the way models are captured
(``torch.export`` then ``canonicalize``), so that it is written in the same ATen normal form as the
model graphs it is matched against::

    def rms(x, w, eps):                       # transformers' LlamaRMSNorm.forward
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    RMS = Pattern("rms_norm", rms,
                  example_inputs=dict(x=example(2, 3, 24), w=example(24), eps=1.2345e-5),
                  replacement=lambda m: m.call(torch.ops.fxopt.rms_norm.default, m["x"], m["w"], m["eps"]))

    for m in match_all(gm, RMS):              # find
        print(m.module_path, m["x"], m["eps"])
    rewrite(gm, RMS)                          # find and replace

Inputs given as tensors are *wildcards* (any node of the model graph); inputs given as Python
numbers or lists are *scalar wildcards* (any constant argument, e.g. ``eps``; the example value
must be distinctive so it can be found in the captured graph). The example tensors' floating dtype
(bfloat16 with :func:`example`) stands for "the model's dtype": it binds to one dtype per match,
while every other dtype in the pattern (the ``float32`` of ``x.float()``) must be matched exactly.

Matching starts at a model node (the *anchor*) and walks backwards from the pattern's first output
over both graphs at once. Two nodes match when they call the same op modulo the spellings real
models vary in, and their arguments match:

- overloads of one op are one op (``mul.Tensor`` = ``mul.Scalar``), ``view`` = ``reshape``, every
  cast (``to.dtype``, ``_to_copy``) is one op whose target dtype is checked by the dtype rule;
- ``transpose(x, 1, 2)`` = ``transpose(x, 2, 1)`` = ``permute(x, [0, 2, 1, 3])``;
- ``dim`` arguments are compared counted from the end (``mean(x, [-1])`` = ``mean(x, [2])`` on a
  3-D tensor), and a slice ``end`` past the dim's size is "to the end";
- ``add`` and ``mul`` try both operand orders;
- casts in the pattern are *optional*: where the model has no cast (``x.float()`` of an fp32 model
  is gone after ``canonicalize``) the match goes on at the cast's input, which then must already
  have the dtype the cast would produce (so an fp32 upcast is never silently dropped from a bf16
  model);
- constants are equal (floats to 1e-6 relative: ``0.7978845608`` is ``sqrt(2/pi)``), or bind to a
  scalar wildcard, the same value at every use.

A structural match is then checked: the nodes it would remove may have no users outside it (other
than the pattern's outputs; view ops whose inputs are all match inputs may be shared, they stay),
its outputs must not be used before all its inputs exist, and the pattern's ``predicate`` (shapes,
dtypes through ``meta['val']``) must accept it. The best failed attempt of each pattern is kept as
a :class:`NearMiss`: ``rotary: matched 6 of 16 nodes; stopped at aten.slice in
model.layers.0.self_attn (argument 'step' is 2, expected 1)``.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from ..errors import FxoptError
from ..ir import fake_call, fake_mode_of, module_path, val

aten = torch.ops.aten

#: Ops that are spelled differently but mean the same; each set is matched as one op.
CASTS = frozenset({aten.to, aten._to_copy})
RESHAPES = frozenset({aten.reshape, aten.view, aten._unsafe_view})
PERMUTES = frozenset({aten.transpose, aten.permute, aten.t})
COMMUTATIVE = frozenset({aten.add, aten.mul})
#: View ops: free to keep alive, so a match may leave one in place for users outside the match.
SHAREABLE = frozenset({aten.unsqueeze, aten.squeeze, aten.expand, aten.slice, aten.select}) | RESHAPES | PERMUTES
#: Ops whose ``dim`` counts in the *output*'s rank.
_DIM_OF_OUTPUT = frozenset({aten.unsqueeze, aten.stack, aten.cat})
_INT64_MAX = 2**63 - 1


class PatternError(FxoptError):
    """A pattern that cannot be built or whose replacement misbehaves."""


def example(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An example input of a pattern: a tensor of ``shape`` (values don't matter, only shapes and
    dtypes are traced) in the dtype that stands for "the model's dtype": bfloat16, so that
    ``x.float()`` stays a real cast in the pattern."""
    return torch.zeros(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Pattern
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalarWildcard:
    """Stands for a constant argument of the model (``eps``), bound at match time."""

    name: str


class Pattern:
    """A subgraph to find, and what to put in its place.

    ``fn(**example_inputs)`` defines the subgraph. Tensor inputs are wildcards, number/list inputs
    scalar wildcards. ``replacement(match)`` emits the new nodes through ``match.call(...)`` and
    returns one node per output of ``fn`` (a node, or a tuple for several). ``predicate(match)``
    returns True to accept a match, or False / a string saying why not (the near-miss report
    shows it). ``optional``: op packets that may be absent from the model (default: casts).

    Example (CLIP's QuickGELU into a custom op ``mylib::quick_gelu``)::

        QUICK_GELU = Pattern(
            "quick_gelu", lambda x: x * torch.sigmoid(1.702 * x),
            example_inputs=dict(x=example(2, 3, 8)),
            replacement=lambda m: m.call(torch.ops.mylib.quick_gelu.default, m["x"]),
            predicate=lambda m: m["x"].meta["val"].dim() >= 2 or "expected activations, not a vector")
    """

    def __init__(self, name: str, fn: Callable, example_inputs: dict, replacement: Callable | None = None,
                 predicate: Callable | None = None, optional=CASTS):
        self.name = name
        self.fn = fn
        self.example_inputs = dict(example_inputs)
        self.replacement = replacement
        self.predicate = predicate
        self.optional = frozenset(optional)
        self.dtype_vars: frozenset = frozenset()  # the example inputs' floating dtypes (set by _build)
        self._graph: fx.Graph | None = None

    def __repr__(self) -> str:
        return f"<Pattern {self.name}>"

    # -- the captured graph, built on first use ---------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        if self._graph is None:
            self._build()
        return self._graph

    @property
    def outputs(self) -> list[fx.Node]:
        return list(self.graph.output_node().args[0])

    @property
    def size(self) -> int:
        """Number of op nodes: what a near miss counts against."""
        return sum(1 for n in self.graph.nodes if n.op == "call_function")

    def _build(self) -> None:
        params = list(inspect.signature(self.fn).parameters)
        missing = [p for p in params if p not in self.example_inputs]
        if missing:
            raise PatternError(f"pattern '{self.name}': no example value for input(s) {', '.join(missing)}")
        # clones: torch.export would fold one tensor given for two inputs into one placeholder
        tensors = {k: v.clone() for k, v in self.example_inputs.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in self.example_inputs.items() if not isinstance(v, torch.Tensor)}
        gm = _capture(self.name, functools.partial(self.fn, **scalars), tensors)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        for node, name in zip(placeholders, tensors):
            node.meta["wildcard"] = name
            if not node.users:
                raise PatternError(f"pattern '{self.name}': input '{name}' is not used")
        for name, value in sorted(scalars.items(), key=lambda kv: not isinstance(kv[1], (list, tuple))):
            if not _substitute(gm.graph, value, ScalarWildcard(name)):
                raise PatternError(
                    f"pattern '{self.name}': the example value {value!r} of scalar input '{name}' does not appear in "
                    "the captured graph; it must be used as an op argument as it is (not computed with)")
        outputs = gm.graph.output_node().args[0]
        if not outputs or not all(isinstance(o, fx.Node) and o.op == "call_function" for o in outputs):
            raise PatternError(f"pattern '{self.name}': every output must be computed by an op, got {outputs}")
        self.dtype_vars = frozenset(v.dtype for v in tensors.values() if v.is_floating_point())
        self._graph = gm.graph


class _Fn(torch.nn.Module):
    """``fn`` as a module taking its tensor inputs positionally (what torch.export wants)."""

    def __init__(self, fn, names):
        super().__init__()
        self.fn, self.names = fn, list(names)

    def forward(self, *args):
        return self.fn(**dict(zip(self.names, args)))


def _capture(name: str, fn: Callable, tensors: dict) -> fx.GraphModule:
    """Capture ``fn`` like a model (torch.export, unlifted, canonicalized) with static shapes, so
    that shape-derived ints are plain constants as they are in the model graph."""
    from ..capture import _unlift
    from ..passes.canonicalize import Canonicalize

    try:
        with torch.no_grad():
            ep = torch.export.export(_Fn(fn, tensors), tuple(tensors.values()), strict=False)
    except Exception as e:  # noqa: BLE001 - name the pattern
        raise PatternError(f"pattern '{name}' cannot be captured: {type(e).__name__}: {e}") from e
    gm = _unlift(ep)
    Canonicalize().run(gm, None)
    gm.graph.eliminate_dead_code()
    out = gm.graph.output_node()
    if not isinstance(out.args[0], (tuple, list)):
        out.args = ((out.args[0],),)
    return gm


def _substitute(graph: fx.Graph, value, marker: ScalarWildcard) -> int:
    """Replace every argument equal to ``value`` (same type) by ``marker``; return how many."""
    count = 0

    def same(a) -> bool:
        if isinstance(a, (list, tuple)) and isinstance(value, (list, tuple)):
            return len(a) == len(value) and all(same_scalar(x, y) for x, y in zip(a, value))
        return same_scalar(a, value)

    def same_scalar(a, b) -> bool:
        return type(a) is type(b) and not isinstance(a, fx.Node) and a == b

    def sub(a):
        nonlocal count
        if same(a):
            count += 1
            return marker
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a

    for node in graph.nodes:
        if node.op == "call_function":
            node.args = tuple(sub(a) for a in node.args)
            node.kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    return count


# ---------------------------------------------------------------------------------------------
# How two nodes compare
# ---------------------------------------------------------------------------------------------


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def _op_class(node: fx.Node):
    """What a node calls, with equivalent spellings folded together."""
    p = _packet(node)
    for group in (CASTS, RESHAPES, PERMUTES):
        if p in group:
            return group
    return p


def op_name(node: fx.Node) -> str:
    """``aten.slice`` for a call of aten.slice.Tensor; the node kind otherwise."""
    if node.op != "call_function":
        return node.op
    p = _packet(node)
    name = getattr(p, "__name__", str(p))
    return str(p) if isinstance(p, torch._ops.OpOverloadPacket) else name


def _rank(x) -> int | None:
    v = val(x)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _arguments(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by name, defaults filled in, in a normal form: ``dim`` counted from
    the end, a slice's ``start``/``end`` explicit and "to the end" as INT64_MAX."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    packet = _packet(node)
    first = node.args[0] if node.args else None
    rank = _rank(node) if packet in _DIM_OF_OUTPUT or not isinstance(first, fx.Node) else _rank(first)
    if "dim" in out and rank:
        out["dim"] = _from_end(out["dim"], rank)
    if packet is aten.slice:
        out["start"] = 0 if out.get("start") is None else out["start"]
        end = out.get("end")
        size = val(first).shape[out["dim"]] if isinstance(val(first), torch.Tensor) and isinstance(out["dim"], int) else None
        if end is None or (isinstance(end, int) and isinstance(size, int) and end >= size):
            out["end"] = _INT64_MAX
    return out


def _from_end(dim, rank: int):
    if isinstance(dim, int) and not isinstance(dim, bool):
        return dim - rank if dim >= 0 else dim
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return type(dim)(_from_end(d, rank) for d in dim)
    return dim


def _permutation(node: fx.Node) -> tuple | None:
    """The axis permutation a transpose/permute/t node applies, dims counted from the end."""
    rank = _rank(node)
    if rank is None:
        return None
    perm = list(range(rank))
    p = _packet(node)
    if p is aten.permute:
        perm = [d % rank for d in node.args[1]]
    else:
        a, b = (node.args[1], node.args[2]) if p is aten.transpose else (0, 1)
        a, b = a % rank, b % rank
        perm[a], perm[b] = perm[b], perm[a]
    return tuple(d - rank for d in perm)


def _same_constant(p, m) -> bool:
    if isinstance(p, bool) or isinstance(m, bool):
        return type(p) is type(m) and p == m
    if isinstance(p, (int, float)) and isinstance(m, (int, float)):
        return p == m or (math.isfinite(p) and math.isclose(p, m, rel_tol=1e-6, abs_tol=0.0))
    try:
        return type(p) is type(m) and bool(p == m)
    except Exception:  # noqa: BLE001 - odd constants are simply unequal
        return False


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


class _State:
    """Bindings of one (partial) match. Forked at every choice, so a dead end costs nothing."""

    __slots__ = ("nodes", "owner", "bound", "dtypes")

    def __init__(self):
        self.nodes: dict[fx.Node, fx.Node] = {}  # pattern op node → model node (skipped casts too)
        self.owner: dict[fx.Node, fx.Node] = {}  # model node → the pattern op node it matched
        self.bound: dict[str, Any] = {}  # wildcard name → model node or constant
        self.dtypes: dict[torch.dtype, torch.dtype] = {}  # pattern dtype variable → model dtype

    def fork(self) -> "_State":
        s = _State()
        s.nodes, s.owner, s.bound, s.dtypes = dict(self.nodes), dict(self.owner), dict(self.bound), dict(self.dtypes)
        return s


@dataclass
class NearMiss:
    """The furthest a pattern got at one anchor before it failed."""

    pattern: str
    matched: int
    total: int
    node: fx.Node | None  # the model node where matching stopped
    reason: str
    anchor: fx.Node | None = None

    def __str__(self) -> str:
        where = ""
        if self.node is not None:
            path = module_path(self.node)
            where = f"; stopped at {op_name(self.node)}{' in ' + path if path else ''}"
        return f"{self.pattern}: matched {self.matched} of {self.total} nodes{where} ({self.reason})"

    def stale(self) -> bool:
        """True once the anchor or the stop node was rewritten by something else."""
        return any(n is not None and n._erased for n in (self.anchor, self.node))


class _Search:
    """Matches one pattern against one graph, remembering the best failure per anchor."""

    def __init__(self, pattern: Pattern):
        self.p = pattern
        self.total = pattern.size
        self.miss: NearMiss | None = None

    def fail(self, st: _State, m, reason: str, args_of_m: bool = False) -> None:
        """Note a dead end at model node ``m``; ``args_of_m``: ``m`` was claimed but its arguments
        differ, so it does not count as matched."""
        matched = len(st.nodes) - (1 if args_of_m else 0)
        if self.miss is None or matched > self.miss.matched:
            self.miss = NearMiss(self.p.name, matched, self.total, m if isinstance(m, fx.Node) else None, reason)

    # -- node against node ------------------------------------------------------------------
    def node(self, p: fx.Node, m, st: _State, at: fx.Node | None = None) -> Iterator[_State]:
        """Match pattern node ``p`` with model value ``m`` (an argument of model node ``at``)."""
        if p.op == "placeholder":
            yield from self.wildcard(p.meta["wildcard"], p, m, st, at)
            return
        if p in st.nodes:  # a pattern node with several users: every use is the same model node
            if st.nodes[p] is m:
                yield st
            else:
                self.fail(st, m, f"expected the same node as %{st.nodes[p].name}")
            return
        optional = _packet(p) in self.p.optional
        if not isinstance(m, fx.Node) or m.op != "call_function":
            self.fail(st, m, f"expected {op_name(p)}")
        elif _op_class(p) != _op_class(m):
            if not optional:
                self.fail(st, m, f"expected {op_name(p)}")
        elif m in st.owner:
            self.fail(st, m, f"already matched as {op_name(st.owner[m])}")
        else:
            s = st.fork()
            if self.dtype_ok(p, m, s):
                s.nodes[p], s.owner[m] = m, p
                yield from self.arguments(p, m, s)
        if optional and isinstance(m, fx.Node):
            s = st.fork()  # the model has no such cast here: go on at the cast's input
            if self.dtype_ok(p, m, s):
                s.nodes[p] = m
                yield from self.node(p.args[0], m, s)

    def wildcard(self, name: str, p: fx.Node, m, st: _State, at: fx.Node | None) -> Iterator[_State]:
        # a wildcard that cannot bind is an argument of ``at`` that differs: ``at`` is not matched
        if not isinstance(m, fx.Node):
            self.fail(st, at, f"input '{name}' must be a node, got the constant {m!r}", at is not None)
        elif name in st.bound:
            if st.bound[name] is m:
                yield st
            else:
                self.fail(st, at or m, f"input '{name}' is %{m.name} here, %{st.bound[name].name} elsewhere",
                          at is not None)
        else:
            s = st.fork()
            if self.dtype_ok(p, m, s):
                s.bound[name] = m
                yield s

    def dtype_ok(self, p: fx.Node, m: fx.Node, st: _State) -> bool:
        """The dtype rule: pattern dtypes of the example inputs are one variable per dtype, bound
        at first use; every other pattern dtype must be the model's exactly."""
        pv, mv = val(p), val(m)
        if not isinstance(pv, torch.Tensor) or not isinstance(mv, torch.Tensor):
            return True
        want = st.dtypes.get(pv.dtype, mv.dtype) if pv.dtype in self.p.dtype_vars else pv.dtype
        if want == mv.dtype:
            if pv.dtype in self.p.dtype_vars:
                st.dtypes.setdefault(pv.dtype, mv.dtype)
            return True
        self.fail(st, m, f"dtype {str(mv.dtype).replace('torch.', '')} where the pattern has "
                         f"{str(want).replace('torch.', '')}")
        return False

    # -- arguments ---------------------------------------------------------------------------
    def arguments(self, p: fx.Node, m: fx.Node, st: _State) -> Iterator[_State]:
        cls = _op_class(p)
        if cls is CASTS:  # the dtype rule has checked the target dtype; the rest is not semantics
            yield from self.values([("self", p.args[0], m.args[0], m)], st)
            return
        if cls is PERMUTES:
            if _permutation(p) != _permutation(m):
                self.fail(st, m, f"permutes {_permutation(m)}, expected {_permutation(p)}", True)
                return
            yield from self.values([("self", p.args[0], m.args[0], m)], st)
            return
        pa, ma = _arguments(p), _arguments(m)
        if cls is RESHAPES:  # reshape(self, shape) / view(self, size)
            pa, ma = ({"self": a.get("self"), "shape": a.get("shape", a.get("size"))} for a in (pa, ma))
        if set(pa) != set(ma):
            self.fail(st, m, f"arguments {sorted(ma)}, expected {sorted(pa)}", True)
            return
        # constants first: a node whose constants differ is not matched, whatever its inputs
        names = sorted(pa, key=lambda k: _has_node(pa[k]))
        yield from self.values([(k, pa[k], ma[k], m) for k in names], st)
        if cls in COMMUTATIVE and pa.get("alpha", 1) == 1 and ma.get("alpha", 1) == 1:
            swap = {"self": "other", "other": "self"}
            yield from self.values([(k, pa[k], ma[swap.get(k, k)], m) for k in names], st)

    def values(self, pairs: list, st: _State) -> Iterator[_State]:
        """Match argument values left to right (``(name, pattern value, model value, model node)``);
        every consistent way through is yielded."""
        if not pairs:
            yield st
            return
        (name, p, m, at), rest = pairs[0], pairs[1:]
        if isinstance(p, fx.Node):
            for s in self.node(p, m, st, at):
                yield from self.values(rest, s)
        elif isinstance(p, ScalarWildcard):
            if p.name in st.bound:
                if _same_value(st.bound[p.name], m):
                    yield from self.values(rest, st)
                else:
                    self.fail(st, at, f"'{p.name}' is {_short(m)} here, {_short(st.bound[p.name])} elsewhere", True)
            elif isinstance(m, fx.Node) and isinstance(val(m), torch.Tensor):
                self.fail(st, at, f"'{p.name}' is the tensor %{m.name}, expected a constant", True)
            else:
                s = st.fork()
                s.bound[p.name] = m
                yield from self.values(rest, s)
        elif isinstance(p, (list, tuple)):
            if not isinstance(m, (list, tuple)) or len(m) != len(p):
                self.fail(st, at, f"argument '{name}' is {_short(m)}, expected {_short(p)}", True)
                return
            yield from self.values([(name, a, b, at) for a, b in zip(p, m)] + rest, st)
        elif isinstance(m, fx.Node) or not _same_constant(p, m):
            self.fail(st, at, f"argument '{name}' is {_short(m)}, expected {_short(p)}", True)
        else:
            yield from self.values(rest, st)


def _has_node(v) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_has_node(x) for x in v)
    return isinstance(v, fx.Node)


def _same_value(a, b) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return _same_constant(a, b)


def _short(v) -> str:
    if isinstance(v, fx.Node):
        return f"%{v.name}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, ScalarWildcard):
        return f"<{v.name}>"
    return repr(v)


# ---------------------------------------------------------------------------------------------
# Match
# ---------------------------------------------------------------------------------------------


@dataclass
class Match:
    """One occurrence of a pattern in a model graph.

    ``match["x"]`` is what wildcard ``x`` bound (a node, or a constant for a scalar wildcard);
    ``outputs`` the model nodes that compute the pattern's outputs; ``nodes`` maps every pattern op
    node to its model node; ``internal`` is the set of model nodes the match covers (outputs
    included, inputs not). A replacement function emits nodes with :meth:`call`; they are
    collected in ``created``.
    """

    pattern: Pattern
    gm: fx.GraphModule
    bindings: dict[str, Any]
    nodes: dict[fx.Node, fx.Node]
    outputs: list[fx.Node]
    internal: set[fx.Node] = field(default_factory=set)
    insert_before: fx.Node | None = None  # set once the match is validated: before the outputs' first user
    created: list[fx.Node] = field(default_factory=list)

    def __getitem__(self, name: str):
        return self.bindings[name]

    @property
    def module_path(self) -> str:
        return module_path(self.outputs[0])

    @property
    def inputs(self) -> list[fx.Node]:
        """The model nodes the match reads: wildcard bindings and nodes inside scalar bindings."""
        found = []
        fx.node.map_arg(list(self.bindings.values()), found.append)
        return found

    def call(self, op, *args, **kwargs):
        """Emit ``op(*args, **kwargs)`` at the match's place, with ``meta['val']`` and the module
        path; an op returning several tensors gives a tuple of ``getitem`` nodes.

            y, h = match.call(torch.ops.fxopt.add_rms_norm.default, m["x"], m["r"], m["w"], m["eps"])
        """
        graph = self.gm.graph
        with graph.inserting_before(self.insert_before):
            node = graph.call_function(op, args, kwargs)
            self._adopt(node, {"pattern": self.pattern.name})
            returns = getattr(getattr(op, "_schema", None), "returns", ())
            if len(returns) <= 1:
                return node
            items = tuple(graph.call_function(operator.getitem, (node, i)) for i in range(len(returns)))
            for item in items:
                self._adopt(item)
            return items

    def _adopt(self, node: fx.Node, note: dict | None = None) -> None:
        anchor = self.outputs[0]
        for key in ("nn_module_stack", "stack_trace"):
            if key in anchor.meta:
                node.meta[key] = anchor.meta[key]
        if note:
            node.meta.setdefault("fxopt", {}).update(note)
        infer_meta(self.gm, node)
        self.created.append(node)


def infer_meta(gm: fx.GraphModule, node: fx.Node) -> None:
    """Set ``meta['val']`` of a new node from its arguments' (``ir.fake_call``), so later matches
    read its shape and a pass that keeps its values (``Pass.preserves_meta``) need not propagate
    the whole graph; left unset where the op cannot run on fake tensors."""
    mode = fake_mode_of(gm)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        node.meta["val"] = mode.from_tensor(obj, static_shapes=True)
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    try:
        node.meta["val"] = fake_call(mode, node.target, args, kwargs)
    except Exception:  # noqa: BLE001 - the pass manager re-propagates after the pass anyway
        node.meta.pop("val", None)


# ---------------------------------------------------------------------------------------------
# Finding matches
# ---------------------------------------------------------------------------------------------


def _candidates(p: fx.Node, st: _State) -> list[fx.Node]:
    """Model nodes that may compute pattern output ``p``: same op, forward of what is bound
    already, nearest first (the k-side of a rotary next to its q-side)."""
    frontier = list(st.owner) + [v for v in st.bound.values() if isinstance(v, fx.Node)]
    seen, found = set(), []
    for _depth in range(8):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
                    if u.op == "call_function" and _op_class(u) == _op_class(p) and u not in st.owner:
                        found.append(u)
        frontier = nxt
    return found


def _try(search: _Search, anchor: fx.Node, gm: fx.GraphModule) -> Match | None:
    """The first full, valid match of the pattern with its first output at ``anchor``."""
    pattern = search.p
    outputs = pattern.outputs
    for st in search.node(outputs[0], anchor, _State()):
        for full in _more_outputs(search, outputs[1:], st):
            match = Match(pattern, gm, dict(full.bound), dict(full.nodes), [full.nodes[o] for o in outputs],
                          internal=set(full.owner))
            reason, where = _validate(match)
            if reason is None and pattern.predicate is not None:
                verdict = pattern.predicate(match)
                if verdict is not True:
                    reason, where = (verdict if isinstance(verdict, str) else "rejected by its predicate"), anchor
            if reason is None:
                return match
            search.fail(full, where, reason)
    return None


def _more_outputs(search: _Search, rest: list[fx.Node], st: _State) -> Iterator[_State]:
    if not rest:
        yield st
        return
    p = rest[0]
    if p in st.nodes:
        yield from _more_outputs(search, rest[1:], st)
        return
    for cand in _candidates(p, st):
        for s in search.node(p, cand, st):
            yield from _more_outputs(search, rest[1:], s)


def _validate(match: Match) -> tuple[str | None, fx.Node | None]:
    """Why the structural match cannot be rewritten (None: it can), and at which node."""
    internal = match.internal
    inputs = match.inputs
    for n in inputs:
        if n in internal:
            return f"%{n.name} would be both an input and a computed node", n
    outs = set(match.outputs)
    for n in internal - outs:
        outside = [u for u in n.users if u not in internal]
        if outside and not (_packet(n) in SHAREABLE and all(a not in internal for a in n.all_input_nodes)):
            return f"%{n.name} is also used outside the match, by %{outside[0].name}", n
    users = [u for o in match.outputs for u in o.users if u not in internal]
    first_user = min(users) if users else max(match.outputs)
    last_input = max(inputs) if inputs else None
    if last_input is not None and not last_input < first_user:
        return f"an output is used by %{first_user.name} before input %{last_input.name} exists", first_user
    match.insert_before = first_user
    return None, None


def _anchors(gm: fx.GraphModule, pattern: Pattern) -> list[fx.Node]:
    want = _op_class(pattern.outputs[0])
    return [n for n in gm.graph.nodes if n.op == "call_function" and _op_class(n) == want]


def _worth_reporting(miss: NearMiss) -> bool:
    """A near miss worth a line: every node matched (then refused), or it got past the anchor and
    through a third of the pattern."""
    return miss.matched == miss.total or (miss.matched >= 2 and 3 * miss.matched >= miss.total)


class Matches(list):
    """The matches of :func:`match_all`, with ``near_misses``: the best failure at each anchor
    that got far enough to be worth reporting, best first."""

    near_misses: list[NearMiss]

    @property
    def near_miss(self) -> NearMiss | None:
        live = [m for m in self.near_misses if not m.stale()]
        return live[0] if live else None


def match_all(gm: fx.GraphModule, pattern: Pattern) -> Matches:
    """Every non-overlapping match of ``pattern`` in ``gm`` (graph order), without rewriting.

        >>> ms = match_all(gm, RMS)
        >>> [(m.module_path, m["eps"]) for m in ms]
        [('model.layers.0.input_layernorm', 1e-06), ...]
        >>> print(ms.near_miss)     # None when every candidate matched or none came close
    """
    return _run(gm, pattern, rewrite=False)


def rewrite(gm: fx.GraphModule, pattern: Pattern) -> Matches:
    """Replace every match of ``pattern`` by ``pattern.replacement``; return the matches made.

    Each replacement goes in just before the first user of the match's outputs; the nodes it
    covered are erased (shared view ops stay while something else uses them). New nodes carry
    ``meta['fxopt'] = {'pattern': name}``, so the dumps say what produced them.
    """
    if pattern.replacement is None:
        raise PatternError(f"pattern '{pattern.name}' has no replacement")
    return _run(gm, pattern, rewrite=True)


def _run(gm: fx.GraphModule, pattern: Pattern, rewrite: bool) -> Matches:
    found, misses, taken = Matches(), [], set()
    for anchor in _anchors(gm, pattern):
        if anchor._erased or anchor in taken:
            continue
        search = _Search(pattern)
        match = _try(search, anchor, gm)
        if match is not None and not (match.internal & taken):
            if rewrite:
                _replace(match)
            else:
                taken |= match.internal
            found.append(match)
        elif search.miss is not None and _worth_reporting(search.miss):
            search.miss.anchor = anchor
            misses.append(search.miss)
    misses.sort(key=lambda m: -m.matched / m.total)
    found.near_misses = misses
    return found


def _replace(match: Match) -> None:
    new = match.pattern.replacement(match)
    new = tuple(new) if isinstance(new, (tuple, list)) else (new,)
    if len(new) != len(match.outputs):
        raise PatternError(f"pattern '{match.pattern.name}': the replacement returned {len(new)} value(s) for "
                           f"{len(match.outputs)} output(s)")
    internal = match.internal
    for old, replacement in zip(match.outputs, new):
        old.replace_all_uses_with(replacement, delete_user_cb=lambda u: u not in internal)
    graph = match.gm.graph
    for node in sorted(internal, reverse=True):
        if not node.users:
            graph.erase_node(node)


def annotate_near_miss(miss: NearMiss) -> None:
    """Write the near miss on the node where it stopped, for the dumps:
    ``{near_miss=rotary: matched 6 of 16 nodes ...}``."""
    if miss.node is not None and not miss.node._erased:
        notes = miss.node.meta.setdefault("fxopt", {})
        notes["near_miss"] = "; ".join(filter(None, [notes.get("near_miss"), str(miss)]))


# ---------------------------------------------------------------------------------------------
# Registry of user patterns
# ---------------------------------------------------------------------------------------------

_USER_PATTERNS: list[tuple[Pattern, bool]] = []


def register_pattern(pattern: Pattern, *, first: bool = False) -> Pattern:
    """Make the ``fuse`` pass apply ``pattern`` (after the built-in patterns; ``first=True``:
    before them). Registering a pattern of the same name again replaces it.

        fxopt.patterns.register_pattern(Pattern("my_norm", my_norm, example_inputs=..., replacement=...))
        fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", "dce"])
    """
    if pattern.replacement is None:
        raise PatternError(f"pattern '{pattern.name}' has no replacement")
    unregister_pattern(pattern.name)
    _USER_PATTERNS.append((pattern, first))
    return pattern


def unregister_pattern(name: str) -> None:
    _USER_PATTERNS[:] = [(p, f) for p, f in _USER_PATTERNS if p.name != name]


def registered_patterns(first: bool | None = None) -> list[Pattern]:
    """User patterns, in registration order (``first``: only those that run before / after)."""
    return [p for p, f in _USER_PATTERNS if first is None or f == first]
