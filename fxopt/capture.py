"""Capture: a PyTorch model → a plain ``torch.fx.GraphModule`` (the IR contract of ``fxopt.ir``).

Built on ``torch.export`` (non-strict) with symbolic batch and sequence dimensions, then unlifted,
so that weights are ``get_attr`` nodes named by their original parameter names. ``aten.linear``
and ``aten.scaled_dot_product_attention`` stay whole: no decompositions are run.

Example::

    >>> gm = fxopt.capture(model, (torch.randn(4, 16),))
    >>> gm(torch.randn(9, 16))          # flat inputs, flat outputs (a tuple)
    >>> info = gm.meta["fxopt"]        # how the model's own call maps onto the graph
    >>> info.signature.call(gm, torch.randn(9, 16))   # the model's own output structure

A causal LM from transformers is captured *stateless*: ``input_ids`` and explicit
``position_ids`` in, logits out, ``use_cache=False``. The KV cache is the compiler's business
(``fxopt.passes.kv_cache``), which keeps every pass model-agnostic.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import repeated_layers
from .errors import CaptureError, InputError
from .ir import TensorSpec, static_dim

# ---------------------------------------------------------------------------------------------
# The signature: the model's own call ↔ the graph's flat inputs and outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class Signature:
    """Maps a call of the original model onto the graph's flat inputs, and its outputs back.

    ``input_names`` are the forward parameters that were captured, in graph order; ``constants``
    the non-tensor ones fixed at capture (``use_cache=False``); ``fillers`` compute inputs the user
    may leave out (a causal LM's ``position_ids``).
    """

    forward: inspect.Signature
    input_names: list[str]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    placeholders: list[tuple[str, Any]]  # (name, TensorSpec or constant) of each flat input, in order
    constants: dict[str, Any] = field(default_factory=dict)
    fillers: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    model_name: str = "model"

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The user's arguments as ``{captured input name: value}``, with fillers and constants applied."""
        try:
            given = bind_arguments(self.forward, args, kwargs)
        except TypeError as e:
            raise InputError(f"{self.model_name}{self.forward}: {e}") from None
        out = {}
        for name in self.input_names:
            if name in self.constants:
                if name in given and given[name] is not None and given[name] != self.constants[name]:
                    raise InputError(
                        f"{self.model_name}: '{name}' was captured as {self.constants[name]!r} and cannot be "
                        f"{given[name]!r} at call time; capture again with that value")
                out[name] = self.constants[name]
            elif given.get(name) is not None:
                out[name] = given[name]
            elif name in self.fillers:
                out[name] = self.fillers[name](out | {k: v for k, v in given.items() if v is not None})
            else:
                raise InputError(f"{self.model_name}: missing input '{name}' (the graph was captured with it)")
        extra = [k for k, v in given.items() if k not in out and v is not None and not _is_default(self.forward, k, v)]
        if extra:
            raise InputError(
                f"{self.model_name}: argument(s) {', '.join(extra)} were not part of the capture "
                f"(captured inputs: {', '.join(self.input_names)}); capture with them in example_inputs")
        return out

    def flatten(self, args: tuple, kwargs: dict) -> list:
        """Flat graph inputs for a call of the original model, checked against the captured ones."""
        bound = self.bind(args, kwargs)
        leaves, spec = pytree.tree_flatten(((), bound))
        if spec != self.in_spec:
            captured = self.in_spec.children_specs[1].children_specs
            for (name, value), want in zip(bound.items(), captured):
                got = pytree.tree_structure(value)
                if got != want:
                    raise InputError(f"{self.model_name}: input '{name}' must be {_describe_spec(want)}, "
                                     f"got {_describe_spec(got)} ({type(value).__name__})")
            raise InputError(f"{self.model_name}: inputs have structure {spec}, captured: {self.in_spec}")
        for leaf, (name, example) in zip(leaves, self.placeholders):
            check_input(name, leaf, example)
        return leaves

    def unflatten(self, outputs) -> Any:
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    def call(self, gm: fx.GraphModule, *args, **kwargs):
        """Call ``gm`` the way the original model is called, returning the model's own output type."""
        return self.unflatten(gm(*self.flatten(args, kwargs)))


def _describe_spec(spec: pytree.TreeSpec) -> str:
    if spec.is_leaf():
        return "a tensor or scalar"
    return f"a {spec.type.__name__} of {spec.num_leaves} leaves"


def _is_default(sig: inspect.Signature, name: str, value) -> bool:
    p = sig.parameters.get(name)
    if p is None or p.default is inspect.Parameter.empty:
        return False
    try:
        return bool(value == p.default)
    except Exception:  # noqa: BLE001 - tensors and odd types are never "the default"
        return False


def check_input(name: str, value, spec) -> None:
    """Raise :class:`InputError` when ``value`` cannot feed a placeholder captured as ``spec``."""
    if not isinstance(spec, TensorSpec):
        return
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input '{name}' must be a tensor, got {type(value).__name__}")
    if value.dtype != spec.dtype:
        raise InputError(f"input '{name}' has dtype {value.dtype}, the graph was captured with {spec.dtype}")
    if value.dim() != len(spec.dims):
        raise InputError(f"input '{name}' has {value.dim()} dims {list(value.shape)}, "
                         f"the graph was captured with {len(spec.dims)}: {_fmt_shape(spec.dims)}")
    for i, (got, want) in enumerate(zip(value.shape, spec.dims)):
        if want is not None and got != want:
            raise InputError(f"input '{name}' has size {got} in dim {i}; the graph was captured with the "
                             f"static size {want} there (shape {_fmt_shape(spec.dims)})")
        if got == 0:
            raise InputError(f"input '{name}' is empty in dim {i} (shape {list(value.shape)})")


def _fmt_shape(dims) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in dims) + "]"


# ---------------------------------------------------------------------------------------------
# What capture records
# ---------------------------------------------------------------------------------------------


@dataclass
class CaptureInfo:
    """Facts about the captured model that passes and the runtime read (``gm.meta['fxopt']``)."""

    signature: Signature
    model_class: str
    kind: str  # "causal_lm" or "module"
    config: Any = None  # the transformers config, when there is one
    generation: dict = field(default_factory=dict)  # eos/pad token ids of a causal LM
    example_inputs: dict = field(default_factory=dict)  # name → example value, as captured
    state: dict = field(default_factory=dict)  # written by passes (e.g. the KV cache layout)
    layers: str = ""  # how a stack of like layers was captured (fxopt.repeated_layers), "" if none


# ---------------------------------------------------------------------------------------------
# capture()
# ---------------------------------------------------------------------------------------------


def capture(model: torch.nn.Module, example_inputs: tuple | dict | None = None, *,
            dynamic: bool = True, dynamic_shapes=None, trace_every_layer: bool = False) -> fx.GraphModule:
    """Capture ``model`` into a GraphModule that follows the IR contract (see module docstring).

    ``example_inputs`` is a tuple of positional arguments or a dict of keyword arguments of
    ``model.forward``. For transformers models it may be left out: a causal LM gets
    ``input_ids`` and ``position_ids`` of shape [2, 7], other models ``input_ids``.
    With ``dynamic=True`` every dimension that the model lets vary (batch, sequence) stays
    symbolic, so one graph serves every batch size and length; ``dynamic_shapes`` overrides that
    with torch.export's own spec.

    A stack of layers built alike (a transformer's decoder layers) is traced three layers deep
    and the third layer's subgraph copied for the others (``fxopt.repeated_layers``: the same
    graph, a fraction of the time); ``trace_every_layer=True`` traces them all.
    ``gm.meta["fxopt"].layers`` says which was done, and why.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"fxopt.capture needs a torch.nn.Module, got {type(model).__name__}")
    model_name = type(model).__name__
    kind = "causal_lm" if is_causal_lm(model) else "module"
    forward = inspect.signature(model.forward)

    stack = None if trace_every_layer else repeated_layers.find_stack(model)
    why_not = repeated_layers.unlike_layers(model, stack) if stack else None
    copy_layers = stack is not None and why_not is None
    defaulted = example_inputs is None
    attempts = DEFAULT_SHAPES if defaulted else [None]
    for shape in attempts:
        kwargs, constants = _prepare(model, kind, forward, default_example_inputs(model, shape) if defaulted else example_inputs)
        shapes = dynamic_shapes
        if shapes is None:
            shapes = {k: _auto_dims(v) if dynamic else None for k, v in kwargs.items()}
        try:
            ep = _export(model, kwargs, shapes, stack if copy_layers else None)
        except CaptureError as e:
            if not copy_layers:
                raise
            # the model cut short did not trace (a model may rely on its depth): trace it whole
            why_not, copy_layers = f"cut to {repeated_layers.TRACED} layers it did not trace: {str(e).splitlines()[0]}", False
            ep = _export(model, kwargs, shapes, None)
        # torch.export may pin a dim to its example size (an accidental equality with a constant of
        # the model); with default inputs, try other sizes before giving up on a symbolic batch/seq.
        if not (defaulted and dynamic and _specialized(ep, "input_ids")):
            break
    else:
        raise CaptureError(f"could not capture {model_name} with a symbolic batch and sequence length: torch.export "
                           f"fixed input_ids to {_specialized(ep, 'input_ids')}; pass example_inputs and dynamic_shapes")

    gm = _unlift(ep)
    if copy_layers:
        why_not = repeated_layers.stamp(gm, stack)
        if why_not:  # the cut model's graph shows the layers differ: trace them all after all
            ep = _export(model, kwargs, shapes, None)
            gm = _unlift(ep)
    placeholders = [(n.name, spec) for n, spec in zip(gm.graph.find_nodes(op="placeholder"), gm.meta["fxopt_inputs"])]
    signature = Signature(
        forward=forward, input_names=list(kwargs), in_spec=ep.call_spec.in_spec, out_spec=ep.call_spec.out_spec,
        placeholders=placeholders, constants=constants, model_name=model_name)
    if kind == "causal_lm" and "position_ids" in kwargs:
        signature.fillers["position_ids"] = default_position_ids
    gm.meta["fxopt"] = CaptureInfo(
        signature=signature, model_class=model_name, kind=kind, config=getattr(model, "config", None),
        generation=_generation_ids(model), example_inputs=kwargs, layers=_layers_note(stack, why_not, trace_every_layer))
    return gm


def _export(model, kwargs: dict, shapes, stack) -> torch.export.ExportedProgram:
    """torch.export of the model (cut to its first layers when ``stack`` is given), errors explained."""
    try:
        with torch.no_grad(), (repeated_layers.cut_to(model, stack) if stack else contextlib.nullcontext()):
            return torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - every failure becomes an error that says where and what to do
        raise CaptureError(_explain_failure(type(model).__name__, e)) from e


def _layers_note(stack, why_not: str | None, trace_every_layer: bool) -> str:
    if trace_every_layer:
        return "every layer traced (trace_every_layer=True)"
    if stack is None:
        return ""
    depth = len(stack.layers)
    if why_not:
        return f"{stack.path}: all {depth} layers traced ({why_not})"
    return f"{stack.path}: {repeated_layers.TRACED} of {depth} layers traced, {depth - repeated_layers.TRACED} copied"


def _unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """ExportedProgram → GraphModule with get_attr weights, flat inputs/outputs, no runtime guards."""
    gm = ep.module()
    gm._forward_pre_hooks.clear()  # export's input-constraint check: fxopt checks inputs itself
    graph = gm.graph
    # The symbolic input values come from the exported program itself: some torch versions give
    # the unlifted module's placeholders example-sized values. Everything else is re-derived below.
    # (By position: a constant input's spec holds its value, not its name.)
    exported = [n for n in ep.graph.nodes if n.op == "placeholder"]
    symbolic = [n.meta.get("val") for n, spec in zip(exported, ep.graph_signature.input_specs)
                if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(symbolic) != len(placeholders):
        raise CaptureError(f"captured {len(placeholders)} inputs but the exported program has {len(symbolic)}")
    for node, value in zip(placeholders, symbolic):
        old = node.meta.get("val")
        if isinstance(old, torch.Tensor) != isinstance(value, torch.Tensor) or (
                isinstance(old, torch.Tensor) and (old.dim(), old.dtype) != (value.dim(), value.dtype)):
            raise CaptureError(f"input '{node.name}' of the unlifted graph does not line up with the exported program")
        node.meta["val"] = value
    for node in list(graph.find_nodes(op="call_module")):
        if node.target == "_guards_fn" and not node.users:  # shape guards: fxopt checks inputs itself
            graph.erase_node(node)
            delattr(gm, node.target)
    graph._codegen = fx.graph.CodeGen()  # flat in, flat (tuple) out; the Signature restructures
    output = graph.output_node()
    leaves = output.args[0]
    output.args = (tuple(leaves) if isinstance(leaves, (list, tuple)) else (leaves,),)
    for node in graph.find_nodes(op="get_attr"):
        node.meta["param"] = node.target  # the original parameter name, for dumps and checkpoints
    graph.eliminate_dead_code()
    gm.recompile()
    gm.meta["fxopt_inputs"] = [TensorSpec.of(v) if isinstance(v, torch.Tensor) else v
                               for v in (n.meta.get("val") for n in graph.find_nodes(op="placeholder"))]
    return gm


def is_causal_lm(model) -> bool:
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    config = getattr(model, "config", None)
    return isinstance(model, GenerationMixin) and not getattr(config, "is_encoder_decoder", False)


DEFAULT_SHAPES = [(2, 7), (3, 11), (5, 13)]  # [batch, seq] of default example inputs, tried in order


def _prepare(model, kind: str, forward: inspect.Signature, example_inputs) -> tuple[dict, dict]:
    """The example inputs as forward's keyword arguments, and the constant (non-tensor) ones."""
    kwargs = _as_kwargs(type(model).__name__, forward, example_inputs)
    constants = {}
    if kind == "causal_lm":
        if "use_cache" in forward.parameters:
            kwargs["use_cache"] = constants["use_cache"] = False
        if "position_ids" in forward.parameters and "position_ids" not in kwargs and "input_ids" in kwargs:
            kwargs["position_ids"] = default_position_ids(kwargs)
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor) and not isinstance(value, (list, tuple, dict)):
            constants.setdefault(name, value)
    _check_example_leaves(type(model).__name__, kwargs)
    return kwargs, constants


def _specialized(ep, name: str) -> list | None:
    """The static sizes torch.export gave input ``name`` (None when every dim stayed symbolic)."""
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == name:
            dims = [static_dim(d) for d in node.meta["val"].shape]
            return dims if any(d is not None for d in dims) else None
    return None


def default_example_inputs(model, shape=(2, 7)) -> dict:
    """Example inputs for a transformers model: random token ids of ``shape`` [batch, seq]."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise CaptureError(
            f"{type(model).__name__}: pass example_inputs to capture it (only transformers models with a "
            "config.vocab_size get default example inputs)")
    gen = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {"input_ids": torch.randint(0, vocab, shape, generator=gen).to(device)}


def default_position_ids(inputs: dict) -> torch.Tensor:
    """Positions 0..S-1 for every row: what a transformers LM uses when it is given none."""
    ids = inputs["input_ids"]
    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)


def _generation_ids(model) -> dict:
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)
    ids = {}
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(gen, key, None)
        if value is None:
            value = getattr(cfg, key, None)
        ids[key] = value
    return ids


def _as_kwargs(model_name: str, forward: inspect.Signature, example_inputs) -> dict:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise CaptureError(
            f"{model_name}: example_inputs must be a tuple of positional arguments or a dict of keyword "
            f"arguments of forward{forward}, got {type(example_inputs).__name__}")
    try:
        return bind_arguments(forward, args, kwargs)
    except TypeError as e:
        raise CaptureError(f"{model_name}: example_inputs do not fit forward{forward}: {e}") from None


def bind_arguments(forward: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """``forward``'s arguments by name, ``**kwargs`` spread out (TypeError if they don't fit)."""
    out = {}
    for name, value in forward.bind(*args, **kwargs).arguments.items():
        kind = forward.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"positional *{name} arguments cannot be captured; give named inputs")
        else:
            out[name] = value
    return out


def _check_example_leaves(model_name: str, kwargs: dict) -> None:
    for path, leaf in pytree.tree_flatten_with_path(kwargs)[0]:
        if not (leaf is None or isinstance(leaf, (torch.Tensor, bool, int, float, str))):
            raise CaptureError(
                f"{model_name}: example input {pytree.keystr(path)} is a {type(leaf).__name__}; "
                "inputs must be tensors, nested lists/tuples/dicts of tensors, or Python scalars")


def _auto_dims(value):
    """Every dim of every tensor AUTO: dynamic where the model allows it, static where it doesn't."""
    if isinstance(value, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(value.dim())} if value.dim() else None
    if isinstance(value, (list, tuple)):
        return type(value)(_auto_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _auto_dims(v) for k, v in value.items()}
    return None


# ---------------------------------------------------------------------------------------------
# Failures that say where and what to do
# ---------------------------------------------------------------------------------------------

_HINTS = [
    (("data-dependent", "GuardOnDataDependent", "Could not guard on data-dependent", "item()", "DataDependent"),
     "control flow or a shape depends on tensor values (`if x.sum() > 0`, `.item()`, `.tolist()`, "
     "boolean-mask indexing). Rewrite it with torch.where / torch.cond, or compute it outside forward."),
    (("Constraints violated", "specialized", "marked as dynamic"),
     "a dimension fxopt keeps symbolic is fixed by the model. Pass dynamic=False, or give torch.export "
     "dynamic_shapes= yourself."),
    (("mat1 and mat2", "size mismatch", "shape", "must match", "expected", "Expected"),
     "the example inputs do not fit the model (check their shapes and dtypes against forward)."),
]


def _explain_failure(model_name: str, error: Exception) -> str:
    message = str(error).strip() or type(error).__name__
    first = message.splitlines()[0][:300]
    hint = next((h for keys, h in _HINTS if any(k in message for k in keys)),
                "an operation torch.export cannot trace; see the line above, and the error below "
                "(torch.export.export(model, args, strict=False) reproduces it).")
    where = _user_frame(error)
    lines = [f"could not capture {model_name}: {type(error).__name__}: {first}"]
    if where:
        lines.append(f"  stopped at {where}")
    lines.append(f"  what to do: {hint}")
    return "\n".join(lines)


def _user_frame(error: BaseException) -> str | None:
    """The innermost frame of the model's own code in the failure (not torch, not fxopt)."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__), os.path.dirname(inspect.__file__))
    best = None
    for frame in traceback.extract_tb(error.__traceback__):
        if not frame.filename.startswith(skip) and not frame.filename.startswith("<"):
            best = frame
    if best is None:
        return None
    line = (best.line or linecache.getline(best.filename, best.lineno)).strip()
    return f"{best.filename}:{best.lineno} in {best.name}: `{line}`"
