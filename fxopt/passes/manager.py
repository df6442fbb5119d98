"""The pass manager: runs passes in order and owns the work around each one.

After every pass it lints the graph and re-propagates ``meta['val']``, times the pass, counts
nodes, optionally checks the numbers against the eager model (``verify=True``) and writes graph
dumps (``dump_dir``). ``disable=[...]`` and ``stop_after=...`` bisect a bad pass.

Example::

    >>> pm = PassManager(["canonicalize", "dce"], verify=True, dump_dir="dumps")
    >>> gm = pm.run(gm, ctx, reference=eager_outputs, inputs=flat_inputs)
    >>> print(pm.report)
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..errors import FxoptError, PassError, VerificationError
from ..ir import describe, lint, propagate_meta
from ..verify import compare, first_divergence
from .base import CompileContext, PassLike, resolve


@dataclass
class PassRecord:
    """One row of the compile report."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    stats: dict = field(default_factory=dict)
    max_error: float | None = None  # worst relative output error against eager (verify=True)
    skipped: str = ""


class Report(list):
    """The per-pass table of a compilation (a list of :class:`PassRecord`); prints as a table."""

    def __str__(self) -> str:
        head = f"{'pass':<16} {'time':>8} {'nodes':>11} {'changed':>7} {'max err':>9}  stats"
        lines = [head, "-" * len(head)]
        for r in self:
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            if r.skipped:
                stats = f"({r.skipped})"
            lines.append(f"{r.name:<16} {r.seconds * 1e3:>6.1f}ms {r.nodes_before:>5}→{r.nodes_after:<5} "
                         f"{'yes' if r.changed else 'no':>7} {err:>9}  {stats}")
        return "\n".join(lines)

    def as_dicts(self) -> list[dict]:
        return [r.__dict__.copy() for r in self]


def _count(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


class PassManager:
    def __init__(self, passes: list[PassLike], *, verify: bool = False, dump_dir=None,
                 disable: list[str] | None = None, stop_after: str | None = None, progress: bool = False):
        self.progress = progress
        self.passes = [resolve(p) for p in passes]
        self.verify = verify
        self.disable = set(disable or [])
        self.stop_after = stop_after
        names = {p.name for p in self.passes}
        for name in self.disable | ({stop_after} if stop_after else set()):
            if name not in names:
                raise PassError(f"'{name}' (in disable/stop_after) is not in the pipeline: {', '.join(names)}")
        self.dumper = None
        if dump_dir is not None:
            from ..dump import GraphDumper
            self.dumper = GraphDumper(dump_dir)
        self.report = Report()

    def run(self, gm: fx.GraphModule, ctx: CompileContext, *, inputs=None, reference=None) -> fx.GraphModule:
        """Run the pipeline over ``gm``; with ``verify``, ``inputs`` are flat graph inputs and
        ``reference`` the eager model's flat outputs on them."""
        if self.dumper:
            self.dumper.dump(0, "capture", gm, changed=True, note=f"captured {ctx.info.model_class}" if ctx.info else None)
        bar = tqdm(total=len(self.passes), desc="passes", unit="pass", file=sys.stderr, disable=not self.progress,
                   leave=False)
        with bar:
            for step, p in enumerate(self.passes, start=1):
                bar.set_postfix_str(p.name)
                if p.name in self.disable:
                    self.report.append(PassRecord(p.name, 0.0, _count(gm), _count(gm), False, skipped="disabled"))
                else:
                    gm = self._run_one(step, p, gm, ctx, inputs, reference)
                bar.update()
                if p.name == self.stop_after:
                    break
        return gm

    def _run_one(self, step, p, gm, ctx, inputs, reference):
        before_nodes = _count(gm)
        snapshot = _copy_for_bisect(gm) if self.verify else None
        t0 = time.perf_counter()
        try:
            result = p.run(gm, ctx)
        except FxoptError:
            raise
        except Exception as e:  # noqa: BLE001 - name the pass that failed
            raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        if result is None:
            raise PassError(f"pass '{p.name}'.run() returned None; it must return a PassResult")
        if result.gm is not None:
            gm = result.gm
        try:
            lint(gm)
        except Exception as e:  # noqa: BLE001
            raise PassError(f"pass '{p.name}' left a malformed graph: {e}") from e
        if result.changed and not p.preserves_meta:
            propagate_meta(gm)
        seconds = time.perf_counter() - t0
        record = PassRecord(p.name, seconds, before_nodes, _count(gm), bool(result.changed), dict(result.stats))
        self.report.append(record)
        if self.verify and inputs is not None and reference is not None:
            record.max_error = self._check(p.name, snapshot, gm, inputs, reference)
        if self.dumper:
            self.dumper.dump(step, p.name, gm, changed=record.changed, stats=record.stats, seconds=seconds,
                             note=None if record.max_error is None else f"max rel error {record.max_error:.2e}")
        return gm

    def _check(self, name, before, after, inputs, reference) -> float:
        with torch.no_grad():
            try:
                got = after(*inputs)
            except Exception as e:  # noqa: BLE001
                raise VerificationError(f"after pass '{name}' the graph fails to run: {type(e).__name__}: {e}") from e
        errors = compare(list(got), list(reference))
        bad = [e for e in errors if not e.ok]
        worst = max((e.rel_error for e in errors), default=0.0)
        if bad:
            e = bad[0]
            where = first_divergence(before, after, inputs) if before is not None else None
            raise VerificationError(
                f"after pass '{name}', output {e.index} diverges from the eager model: relative error "
                f"{e.rel_error:.3g} {e.detail}".rstrip() + (f"\n  first diverging node: {where}" if where else ""))
        return worst


def _copy_for_bisect(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` holding today's weights, to replay the graph before the pass node by node
    (passes may swap weights on ``gm``: canonicalize transposes, quantize packs)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    attrs = {n.target: _fetch(gm, n.target) for n in gm.graph.find_nodes(op="get_attr")}
    return fx.GraphModule(attrs, graph)


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["PassManager", "PassRecord", "Report", "CompileContext", "describe"]
