"""Capture a stack of identical layers by tracing three and copying the third.

``torch.export`` traces every op of every decoder layer, and for a deep model that is most of
compile time (a 32-layer 7B model: about 8 s of 12 on a 2-core CPU), although layers 1 to 31
trace the same ops on weights of the same shapes. So ``capture`` exports the model cut down to
its first three layers, then copies the third layer's subgraph once for every layer after it,
each copy reading its own layer's weights::

    >>> stack = find_stack(model)                 # the nn.ModuleList of like layers, or None
    >>> why_not = unlike_layers(model, stack)     # None when layers 2.. are built alike
    >>> with cut_to(model, stack):                # model.layers[:3], config.num_hidden_layers = 3
    ...     ep = torch.export.export(model, ...)
    >>> gm = unlift(ep)
    >>> why_not = stamp(gm, stack)                # layers 3.. copied from layer 2; or why not

The result is the graph a whole export gives, node for node, up to node names (tested for every
supported family). The conditions, checked before and after the cut export:

- the layers from the third on are built like the third: the same classes, parameter and buffer
  shapes and plain attributes (a sliding window, GPT-2's per-layer attention scale, a dense-or-MoE
  choice), no forward hooks, the same entry in every per-layer list of the config
  (``layer_types``), and no config flag asking for every layer's output (``output_hidden_states``);
- cut short, the model runs layers 0 to 2 and no other (a forward may reach its layers by some
  other way than the list);
- traced, layers 1 and 2 are the same subgraph, op for op, reading the same nodes from outside the
  stack but for the hidden state, which catches a layer computing with its own index; and each
  layer hands one value on, to the next layer only. (Layer 0 may differ: it reads the embedding.)

Where anything differs the whole model is exported instead, and the compile report's capture
line says why. What no check sees is a layer that branches on its own index past layer 2 with
nothing else to tell it apart (``if self.layer_idx % 4 == 3``): compile such a model with
``trace_every_layer=True`` (``verify=True`` would show the difference).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from .ir import describe, module_path

TRACED = 3  # layers exported; the stack must be deeper for copying to save anything

_PLAIN = (bool, int, float, str, type(None), torch.dtype)
# attributes that number a layer rather than say how it computes
_INDEX_ATTRIBUTES = {"layer_idx", "layer_id", "layer_index", "layer_number"}


@dataclass
class LayerStack:
    """An ``nn.ModuleList`` of layers built alike: its dotted path in the model and its layers."""

    path: str  # e.g. "model.layers"
    layers: list

    def prefix(self, i: int) -> str:
        return f"{self.path}.{i}"


def find_stack(model: torch.nn.Module) -> LayerStack | None:
    """The ``nn.ModuleList`` holding most of the model's parameters among those of more than
    :data:`TRACED` distinct layers of one class (layer 0 may differ); None when there is none."""
    best = None
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) <= TRACED:
            continue
        layers = list(module)
        if len({id(layer) for layer in layers}) < len(layers) or len({type(layer) for layer in layers[1:]}) > 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, LayerStack(path, layers))
    return best[1] if best else None


def unlike_layers(model: torch.nn.Module, stack: LayerStack) -> str | None:
    """Why layers ``TRACED - 1`` onwards are not built alike, or None when they are."""
    owned = [{id(p) for p in layer.parameters()} for layer in stack.layers]
    if len(set().union(*owned)) < sum(map(len, owned)):
        return f"{stack.path} shares parameters between layers"
    config = getattr(model, "config", None)
    for flag in ("output_hidden_states", "output_attentions"):
        if getattr(config, flag, False):
            return f"config.{flag} asks for every layer's output"
    for i, layer in enumerate(stack.layers):
        for name, module in layer.named_modules():
            if module._forward_hooks or module._forward_pre_hooks:  # a hook may be one layer's alone
                return f"{stack.prefix(i)}{'.' + name if name else ''} has forward hooks"
    first = TRACED - 1
    template = _build(stack.layers[first])
    for i in range(first + 1, len(stack.layers)):
        difference = _first_difference(template, _build(stack.layers[i]))
        if difference:
            return f"{stack.prefix(i)} is built unlike {stack.prefix(first)}: {difference}"
    for key, values in _per_layer_lists(config, len(stack.layers)).items():
        if any(v != values[first] for v in values[first:]):
            return f"config.{key} differs between layers {first} and up"
    return None


def _build(layer: torch.nn.Module) -> dict:
    """What says how a layer computes: per submodule its class, tensors' shapes and dtypes, and
    plain attributes (not its index)."""
    out = {}
    for name, module in layer.named_modules():
        tensors = {k: (tuple(t.shape), t.dtype, t.device) for k, t in
                   [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)] if t is not None}
        plain = {k: v for k, v in vars(module).items()
                 if not k.startswith("_") and k not in _INDEX_ATTRIBUTES and _is_plain(v)}
        out[name or "(layer)"] = (type(module), tensors, plain)
    return out


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _first_difference(want: dict, got: dict) -> str | None:
    if want.keys() != got.keys():
        return f"submodules {sorted(set(want) ^ set(got))[:3]}"
    for name, (cls, tensors, plain) in want.items():
        g_cls, g_tensors, g_plain = got[name]
        if cls is not g_cls:
            return f"{name} is a {g_cls.__name__}, not a {cls.__name__}"
        if tensors != g_tensors:
            return f"{name}'s parameters or buffers differ"
        if plain != g_plain:
            key = next(k for k in sorted(set(plain) | set(g_plain)) if plain.get(k, ...) != g_plain.get(k, ...))
            return f"{name}.{key} is {g_plain.get(key, 'unset')!r}, not {plain.get(key, 'unset')!r}"
    return None


def _per_layer_lists(config, depth: int) -> dict:
    """The config's per-layer lists (``layer_types``): lists as long as the stack, when the config
    counts its layers in ``num_hidden_layers``."""
    if config is None or getattr(config, "num_hidden_layers", None) != depth:
        return {}
    return {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == depth}


@contextmanager
def cut_to(model: torch.nn.Module, stack: LayerStack, depth: int = TRACED):
    """The model with only its first ``depth`` layers (and a config that says so) while inside.

    Raises ValueError on leaving when the model ran a later layer all the same (a forward that
    reaches the layers some other way than through the list cut short) or skipped one of layers
    1 to ``depth - 1``: its graph would not be the cut model's."""
    owner_path, _, name = stack.path.rpartition(".")
    owner = model.get_submodule(owner_path)
    whole = owner._modules[name]
    config = getattr(model, "config", None)
    saved = _per_layer_lists(config, len(stack.layers))
    ran = []
    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: ran.append(i))
             for i, layer in enumerate(stack.layers)]
    try:
        owner._modules[name] = torch.nn.ModuleList(stack.layers[:depth])
        if saved:
            for key, values in saved.items():
                setattr(config, key, type(values)(values[:depth]))
            config.num_hidden_layers = depth
        yield
        if set(ran) - set(range(depth)) or not set(range(1, depth)) <= set(ran):
            raise ValueError(f"cut to {depth} layers, the model ran layers {sorted(set(ran))} of {stack.path}")
    finally:
        for hook in hooks:
            hook.remove()
        owner._modules[name] = whole
        if saved:
            for key, values in saved.items():
                setattr(config, key, values)
            config.num_hidden_layers = len(stack.layers)


# ---------------------------------------------------------------------------------------------
# Copying the traced layer
# ---------------------------------------------------------------------------------------------


def _in_layer(node: fx.Node, prefix: str) -> bool:
    if node.op == "get_attr":
        return node.target.startswith(prefix + ".")
    path = module_path(node)
    return node.op == "call_function" and (path == prefix or path.startswith(prefix + "."))


@dataclass
class _Layer:
    prefix: str
    nodes: list  # in graph order
    hidden_in: fx.Node | None = None  # the one node of the layer before that this layer reads
    hidden_out: fx.Node | None = None  # the one node of this layer read outside it

    @property
    def members(self) -> set:
        return set(self.nodes)


def _layers(graph: fx.Graph, stack: LayerStack, depth: int) -> list[_Layer]:
    layers = [_Layer(stack.prefix(i), []) for i in range(depth)]
    for node in graph.nodes:
        for layer in layers:
            if _in_layer(node, layer.prefix):
                layer.nodes.append(node)
                break
    return layers


def _wire(layers: list[_Layer]) -> str | None:
    """Find each layer's hidden state in and out: a chain, layer to layer, and nothing else read
    across a layer's border from the layer before it or by anything but the next layer."""
    for i, layer in enumerate(layers):
        if not layer.nodes:
            return f"no node of the graph comes from {layer.prefix}"
        members = layer.members
        outs = [n for n in layer.nodes if any(u not in members for u in n.users)]
        if len(outs) != 1:
            return f"{layer.prefix} hands {len(outs)} values to the rest of the graph (one: its hidden state)"
        layer.hidden_out = outs[0]
        if i > 0:
            before = layers[i - 1].members
            ins = {v for n in layer.nodes for v in n.all_input_nodes if v in before}
            if ins != {layers[i - 1].hidden_out}:
                return f"{layer.prefix} reads {len(ins)} values of {layers[i - 1].prefix} (one: its hidden state)"
            layer.hidden_in = layers[i - 1].hidden_out
            if any(u not in members for u in layer.hidden_in.users):
                return f"{describe(layer.hidden_in)} is read outside {layer.prefix} too"
    return None


def _val_spec(node: fx.Node):
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape)), value.dtype
    return type(value).__name__


def _same_layer(a: _Layer, b: _Layer) -> str | None:
    """Why ``b`` is not ``a`` traced again (op for op, same outside inputs but the hidden state)."""
    if len(a.nodes) != len(b.nodes):
        return f"{a.prefix} traced to {len(a.nodes)} nodes, {b.prefix} to {len(b.nodes)}"
    twin = {a.hidden_in: b.hidden_in}
    for x, y in zip(a.nodes, b.nodes):
        same_target = x.op == y.op and (x.target[len(a.prefix):] == y.target[len(b.prefix):] if x.op == "get_attr"
                                        else x.target == y.target)
        args = map_arg((x.args, x.kwargs), lambda v: twin.get(v, v))
        if not same_target or args != (y.args, y.kwargs) or _val_spec(x) != _val_spec(y):
            return f"{describe(y)} differs from {describe(x)}"
        twin[x] = y
    if twin[a.hidden_out] is not b.hidden_out:
        return f"{b.prefix}'s output is not where {a.prefix}'s is"
    return None


def _rename(text: str, old: str, new: str) -> str:
    return re.sub(rf"{re.escape(old)}(?=\.|$)", new, text)


def _copied_meta(node: fx.Node, old: str, new: str) -> dict:
    """The template node's meta for its copy in layer ``new``: the same value (same shapes, same
    symbols), module paths and the parameter name moved to the new layer."""
    meta = {k: v for k, v in node.meta.items() if k != "from_node"}
    stack = meta.get("nn_module_stack")
    if stack:
        meta["nn_module_stack"] = {_rename(k, old, new): (_rename(p, old, new), cls) for k, (p, cls) in stack.items()}
    if "param" in meta:
        meta["param"] = _rename(meta["param"], old, new)
    return meta


def _put(gm: fx.GraphModule, target: str, value: torch.Tensor, like: str) -> None:
    """Register ``value`` at ``target`` below ``gm`` as what ``like`` is (parameter or buffer),
    making the container modules on the way."""
    *parents, leaf = target.split(".")
    owner = gm
    for part in parents:
        if part not in owner._modules:
            owner.add_module(part, torch.nn.Module())
        owner = owner._modules[part]
    like_owner, _, like_leaf = like.rpartition(".")
    if like_leaf in gm.get_submodule(like_owner)._parameters:
        owner.register_parameter(leaf, value if isinstance(value, torch.nn.Parameter)
                                 else torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(leaf, value)


def stamp(gm: fx.GraphModule, stack: LayerStack, depth: int = TRACED) -> str | None:
    """Copy layer ``depth - 1`` of ``gm`` (captured from the model cut to ``depth`` layers) for
    every later layer of ``stack``, chained hidden state to hidden state, each copy reading its
    own layer's weights. Returns why not (and leaves ``gm`` as it was), or None when done."""
    graph = gm.graph
    layers = _layers(graph, stack, depth)
    why = _wire(layers) or _same_layer(layers[-2], layers[-1])
    if why:
        return why
    template = layers[-1]
    tensors = []  # (target, value, template target) for every weight of every new layer
    for i in range(depth, len(stack.layers)):
        own = dict(stack.layers[i].named_parameters(remove_duplicate=False))
        own.update(stack.layers[i].named_buffers(remove_duplicate=False))
        for node in template.nodes:
            if node.op == "get_attr":
                name = node.target[len(template.prefix) + 1:]
                if name not in own:
                    return f"{stack.prefix(i)} has no '{name}' ({describe(node)} reads it in {template.prefix})"
                tensors.append((f"{stack.prefix(i)}.{name}", own[name], node.target))
    for target, value, like in tensors:
        _put(gm, target, value, like)

    readers = [u for u in template.hidden_out.users if u not in template.members]
    attr_at = next((n for n in reversed(template.nodes) if n.op == "get_attr"), None)
    op_at = template.nodes[-1]
    hidden = template.hidden_out
    for i in range(depth, len(stack.layers)):
        new_prefix = stack.prefix(i)
        copies = {template.hidden_in: hidden}
        for node in template.nodes:
            if node.op == "get_attr":
                with graph.inserting_after(attr_at):
                    copy = attr_at = graph.get_attr(new_prefix + node.target[len(template.prefix):])
                if op_at is node:  # the layer ends in a weight (no op reads it): keep order
                    op_at = copy
            else:
                args, kwargs = map_arg((node.args, node.kwargs), lambda v: copies.get(v, v))
                with graph.inserting_after(op_at):
                    copy = op_at = graph.create_node(node.op, node.target, args, kwargs, name=node.name,
                                                     type_expr=node.type)  # the name's next free number
            copy.meta = _copied_meta(node, template.prefix, new_prefix)
            copies[node] = copy
        hidden = copies[template.hidden_out]
    for reader in readers:
        reader.replace_input_with(template.hidden_out, hidden)
    graph.lint()
    gm.recompile()
    return None
