"""Numeric verification: does the graph after a pass still compute what the eager model computes?

``compare(got, want)`` measures the relative error ‖got − want‖ / ‖want‖ of every output leaf,
with a tolerance chosen by dtype (NaN never passes). When a pass breaks the numbers,
``first_divergence(before, after, inputs)`` runs both graphs node by node and names the first
node of the new graph whose value differs from the node of the same name in the old one.

Example::

    >>> errors = compare(gm(*inputs), reference_leaves)
    >>> worst = max(e.rel_error for e in errors)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .ir import describe

# Relative error allowed between a graph and its eager model, by the dtype of the output.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4) if dtype.is_floating_point else 0.0


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


def compare(got, want) -> list[LeafError]:
    """Compare two flat lists of outputs leaf by leaf."""
    errors = []
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor):
                errors.append(LeafError(i, float("inf"), False, f"got {type(g).__name__}, expected a tensor"))
                continue
            err = rel_error(g, w)
            ok = err == err and err <= tolerance(w.dtype)  # err != err: NaN
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


def first_divergence(before: fx.GraphModule, after: fx.GraphModule, inputs) -> str | None:
    """Name the first node of ``after`` whose value diverges from the same-named node of ``before``."""
    try:
        old = run_recorded(before, inputs)
        new = run_recorded(after, inputs)
    except Exception as e:  # noqa: BLE001 - the localisation is best effort
        return f"(node-by-node replay failed: {type(e).__name__}: {e})"
    for node in after.graph.nodes:
        if node.op in ("placeholder", "output") or node.name not in old:
            continue
        a, b = new.get(node.name), old[node.name]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            err = rel_error(a, b)
            if not (err <= tolerance(b.dtype)):
                return f"{describe(node)}: relative error {err:.3g} against the graph before the pass"
    new_nodes = [n for n in after.graph.nodes if n.name not in old and n.op == "call_function"]
    if new_nodes:
        return "no shared node diverged; the pass's new nodes are " + ", ".join(describe(n) for n in new_nodes[:5])
    return None
