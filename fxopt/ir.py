"""The IR contract every pass may rely on, and the helpers that keep it.

A captured model is a plain ``torch.fx.GraphModule``:

- weights are ``get_attr`` nodes whose target is the original parameter name
  (``model.layers.0.self_attn.q_proj.weight``);
- every node carries ``meta['val']``: a FakeTensor (with symbolic batch/sequence dims), a tuple of
  them, a SymInt or a Python constant; :func:`propagate_meta` recomputes it after a pass;
- call nodes keep ``meta['nn_module_stack']`` (see :func:`module_path`);
- ``gm.meta['fxopt']`` holds the :class:`~fxopt.capture.CaptureInfo` (signature, config).

Example::

    >>> gm = fxopt.capture(model, (torch.randn(4, 16),))
    >>> for node in gm.graph.nodes:
    ...     print(node.name, shape_of(node), module_path(node))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from .errors import PassError

aten = torch.ops.aten


def val(node) -> object:
    """The node's example value (FakeTensor, tuple, SymInt, constant) or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def shape_of(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype_of(node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def static_dim(dim) -> int | None:
    """The size of a dim when it is fixed (an int, or a symbol the shape env pinned), else None."""
    if isinstance(dim, int):
        return dim
    # Read the symbol's expression (with the shape env's replacements applied), not its example
    # value: a dim is static only when that expression is a number.
    expr = getattr(getattr(dim, "node", None), "expr", None)
    return int(expr) if expr is not None and expr.is_number else None


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced the node ('' when unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path


def describe(node: fx.Node) -> str:
    """A short description for error messages: ``%linear_3 (aten.linear.default in model.layers.0.mlp)``."""
    where = module_path(node)
    what = node.op if node.op in ("placeholder", "output", "get_attr") else str(node.target)
    return f"%{node.name} ({what}{' in ' + where if where else ''})"


@dataclass(frozen=True)
class TensorSpec:
    """What a graph input accepts, fixed at capture: dtype, device, and each dim's static size
    (None where the dim is symbolic). Independent of any shape environment, so later shape
    propagation can never pin a symbolic dim by accident."""

    dtype: torch.dtype
    device: torch.device
    dims: tuple  # int (static) or None (symbolic), per dim
    example: tuple  # the example sizes used at capture (hints for the symbolic dims)

    @classmethod
    def of(cls, value: torch.Tensor) -> "TensorSpec":
        dims = tuple(static_dim(d) for d in value.shape)
        example = tuple(_hint(d) for d in value.shape)
        return cls(value.dtype, value.device, dims, example)

    def fake(self, mode: FakeTensorMode) -> torch.Tensor:
        """A fake tensor in ``mode`` with a fresh symbol for every symbolic dim."""
        real = torch.empty(self.example, dtype=self.dtype, device="meta")
        dynamic = [DimDynamic.STATIC if d is not None else DimDynamic.DYNAMIC for d in self.dims]
        fake = mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))
        if self.device.type == "meta":
            return fake
        with mode:  # the same symbolic sizes, on the input's device
            return torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device=self.device)


def _hint(dim) -> int:
    """The example size behind a (possibly symbolic) dim."""
    if isinstance(dim, int):
        return dim
    hint = getattr(dim.node, "hint", None)
    return int(hint) if hint is not None else int(dim.node.shape_env.size_hint(dim.node.expr))


def input_specs(gm: fx.GraphModule) -> list | None:
    """The capture-time :class:`TensorSpec` (or constant) of each placeholder, if recorded."""
    return getattr(gm, "meta", {}).get("fxopt_inputs")


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    """The fake mode the placeholders' values live in (one is made for graphs without one)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        v = val(node)
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


# Ops whose fake kernels guard on symbolic sizes (and so pin them) or, on some torch versions,
# reach C++ code that needs concrete sizes. Their output shapes are simple enough to state.
_SHAPE_RULES = {
    # SDPA's fake kernel pads the mask to the kernel's alignment and guards on the length
    aten.scaled_dot_product_attention.default: lambda q, k, v: q.new_empty((*q.shape[:-1], v.shape[-1])),
    # linear on CUDA takes at::native::matmul, which calls numel() on symbolic tensors (torch 2.11)
    aten.linear.default: lambda x, w, b=None: x.new_empty((*x.shape[:-1], w.shape[0])),
}


def fake_call(mode: FakeTensorMode, target, args, kwargs):
    """``target(*args, **kwargs)`` on fake tensors in ``mode``; the ops of ``_SHAPE_RULES`` by their
    rule (their fake kernels may fail, or pin a symbolic size, where the rule cannot)."""
    with mode:
        if target in _SHAPE_RULES:
            return _SHAPE_RULES[target](*args[:3])
        return target(*args, **kwargs)


class _MetaPropagator(fx.Interpreter):
    """Runs the graph on fake tensors and stores each node's result in ``meta['val']``."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, inputs: list | None):
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode
        self.inputs = iter(inputs) if inputs is not None else None

    def run_node(self, node):
        try:
            if node.op == "placeholder":
                result = next(self.inputs) if self.inputs is not None else node.meta["val"]
            elif node.op == "get_attr":
                result = self.fetch_attr(node.target)
                if isinstance(result, torch.Tensor) and not isinstance(result, FakeTensor):
                    result = self.mode.from_tensor(result, static_shapes=True)
            elif node.target in _SHAPE_RULES:
                args = fx.node.map_arg(node.args, lambda a: self.env[a])
                result = fake_call(self.mode, node.target, args, node.kwargs)
            else:
                with self.mode:
                    result = super().run_node(node)
        except Exception as e:  # noqa: BLE001 - re-raised with the node named
            raise PassError(f"shape propagation failed at {describe(node)}: {type(e).__name__}: {e}") from e
        if node.op != "output":
            node.meta["val"] = result
        return result


def propagate_meta(gm: fx.GraphModule) -> None:
    """Recompute ``meta['val']`` for every node from the graph's inputs.

    A captured graph is propagated in a fresh fake mode and shape environment, from the input
    specs recorded at capture: whatever an op's fake kernel decides about a symbolic size stays
    inside this propagation and never changes what the graph accepts.
    """
    specs = input_specs(gm)
    if specs is not None:
        mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
        inputs = [spec.fake(mode) if isinstance(spec, TensorSpec) else spec for spec in specs]
        _MetaPropagator(gm, mode, inputs).run()
        return
    for node in gm.graph.find_nodes(op="placeholder"):
        if "val" not in node.meta:
            raise PassError(f"placeholder {describe(node)} has no meta['val']; passes must copy it when they add inputs")
    _MetaPropagator(gm, fake_mode_of(gm), None).run()


def complete_meta(gm: fx.GraphModule) -> str | None:
    """For a pass that sets the values of the nodes it makes (``Pass.preserves_meta``): propagate
    the whole graph only if one of them still has none (an op whose value could not be inferred
    on its own). Returns None, or which nodes made it propagate ("%name (+2 more)"): a pass puts
    that in its stats, where a propagation a device's fake kernels forced shows."""
    missing = [n.name for n in gm.graph.nodes if n.op != "output" and "val" not in n.meta]
    if not missing:
        return None
    propagate_meta(gm)
    return f"%{missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")


def lint(gm: fx.GraphModule) -> None:
    """Check the graph is well formed and regenerate its code."""
    gm.graph.lint()
    gm.recompile()


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new``, carry the module stack over, and erase ``old``."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def set_attribute(module: torch.nn.Module, name: str, value: torch.Tensor, parameter: bool = False) -> None:
    """Put ``value`` at the dotted ``name`` below ``module``, keeping the kind of what was there: a
    parameter stays a parameter (``requires_grad=False``), a buffer a buffer, anything else a plain
    attribute. ``parameter=True`` makes it a parameter whatever it was.

        >>> set_attribute(gm, "model.layers.0.mlp.down_proj.weight", loaded)
    """
    *parents, leaf = name.split(".")
    owner = module
    for part in parents:
        owner = getattr(owner, part)
    if parameter or leaf in owner._parameters:
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        owner._buffers.pop(leaf, None)
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def is_op(node, *targets) -> bool:
    """True when ``node`` calls one of the given ops (an OpOverload or an OpOverloadPacket)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for t in targets:
        if node.target is t or getattr(node.target, "overloadpacket", None) is t:
            return True
    return False
