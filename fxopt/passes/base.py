"""What a pass is, and the registry that names passes by string.

A pass rewrites a GraphModule in place. Two spellings are accepted:

    class FoldDoubleNeg(fxopt.Pass):
        name = "fold_double_neg"

        def run(self, gm, ctx):
            hits = 0
            for node in list(gm.graph.nodes):
                if is_op(node, aten.neg) and is_op(node.args[0], aten.neg):
                    node.replace_all_uses_with(node.args[0].args[0])
                    hits += 1
            return fxopt.PassResult(changed=hits > 0, stats={"folded": hits})

    def my_pass(gm):           # a plain function: gm -> gm | None
        ...

and both go into ``fxopt.compile(model, passes=["canonicalize", FoldDoubleNeg(), my_pass])``.
``register_pass`` makes a pass nameable by string.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.fx as fx

from ..errors import PassError


@dataclass
class PassResult:
    """What a pass reports: whether it changed the graph, and counters for the report."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    gm: fx.GraphModule | None = None  # a pass may return a new GraphModule instead of editing in place


@dataclass
class CompileContext:
    """Options and facts shared by the passes of one compilation.

    ``options`` holds the user's pass options (``max_batch_size``, ``max_seq_len``, ...);
    ``info`` is the :class:`~fxopt.capture.CaptureInfo` of the captured model.
    """

    info: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default=None):
        return self.options.get(name, default)


class Pass:
    """Base class of a graph pass: a ``name`` and ``run(gm, ctx) -> PassResult``.

    **Exact or approximate.** A pass is *exact* by default: with ``verify=True`` the manager
    holds its graph to the dtype tolerance of :mod:`fxopt.verify` (fp32: 1e-4 relative). A pass
    that changes the numbers on purpose (``quantize``) says so by overriding :meth:`tolerance`:
    the relative output error it accepts, decided from its options *before* anything is
    measured (a bound a pass derived from its own measurement would accept its own bugs). The
    manager then

    - checks the graph after this pass against the outputs of the graph before it with that
      bound (and names the first node that exceeds it when it fails);
    - takes the outputs of the graph after this pass as the reference of every later pass: those
      are checked at the tight dtype tolerance against it (an exact pass after ``quantize`` must
      still be exact), and their error against the eager model is checked against the sum of the
      bounds so far;
    - reports both errors (``PassRecord.max_error`` against eager, ``step_error`` against the
      reference, ``tolerance``, ``reference``).

    A pass that returns ``changed=False`` is held to the tight tolerance whatever it declares.
    """

    name: str = "pass"
    #: True when every node's meta['val'] is right after the pass (it only removes nodes, or it
    #: propagated shapes itself as its last step), so the manager may skip re-propagating them.
    preserves_meta: bool = False

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        raise NotImplementedError

    def tolerance(self, dtype, ctx: CompileContext) -> float | None:
        """The relative error (``‖after − before‖ / ‖before‖`` per output) this pass accepts on an
        output of ``dtype`` on purpose, or None for an exact pass (the default). Called by the
        pass manager after :meth:`run`, with the same ``ctx``; include the dtype's own rounding
        (``fxopt.verify.tolerance(dtype)``) in the bound."""
        return None

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """Wraps a plain function ``gm -> gm | None`` (or ``(gm, ctx) -> ...``) as a pass."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function_pass")

    def run(self, gm, ctx):
        before = _fingerprint(gm)
        try:
            out = self.fn(gm, ctx)
        except TypeError as e:
            if "positional argument" not in str(e):
                raise
            out = self.fn(gm)
        if isinstance(out, PassResult):
            return out
        if out is not None and not isinstance(out, fx.GraphModule):
            raise PassError(f"pass '{self.name}' returned {type(out).__name__}; a function pass returns a "
                            "GraphModule, a PassResult or None")
        new = out if out is not None else gm
        return PassResult(changed=out is not None and out is not gm or _fingerprint(new) != before, gm=out)


def _fingerprint(gm: fx.GraphModule) -> str:
    return str(gm.graph)


_REGISTRY: dict[str, Callable[[], Pass]] = {}


def register_pass(name: str | None = None):
    """Register a Pass subclass (or a function) under a name usable in ``passes=[...]``.

        @fxopt.register_pass("my_pass")
        class MyPass(fxopt.Pass): ...
    """

    def deco(obj):
        key = name or getattr(obj, "name", None) or obj.__name__
        if isinstance(obj, type) and issubclass(obj, Pass):
            _REGISTRY[key] = obj
        else:
            _REGISTRY[key] = lambda: FunctionPass(obj, key)
        return obj

    return deco


def available_passes() -> list[str]:
    return sorted(_REGISTRY)


PassLike = Union[str, Pass, Callable]


def resolve(spec: PassLike) -> Pass:
    """A pass from a registered name, a Pass instance or class, or a function."""
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            known = ", ".join(available_passes())
            raise PassError(f"unknown pass '{spec}'; known passes: {known}")
        return _REGISTRY[spec]()
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    if callable(spec):
        return FunctionPass(spec)
    raise PassError(f"a pass must be a name, a Pass or a function gm -> gm | None; got {spec!r}")
