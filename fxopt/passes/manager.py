"""The pass manager: runs passes in order and owns the work around each one.

After every pass it lints the graph and re-propagates ``meta['val']``, times the pass, counts
nodes, optionally checks the numbers against the eager model (``verify=True``) and writes graph
dumps (``dump_dir``). ``disable=[...]`` and ``stop_after=...`` bisect a bad pass.

Verification with approximate passes: a pass whose :meth:`~fxopt.passes.base.Pass.tolerance`
declares a bound (``quantize``) is checked against the outputs of the graph before it with that
bound; its own outputs then become the reference of the later passes, which are checked at the
tight dtype tolerance against them, and against the eager model within the sum of the bounds.

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
from ..verify import compare, first_divergence, tolerance
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
    # verify=True (see Pass.tolerance): ``reference`` is what the pass was checked against, "eager"
    # or the name of the last approximate pass before it (whose graph's outputs stand for the graph
    # before this pass); ``step_error`` the worst relative error against it; ``tolerance`` the
    # bound that held (the first output's dtype); ``approximate``: the pass declared that bound.
    step_error: float | None = None
    tolerance: float | None = None
    reference: str | None = None
    approximate: bool = False


class Report(list):
    """The per-pass table of a compilation (a list of :class:`PassRecord`); prints as a table,
    under a line on the capture before the passes (``capture``, set by ``fxopt.compile``)."""

    capture: str = ""
    capture_seconds: float | None = None

    def __str__(self) -> str:
        # with an approximate pass verified, two more columns: the error against the reference
        # each pass was checked against, and the bound (marked * where it is a declared one)
        steps = any(r.approximate for r in self)
        fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
        head = f"{'pass':<16} {'time':>8} {'nodes':>11} {'changed':>7} {'max err':>9}"
        if steps:
            head += f" {'step err':>9} {'bound':>10}"
        head += "  stats"
        lines = [self.capture] if self.capture else []
        lines += [head, "-" * len(head)]
        for r in self:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            if r.skipped:
                stats = f"({r.skipped})"
            line = (f"{r.name:<16} {r.seconds * 1e3:>6.1f}ms {r.nodes_before:>5}→{r.nodes_after:<5} "
                    f"{'yes' if r.changed else 'no':>7} {fmt(r.max_error):>9}")
            if steps:
                bound = fmt(r.tolerance) + ("*" if r.approximate else " ")
                line += f" {fmt(r.step_error):>9} {bound:>10}"
            lines.append(f"{line}  {stats}")
        if steps:
            lines.append("(max err: against the eager model; step err: against the graph after the last pass "
                         "marked *, which changes the numbers on purpose, or for that pass against the graph "
                         "before it; bound: what step err was checked against)")
        return "\n".join(lines)

    def as_dicts(self) -> list[dict]:
        return [r.__dict__.copy() for r in self]


def _capture_note(info) -> str | None:
    """The dump's line on the capture step: the model, and how its layers were traced."""
    if info is None:
        return None
    return f"captured {info.model_class}" + (f"; {info.layers}" if getattr(info, "layers", "") else "")


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
        # verify: the outputs later passes are checked against (eager until an approximate pass
        # has run), its name, and the bounds of the approximate passes so far
        self._step_reference = None
        self._step_name = "eager"
        self._bounds: list = []

    def run(self, gm: fx.GraphModule, ctx: CompileContext, *, inputs=None, reference=None) -> fx.GraphModule:
        """Run the pipeline over ``gm``; with ``verify``, ``inputs`` are flat graph inputs and
        ``reference`` the eager model's flat outputs on them."""
        self._step_reference, self._step_name, self._bounds = reference, "eager", []
        if self.dumper:
            self.dumper.dump(0, "capture", gm, changed=True, note=_capture_note(ctx.info))
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
            self._check(p, ctx, record, snapshot, gm, inputs, reference)
        if self.dumper:
            note = None
            if record.max_error is not None:
                note = f"max rel error {record.max_error:.2e}"
                if record.approximate:
                    note += (f" against eager; {record.step_error:.2e} against the graph before the pass "
                             f"(bound {record.tolerance:.2e}, declared by the pass)")
                elif record.reference not in (None, "eager"):
                    note += (f" against eager; {record.step_error:.2e} against the graph after '{record.reference}' "
                             f"(bound {record.tolerance:.2e})")
            self.dumper.dump(step, p.name, gm, changed=record.changed, stats=record.stats, seconds=seconds, note=note)
        return gm

    def _check(self, p, ctx, record, before, after, inputs, eager) -> None:
        """Verify ``after`` (see the module docstring); fills ``record``'s errors or raises
        :class:`VerificationError` naming the first diverging node."""
        name = p.name
        with torch.no_grad():
            try:
                got = after(*inputs)
            except Exception as e:  # noqa: BLE001
                raise VerificationError(f"after pass '{name}' the graph fails to run: {type(e).__name__}: {e}") from e
        got = list(got)
        dtypes = [t.dtype for t in eager if isinstance(t, torch.Tensor)]
        bound = None  # an approximate pass's declared bound, as a function of the dtype
        if record.changed and any(p.tolerance(d, ctx) is not None for d in dtypes):
            bound = lambda dtype: p.tolerance(dtype, ctx)  # noqa: E731 - None for a dtype: the dtype's own
        ref_name = self._step_name
        record.approximate = bound is not None
        record.reference = ref_name
        record.tolerance = _limit(bound, dtypes[0]) if dtypes else None

        # 1. against the reference: the graph before this pass with its bound when it is
        #    approximate; else tightly, against eager or the last approximate pass's graph
        step = compare(got, list(self._step_reference), bound)
        record.step_error = max((e.rel_error for e in step), default=0.0)
        bad = [e for e in step if not e.ok]
        if bad:
            e = bad[0]
            want = self._step_reference[e.index] if e.index < len(self._step_reference) else None
            limit = _limit(bound, want.dtype) if isinstance(want, torch.Tensor) else 0.0
            if bound is not None:
                what = (f"the graph before it by more than the pass declares it may: relative error "
                        f"{e.rel_error:.3g} > {limit:.3g}")
            elif ref_name == "eager":
                what = f"the eager model: relative error {e.rel_error:.3g}"
            else:
                what = (f"the graph after '{ref_name}' (the last pass that changes the numbers on purpose; later "
                        f"passes must keep them): relative error {e.rel_error:.3g} > {limit:.3g}")
            where = first_divergence(before, after, inputs, bound) if before is not None else None
            raise VerificationError(f"after pass '{name}', output {e.index} diverges from {what} {e.detail}".rstrip()
                                    + (f"\n  first diverging node: {where}" if where else ""))

        # 2. against eager: within the dtype tolerance plus the bounds of the approximate passes so
        #    far (the first check implies it up to rounding; it bounds what several of them add up to)
        if bound is not None:
            self._bounds.append(bound)
        bounds = list(self._bounds)
        budget = None
        if bounds:
            budget = lambda dtype: tolerance(dtype) + sum(_limit(b, dtype) for b in bounds)  # noqa: E731
        against_eager = compare(got, list(eager), budget)
        record.max_error = max((e.rel_error for e in against_eager), default=0.0)
        bad = [e for e in against_eager if not e.ok]
        if bad:
            e = bad[0]
            raise VerificationError(
                f"after pass '{name}', output {e.index} diverges from the eager model by more than the approximate "
                f"passes so far ({', '.join(r.name for r in self.report if r.approximate)}) declare together: "
                f"relative error {e.rel_error:.3g} {e.detail}".rstrip())

        if bound is not None:  # later passes are checked against this graph's outputs
            self._step_reference = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in got]
            self._step_name = name


def _limit(bound, dtype) -> float:
    """What an output of ``dtype`` is held to: the declared bound, else the dtype's tolerance."""
    value = bound(dtype) if bound is not None else None
    return tolerance(dtype) if value is None else float(value)


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
