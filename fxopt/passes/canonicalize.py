"""``canonicalize``: one spelling for what model families write differently.

- GPT-2's ``Conv1D`` (``reshape → addmm(bias, x, W[in, out]) → reshape``) becomes
  ``linear(x, W[out, in], bias)``, the weight transposed once here, at compile time;
- ``view`` becomes ``reshape`` (always valid, so later passes match one op);
- no-ops go: ``_assert_tensor_metadata``, casts to the dtype/device a tensor already has,
  reshapes to the shape it already has, ``clone``, inference ``dropout``, ``x * 1``, ``x + 0``.

Later passes (kv_cache, fuse, shard, quantize) may assume this form.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir import is_op, module_path, replace_node, shape_of, val
from .base import CompileContext, Pass, PassResult, register_pass

aten = torch.ops.aten

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default)


def _same_shape(a, b) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and [str(d) for d in sa] == [str(d) for d in sb]


def _is_noop_cast(node: fx.Node) -> bool:
    src, out = val(node.args[0]), val(node)
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype
            and src.device == out.device and _same_shape(node.args[0], node))


def _is_identity_scalar(node: fx.Node) -> bool:
    if len(node.args) != 2 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    unit = 1 if is_op(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) else 0
    other = node.args[1]
    return (isinstance(other, (int, float)) and not isinstance(other, bool) and other == unit
            and val(node.args[0]) is not None and getattr(val(node.args[0]), "dtype", None) == getattr(val(node), "dtype", 0)
            and _same_shape(node.args[0], node))


def _is_full_slice(node: fx.Node) -> bool:
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    return step == 1 and _same_shape(node.args[0], node)


@register_pass("canonicalize")
class Canonicalize(Pass):
    name = "canonicalize"
    # Removing a no-op or respelling a view leaves every value as it was; the Conv1D rewrite sets
    # the transposed weight's and the linear's. So no re-propagation (2 s on a 32-layer model).
    preserves_meta = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        stats = {"conv1d_to_linear": 0, "view_to_reshape": 0, "noops_removed": 0}
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node._erased:  # erased: folded into a rewrite above
                continue
            if is_op(node, aten._assert_tensor_metadata.default) and not node.users:
                graph.erase_node(node)
                stats["noops_removed"] += 1
            elif (is_op(node, *_CASTS) and _is_noop_cast(node)) or (
                    is_op(node, aten.clone.default) and _same_shape(node.args[0], node)) or (
                    is_op(node, aten.dropout.default) and not (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False))) or (
                    is_op(node, aten.reshape.default, aten.view.default, aten.expand.default, aten.alias.default)
                    and _same_shape(node.args[0], node)) or (
                    is_op(node, aten.slice.Tensor) and _is_full_slice(node)) or (
                    is_op(node, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor) and _is_identity_scalar(node)):
                replace_node(node, node.args[0])
                stats["noops_removed"] += 1
            elif is_op(node, aten.view.default):
                with graph.inserting_before(node):
                    new = graph.call_function(aten.reshape.default, node.args, node.kwargs)
                new.meta = dict(node.meta)
                replace_node(node, new)
                stats["view_to_reshape"] += 1
            elif is_op(node, aten.addmm.default) and _conv1d_to_linear(gm, node):
                stats["conv1d_to_linear"] += 1
        changed = any(stats.values())
        return PassResult(changed=changed, stats={k: v for k, v in stats.items() if v})


def _conv1d_to_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``addmm(b, x2d, W[in, out])`` → ``linear(x, W.T, b)``, folding the reshapes around it."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return False
    bias, x2d, weight = node.args[:3]
    if weight.op != "get_attr" or any(u is not node for u in weight.users):
        return False
    w = getattr_path(gm, weight.target)
    setattr_path(gm, weight.target, torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=False))
    weight.meta["param_transform"] = "transpose"  # checkpoint tensor is [in, out]; the graph holds [out, in]
    graph = gm.graph
    x, out_node = x2d, node
    # reshape(x, [-1, in]) → addmm → reshape(·, [..., out]): keep x's leading dims instead
    if is_op(x2d, aten.reshape.default, aten.view.default) and len(node.users) == 1:
        (user,) = node.users
        src = x2d.args[0]
        if is_op(user, aten.reshape.default, aten.view.default) and shape_of(src) and shape_of(user) and \
                [str(d) for d in shape_of(src)[:-1]] == [str(d) for d in shape_of(user)[:-1]]:
            x, out_node = src, user
    weight.meta["val"] = val(weight).t().contiguous()
    with graph.inserting_before(out_node):
        linear = graph.call_function(aten.linear.default, (x, weight, bias))
    linear.meta["val"] = out_node.meta.get("val")
    linear.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    linear.meta["stack_trace"] = node.meta.get("stack_trace", "")
    out_node.replace_all_uses_with(linear)
    for dead in (out_node, node, x2d):
        if not dead.users and dead.op == "call_function":
            graph.erase_node(dead)
    return True


def getattr_path(root: torch.nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def setattr_path(root: torch.nn.Module, target: str, value) -> None:
    *parents, leaf = target.split(".")
    obj = root
    for part in parents:
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module) and leaf in obj._parameters:
        del obj._parameters[leaf]
    if isinstance(obj, torch.nn.Module) and leaf in obj._buffers:
        del obj._buffers[leaf]
    setattr(obj, leaf, value)


__all__ = ["Canonicalize", "module_path"]
