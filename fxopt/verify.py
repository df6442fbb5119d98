"""Numeric verification: does the graph after a pass still compute what the eager model computes?

``compare(got, want)`` measures the relative error ‖got − want‖ / ‖want‖ of every output leaf,
with a tolerance chosen by dtype (NaN never passes), or the one given (``tol=``: a float or a
function of the dtype: an approximate pass's bound). When a pass breaks the numbers,
``first_divergence(before, after, inputs)`` runs both graphs node by node and names the first
node of the new graph whose value differs from the node of the same name in the old one, or from
the old node it replaced (a new node that took an old one's place as an argument of a node both
graphs share: ``quantize``'s ``quant_linear`` for a ``linear``).

Example::

    >>> errors = compare(gm(*inputs), reference_leaves)
    >>> worst = max(e.rel_error for e in errors)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.fx as fx

from .ir import describe

# Relative error allowed between a graph and its eager model, by the dtype of the output.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4) if dtype.is_floating_point else 0.0


Tol = Union[float, Callable[[torch.dtype], float], None]


def _tol(tol: Tol, dtype: torch.dtype) -> float:
    """The tolerance for an output of ``dtype``: ``tol`` (a float, or a function of the dtype
    returning a float or None), else the dtype's own."""
    if tol is None:
        return tolerance(dtype)
    value = tol(dtype) if callable(tol) else tol
    return tolerance(dtype) if value is None else float(value)


@dataclass
class LeafError:
    index: int
    rel_error: float
    ok: bool
    detail: str = ""


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; inf when shapes differ or a NaN appears."""
    if got.shape != want.shape:
        return float("inf")
    if not got.dtype.is_floating_point and not want.dtype.is_floating_point:
        return 0.0 if torch.equal(got, want) else float("inf")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if torch.isnan(g).any() and not torch.isnan(w).any():
        return float("nan")
    diff = torch.linalg.vector_norm(torch.nan_to_num(g - w, nan=0.0))
    scale = torch.linalg.vector_norm(torch.nan_to_num(w, nan=0.0)).clamp_min(1e-30)
    return float(diff / scale)


def compare(got, want, tol: Tol = None) -> list[LeafError]:
    """Compare two flat lists of outputs leaf by leaf; ``tol``: see :func:`_tol`."""
    errors = []
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor):
                errors.append(LeafError(i, float("inf"), False, f"got {type(g).__name__}, expected a tensor"))
                continue
            err = rel_error(g, w)
            ok = err == err and err <= _tol(tol, w.dtype)  # err != err: NaN
            detail = "" if g.shape == w.shape else f"shape {list(g.shape)} vs {list(w.shape)}"
            errors.append(LeafError(i, err, ok, detail))
        else:
            errors.append(LeafError(i, 0.0 if g == w else float("inf"), g == w))
    if len(got) != len(want):
        errors.append(LeafError(len(want), float("inf"), False, f"{len(got)} outputs vs {len(want)}"))
    return errors


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, object] = {}

    def run_node(self, node):
        result = super().run_node(node)
        self.values[node.name] = result
        return result


def run_recorded(gm: fx.GraphModule, inputs) -> dict[str, object]:
    """Every node's value (by node name) for one run of ``gm`` on ``inputs``."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def first_divergence(before: fx.GraphModule, after: fx.GraphModule, inputs, tol: Tol = None) -> str | None:
    """Name the first node of ``after`` whose value diverges (relative error above ``tol``, by
    default the dtype's tolerance) from the same-named node of ``before``, or from the node of
    ``before`` it replaced (see the module docstring)."""
    try:
        old = run_recorded(before, inputs)
        new = run_recorded(after, inputs)
    except Exception as e:  # noqa: BLE001 - the localisation is best effort
        return f"(node-by-node replay failed: {type(e).__name__}: {e})"
    replaced = _replacements(before, after)
    for node in after.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.name in old:
            b, against = old[node.name], "against the graph before the pass"
        elif node in replaced:
            b, against = old[replaced[node].name], f"against %{replaced[node].name}, which it replaced"
        else:
            continue
        a = new.get(node.name)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            err = rel_error(a, b)
            if not (err <= _tol(tol, b.dtype)):
                return f"{describe(node)}: relative error {err:.3g} {against}"
    new_nodes = [n for n in after.graph.nodes if n.name not in old and n.op == "call_function"]
    if new_nodes:
        return "no shared node diverged; the pass's new nodes are " + ", ".join(describe(n) for n in new_nodes[:5])
    return None


def _flat_nodes(args) -> list:
    """The leaves of a node's args/kwargs, in order (fx nodes and constants)."""
    out = []

    def visit(a):
        if isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for k in sorted(a):
                visit(a[k])
        else:
            out.append(a)

    visit(args)
    return out


def _replacements(before: fx.GraphModule, after: fx.GraphModule) -> dict:
    """``{new node of after: node of before it replaced}``: where a node both graphs share (same
    name, same target, same number of arguments) reads, at one argument position, a node only
    ``after`` has instead of the node ``before`` read there (a rewritten linear, or a new op
    wrapped around an old one)."""
    old_nodes = {n.name: n for n in before.graph.nodes}
    out = {}
    for node in after.graph.nodes:
        twin = old_nodes.get(node.name)
        if twin is None or twin.op != node.op or twin.target != node.target:
            continue
        mine, theirs = _flat_nodes((node.args, node.kwargs)), _flat_nodes((twin.args, twin.kwargs))
        if len(mine) != len(theirs):
            continue
        for a, b in zip(mine, theirs):
            # computed values only: a weight may change layout on purpose (canonicalize transposes)
            if (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name not in old_nodes
                    and a.op == "call_function"):
                out.setdefault(a, b)
    return out
