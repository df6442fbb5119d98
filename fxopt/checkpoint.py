"""Checkpoint loading: fill a compiled graph's weights straight from safetensors files.

A compiled graph knows where each of its weights comes from (the IR contract, ``fxopt.ir``):
a ``get_attr`` node carries ``meta['param']`` (the checkpoint tensor name), ``meta['param_transform']``
(GPT-2's Conv1D weights, stored [in, out] and held [out, in]), ``meta['param_sources']`` (a weight
that ``fuse`` concatenated from several tensors, row by row), ``meta['quant']`` (the int8/int4
buffers ``quantize`` put in place of a float weight) and, for a later tensor-parallel pass,
``meta['param_slices']`` (the part of each source one rank holds). :func:`load_plan` turns that
into one :class:`Recipe` per weight; :func:`load_checkpoint` reads each recipe's tensors and
applies it::

    slice → transpose → concat → cast → quantize

one recipe at a time, so the host never holds more than one recipe's source tensors (plus the
result). With :func:`compile_from_checkpoint` the model is built and compiled on the meta device
and only then filled, so the full-precision model never exists whole anywhere::

    >>> compiled = compile_from_checkpoint("path/to/model", dtype=torch.bfloat16, device="cuda")
    >>> print(load_plan(compiled.graph_module))          # what comes from where
    >>> compiled.info.state["checkpoint"]                # LoadStats: bytes read, peak, seconds

Single files (``model.safetensors``) and indexed shards (``model.safetensors.index.json``) are read
tensor by tensor with ``safetensors.safe_open``; a sliced source is read with ``get_slice`` so only
its part leaves the file. Errors (:class:`CheckpointError`) name the tensor and the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.fx as fx

from .errors import FxoptError
from .ir import set_attribute

__all__ = [
    "POST_LOAD_PASSES", "CheckpointError", "CheckpointFiles", "LoadPlan", "LoadStats", "QuantSpec", "Recipe", "Slice",
    "Source", "Target", "allocate_runtime_buffers", "compile_from_checkpoint", "compile_on_meta", "empty_model",
    "finish_loading", "load_checkpoint", "load_plan", "parameters_on_meta", "retarget_device", "runtime_buffers",
    "tied_names", "tied_weights",
]

#: Passes that need the real weights on their device; compile_from_checkpoint runs them (and any
#: pass after the first of them) after loading. ``cuda_graph`` reads the weights' device.
POST_LOAD_PASSES = ("cuda_graph",)

_META = torch.device("meta")


class CheckpointError(FxoptError):
    """A checkpoint that cannot fill the graph: a missing tensor, a wrong shape, an unreadable
    file. The message names the tensor, the graph attribute it was for, and the file."""


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """The part of a source one rank reads: ``[start, end)`` along ``dim`` (0: rows, 1: columns),
    in the graph's orientation (a linear weight is [out, in]; a transposed source is sliced along
    the other dim of the stored tensor). ``size``: the full length of ``dim`` (checked against the
    file; None: not known)."""

    dim: int
    start: int
    end: int
    size: int | None = None

    def __str__(self) -> str:
        return f"[{self.start}:{self.end}]" if self.dim == 0 else f"[:, {self.start}:{self.end}]"


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor a recipe reads.

    ``name``: the tensor's name in the checkpoint (None: zero rows, e.g. the missing bias of one
    linear of a concatenated group). ``shape``: its full shape in the graph's orientation, None
    where not known before reading (a sliced dim). ``rows``: the rows ``[a, b)`` of the assembled
    tensor it fills (None: all of it). ``transpose``: stored [in, out], wanted [out, in].
    ``slice``: read only this part of it (tensor parallelism).
    """

    name: str | None
    shape: tuple | None = None
    rows: tuple[int, int] | None = None
    transpose: bool = False
    slice: Slice | None = None

    def stored_shape(self) -> tuple | None:
        """The expected shape of the tensor in the file (None dims: not checked)."""
        if self.shape is None:
            return None
        return tuple(reversed(self.shape)) if self.transpose else tuple(self.shape)

    def stored_index(self, stored: tuple) -> tuple:
        """The index into the stored tensor that reads this source's part (``get_slice(name)[...]``)."""
        if self.slice is None:
            return (slice(None),) * len(stored)
        dim = (1 - self.slice.dim) if self.transpose else self.slice.dim
        index = [slice(None)] * len(stored)
        index[dim] = slice(self.slice.start, self.slice.end)
        return tuple(index)

    def __str__(self) -> str:
        if self.name is None:
            return "zeros"
        return f"{self.name}{'.T' if self.transpose else ''}{self.slice or ''}"


@dataclass(frozen=True)
class QuantSpec:
    """Quantize the assembled float weight with ``fxopt.kernels.quant.quantize_weight``."""

    of: str  # the float weight the quantized buffers replace (its graph attribute name)
    group_size: int
    bits: int

    def __str__(self) -> str:
        return f"int{self.bits} g{self.group_size}"


@dataclass(frozen=True)
class Target:
    """A graph attribute a recipe fills: its name, its role in the recipe (``value``, or
    ``qweight`` / ``scales`` of a quantized weight) and what it must be."""

    name: str
    role: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    parameter: bool  # registered as a parameter (else a buffer)


@dataclass
class Recipe:
    """How one weight (or one group of quantized buffers, or of aliased attributes) is built.

    The sources are read (sliced, transposed) and copied into the rows they fill of one tensor of
    ``shape`` and ``dtype`` (concat and cast in one copy), which becomes the attribute(s) in
    ``targets``, or with ``quant`` is quantized into the ``qweight`` and ``scales`` targets.
    ``optional`` (buffers): when the checkpoint lacks the tensor, the attribute keeps the value
    it has (a buffer computed by the model, e.g. rotary ``inv_freq``).
    """

    targets: list[Target]
    sources: list[Source]
    shape: tuple  # of the assembled (float) tensor; None dims: known once the file is read
    dtype: torch.dtype  # of the assembled tensor
    quant: QuantSpec | None = None
    optional: bool = False

    @property
    def name(self) -> str:
        return self.targets[0].name

    @property
    def checkpoint_names(self) -> list[str]:
        return [s.name for s in self.sources if s.name is not None]

    def describe(self) -> str:
        """The recipe in one line: what is read, how it is put together."""
        return " ".join(line.strip() for line in self.describe_lines())

    def describe_lines(self) -> list[str]:
        """The recipe as the plan prints it: one line, or a head line and one line per source."""
        quant = f"quantize {self.quant} ← " if self.quant is not None else ""
        if len(self.sources) == 1 and self.sources[0].rows is None:
            return [quant + str(self.sources[0])]
        width = max(len(f"{s.rows[0]}:{s.rows[1]}") for s in self.sources if s.rows) if self.sources else 0
        return [quant + "cat rows:"] + [f"  {f'{s.rows[0]}:{s.rows[1]}' if s.rows else '':>{width}} ← {s}"
                                        for s in self.sources]


@dataclass
class LoadPlan:
    """Every recipe of a graph, the runtime buffers (KV cache: zeros, not loaded), the attributes
    kept as they are (no checkpoint provenance), and the tied-weight names used as fallbacks."""

    recipes: list[Recipe]
    state: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Recipe]:
        return iter(self.recipes)

    def __len__(self) -> int:
        return len(self.recipes)

    def recipe_for(self, target: str) -> Recipe:
        for r in self.recipes:
            if any(t.name == target for t in r.targets):
                return r
        raise KeyError(target)

    def __str__(self) -> str:
        rows = []
        for i, r in enumerate(self.recipes):
            lines = r.describe_lines()
            if r.optional:
                lines[0] += "  (optional: kept when not in the file)"
            for j, t in enumerate(r.targets):
                role = "" if t.role == "value" else f" ({t.role})"
                rows.append([str(i) if j == 0 else "", t.name + role, _fmt_shape(t.shape), _fmt_dtype(t.dtype),
                             lines[0] if j == 0 else "(same recipe)"])
                if j == 0:  # the sources right under the recipe's head line
                    rows.extend(["", "", "", "", extra] for extra in lines[1:])
        head = ["#", "attribute", "shape", "dtype", "recipe (slice → transpose → concat → cast → quantize)"]
        widths = [max(len(row[k]) for row in rows + [head]) for k in range(4)]

        def fmt(row):
            cells = [row[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(row[1:4], widths[1:])]
            return ("  ".join(cells) + "  " + row[4]).rstrip()

        lines = [f"LoadPlan: {len(self.recipes)} recipes, {len(self.state)} runtime buffers, {len(self.kept)} kept",
                 fmt(head), "-" * (sum(widths) + 2 * 4 + len(head[4]))]
        lines += [fmt(row) for row in rows]
        if self.state:
            lines.append(f"runtime state, allocated as zeros: {_fmt_names(self.state)}")
        if self.kept:
            lines.append(f"kept as they are (no checkpoint provenance): {_fmt_names(self.kept)}")
        if self.tied:
            lines.append("tied, read instead when the first is not in the file: "
                         + ", ".join(f"{a} → {b}" for a, b in self.tied.items()))
        return "\n".join(lines)

    __repr__ = __str__


def _fmt_names(names: list[str]) -> str:
    if len(names) <= 6:
        return ", ".join(names)
    return f"{len(names)} buffers: {', '.join(names[:2])}, ..., {', '.join(names[-2:])}"


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *parents, leaf = target.split(".")
    owner = gm
    for part in parents:
        owner = getattr(owner, part)
    return owner, leaf


def _is_parameter(gm: torch.nn.Module, target: str) -> bool:
    owner, leaf = _owner(gm, target)
    return isinstance(owner, torch.nn.Module) and leaf in owner._parameters


def _is_buffer(gm: torch.nn.Module, target: str) -> bool:
    owner, leaf = _owner(gm, target)
    return isinstance(owner, torch.nn.Module) and leaf in owner._buffers


def runtime_buffers(gm: fx.GraphModule) -> list[str]:
    """Attributes that are runtime state, not weights: the KV cache buffers of ``kv_cache``."""
    names = []
    info = gm.meta.get("fxopt")
    layout = getattr(info, "state", {}).get("kv_cache") if info is not None else None
    for pair in (layout or {}).get("layers", []):
        names.extend(pair)
    for name, _ in gm.named_buffers():
        if name.startswith("kv_cache_") and name not in names:
            names.append(name)
    return names


def _target(gm: fx.GraphModule, node: fx.Node, role: str) -> Target:
    value = _fetch(gm, node.target)
    if not isinstance(value, torch.Tensor):
        value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"graph attribute '{node.target}' holds no tensor; cannot plan its loading")
    return Target(node.target, role, tuple(int(d) for d in value.shape), value.dtype, value.device,
                  _is_parameter(gm, node.target))


def _provenance(node: fx.Node, quant_of: dict[str, fx.Node]) -> dict:
    """The checkpoint provenance keys of a node; a quantized buffer that does not carry them
    inherits them from the float weight it replaced (if that node is still in the graph)."""
    keys = ("param", "param_transform", "param_sources", "param_transforms", "param_slices")
    prov = {k: node.meta[k] for k in keys if k in node.meta}
    if "quant" in node.meta and "param_sources" not in prov and "param" not in prov:
        of = node.meta["quant"].get("of")
        src = quant_of.get(of)
        if src is not None:
            prov = {k: src.meta[k] for k in keys if k in src.meta}
        elif of is not None:
            prov = {"param": of}
    return prov


def _sources(prov: dict, shape: tuple) -> list[Source]:
    """Sources of a tensor of ``shape`` (graph orientation) from its provenance."""
    slices = {name: Slice(*s) if not isinstance(s, Slice) else s for name, s in (prov.get("param_slices") or {}).items()}
    if "param_sources" in prov:
        transforms = prov.get("param_transforms") or {}
        out = []
        for entry in prov["param_sources"]:
            name, start, end = entry[:3]
            sl = entry[3] if len(entry) > 3 and entry[3] is not None else slices.get(name)
            full = [end - start, *shape[1:]]
            if sl is not None:
                full[sl.dim] = sl.size
            out.append(Source(name, tuple(full), (start, end), transforms.get(name) == "transpose", sl))
        return out
    name = prov["param"]
    sl = slices.get(name)
    full = list(shape)
    if sl is not None:
        full[sl.dim] = sl.size
    return [Source(name, tuple(full), None, prov.get("param_transform") == "transpose", sl)]


def _in_features(gm: fx.GraphModule, node: fx.Node, spec: dict) -> int | None:
    """The float weight's input features behind a quantized buffer."""
    if spec.get("in_features") is not None:
        return int(spec["in_features"])
    for user in node.users:
        if user.op == "call_function" and "quant_linear" in str(user.target) and len(user.args) > 6:
            return int(user.args[6])
    if spec.get("bits") == 8 and spec.get("role") == "qweight":
        return int(_target(gm, node, "qweight").shape[1])
    return None


def tied_weights(gm: fx.GraphModule) -> dict[str, str]:
    """``{name: name it is tied to}``: what to read when a tensor is not in the checkpoint.

    From ``gm.meta['fxopt_tied']`` (recorded by :func:`compile_from_checkpoint`), attributes of
    ``gm`` that are one tensor under two names, and the transformers model class's
    ``_tied_weights_keys`` when its config ties the word embeddings.
    """
    tied: dict[str, str] = dict(gm.meta.get("fxopt_tied") or {})
    groups: dict[int, list[str]] = {}
    for name, p in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        for a in names:
            for b in names:
                if a != b:
                    tied.setdefault(a, b)
    info = gm.meta.get("fxopt")
    config = getattr(info, "config", None)
    if config is not None and _ties_embeddings(config):
        try:
            import transformers
            keys = getattr(getattr(transformers, info.model_class, None), "_tied_weights_keys", None)
        except ImportError:  # pragma: no cover - transformers is optional
            keys = None
        if isinstance(keys, dict):
            for a, b in keys.items():
                tied.setdefault(a, b)
                tied.setdefault(b, a)
    return tied


def _ties_embeddings(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def load_plan(gm) -> LoadPlan:
    """The :class:`LoadPlan` of a compiled graph (a GraphModule or a CompiledModel): for every
    ``get_attr`` target that comes from the checkpoint, a :class:`Recipe`, in graph order.

    Shapes, dtypes and devices are those of the attributes now on ``gm`` (meta placeholders
    included). Quantized buffers of one float weight (``meta['quant']`` with the same ``of``)
    share one recipe; attributes that are one tensor under several names share one too.
    """
    gm = _graph_module(gm)
    state = set(runtime_buffers(gm))
    nodes = list(gm.graph.find_nodes(op="get_attr"))
    quant_of = {n.target: n for n in nodes}
    recipes: list[Recipe] = []
    by_key: dict = {}
    kept, state_used, seen = [], [], set()
    for node in nodes:
        if node.target in seen:
            continue
        seen.add(node.target)
        if node.target in state:
            state_used.append(node.target)
            continue
        spec = node.meta.get("quant")
        prov = _provenance(node, quant_of)
        if spec is not None:
            role = spec.get("role", "qweight")
            target = _target(gm, node, role)
            key = ("quant", spec.get("of", node.target), spec["group_size"], spec["bits"])
            recipe = by_key.get(key)
            if recipe is None:
                if not prov:
                    raise CheckpointError(f"quantized buffer '{node.target}' (of '{spec.get('of')}') has no checkpoint "
                                          "provenance: the quantize pass must copy meta['param'] / meta['param_sources'] "
                                          "of the float weight onto it")
                rows = target.shape[0]
                recipe = Recipe([], [], (rows, None), target.dtype,
                                QuantSpec(str(spec.get("of", node.target)), int(spec["group_size"]), int(spec["bits"])))
                by_key[key] = recipe
                recipes.append(recipe)
            recipe.targets.append(target)
            in_features = _in_features(gm, node, spec)
            if in_features is not None:
                recipe.shape = (recipe.shape[0], in_features)
            if role == "scales" or target.dtype.is_floating_point:
                recipe.dtype = target.dtype  # the activation dtype: the float weight is cast to it
            if not recipe.sources:
                recipe.sources = _sources(prov, recipe.shape)
            continue
        target = _target(gm, node, "value")
        value = _fetch(gm, node.target)
        if isinstance(value, torch.Tensor) and id(value) in by_key:  # the same tensor under another name
            by_key[id(value)].targets.append(target)
            continue
        if not prov:
            kept.append(node.target)
            continue
        buffer = _is_buffer(gm, node.target) and "param_sources" not in prov
        recipe = Recipe([target], _sources(prov, target.shape), target.shape, target.dtype, optional=buffer)
        if isinstance(value, torch.Tensor):
            by_key[id(value)] = recipe
        recipes.append(recipe)
    for r in recipes:  # sources of a quantized weight were made before its float shape was known
        if r.quant is not None and r.shape[1] is not None:
            r.sources = [dataclasses.replace(s, shape=(s.shape[0], r.shape[1]) if s.shape and s.shape[1] is None
                                             and s.slice is None else s.shape) for s in r.sources]
    plan = LoadPlan(recipes, state_used, kept)
    names = {n for r in recipes for n in r.checkpoint_names}
    plan.tied = {a: b for a, b in tied_weights(gm).items() if a in names}
    return plan


def _graph_module(obj) -> fx.GraphModule:
    gm = getattr(obj, "graph_module", obj)
    if not isinstance(gm, fx.GraphModule):
        raise CheckpointError(f"expected a torch.fx.GraphModule or a CompiledModel, got {type(obj).__name__}")
    return gm


# ---------------------------------------------------------------------------------------------
# Reading safetensors files
# ---------------------------------------------------------------------------------------------

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointFiles:
    """A safetensors checkpoint: a single file or an index of shards, opened lazily.

    ``path``: a model directory, a ``.safetensors`` file or a ``.index.json`` file. Tensors are
    read one by one (``read``), optionally only a part (``get_slice``); the bytes of the tensors
    it returned that are still alive are counted (``alive_bytes``, ``peak_bytes``), so a test
    can check what loading holds at once.
    """

    def __init__(self, path):
        p = Path(path).expanduser()
        if not p.exists():
            raise CheckpointError(f"checkpoint path '{p}' does not exist")
        if p.is_dir():
            if (p / INDEX_NAME).is_file():
                p = p / INDEX_NAME
            elif (p / SINGLE_NAME).is_file():
                p = p / SINGLE_NAME
            else:
                found = sorted(p.glob("*.safetensors"))
                if len(found) != 1:
                    raise CheckpointError(
                        f"'{p}' has no {SINGLE_NAME} or {INDEX_NAME}"
                        + (f" and {len(found)} .safetensors files ({', '.join(f.name for f in found[:4])}...)"
                           if found else " and no .safetensors file") + "; pass the file to load")
                p = found[0]
        self.path = p
        self._handles: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()
        self.alive_bytes = 0
        self.peak_bytes = 0
        self.bytes_read = 0
        self.tensors_read = 0
        if p.name.endswith(".json"):
            try:
                index = json.loads(p.read_text())
                weight_map = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read the checkpoint index {p}: {type(e).__name__}: {e}") from None
            self.weight_map = {name: p.parent / file for name, file in weight_map.items()}
        else:
            self.weight_map = {name: p for name in self._open(p).keys()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close (unmap) the open files; a later read opens them again. The loader closes them
        after every recipe: safetensors maps a file into memory, and the pages a read touched
        count in the process's resident memory (as file pages) for as long as it stays mapped."""
        self._handles.clear()
        self._stack.close()

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        return self.weight_map[name]

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open
            if not file.is_file():
                raise CheckpointError(f"checkpoint file {file} (listed in {self.path}) does not exist")
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is unreadable
                raise CheckpointError(f"cannot read checkpoint file {file}: {type(e).__name__}: {e} "
                                      "(truncated or not a safetensors file?)") from None
            self._handles[file] = handle
        return handle

    def shape(self, name: str) -> tuple:
        file = self.weight_map[name]
        try:
            return tuple(self._open(file).get_slice(name).get_shape())
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read the header of tensor '{name}' in {file}: {type(e).__name__}: {e}") from None

    def read(self, name: str, index: tuple | None = None) -> torch.Tensor:
        """The tensor ``name`` (or ``get_slice(name)[index]``), counted while it is alive."""
        file = self.weight_map[name]
        try:
            handle = self._open(file)
            tensor = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor '{name}' from {file}: {type(e).__name__}: {e}") from None
        nbytes = tensor.numel() * tensor.element_size()
        self.alive_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.alive_bytes)
        self.bytes_read += nbytes
        self.tensors_read += 1
        weakref.finalize(tensor, self._freed, nbytes)  # counts down when the tensor really dies
        return tensor

    def _freed(self, nbytes: int) -> None:
        self.alive_bytes -= nbytes

    def nbytes(self, name: str) -> int:
        dtype = self._open(self.weight_map[name]).get_slice(name).get_dtype()
        size = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2}.get(dtype, 1)
        n = 1
        for d in self.shape(name):
            n *= d
        return n * size


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadStats:
    """What a load did. ``peak_source_bytes``: the most bytes of checkpoint tensors alive at once
    (counted by the reader until each tensor is freed); ``largest_recipe_bytes``: the bytes the
    largest recipe reads."""

    recipes: int = 0
    tensors_read: int = 0
    bytes_read: int = 0
    peak_source_bytes: int = 0
    largest_recipe_bytes: int = 0
    checkpoint_bytes: int = 0
    seconds: float = 0.0
    tied: dict = field(default_factory=dict)  # names read in place of missing tied tensors
    kept: list = field(default_factory=list)  # optional buffers not in the file: kept
    files: list = field(default_factory=list)

    def __str__(self) -> str:
        return (f"loaded {self.recipes} weights ({self.tensors_read} tensors, {_fmt_bytes(self.bytes_read)}) "
                f"from {len(self.files)} file(s) in {self.seconds:.2f}s; at most {_fmt_bytes(self.peak_source_bytes)} "
                f"of source tensors held at once (largest recipe {_fmt_bytes(self.largest_recipe_bytes)})")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@dataclass
class _Resolved:
    recipe: Recipe
    sources: list  # (Source, checkpoint name read, index or None) per source
    shape: tuple  # assembled shape, all dims known
    nbytes: int


def _missing_message(name: str, target: str, files: CheckpointFiles) -> str:
    close = difflib.get_close_matches(name, list(files.weight_map), n=3)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return (f"tensor '{name}' (for graph attribute '{target}') is not in the checkpoint {files.path} "
            f"({len(files.weight_map)} tensors{hint})")


def _resolve(recipe: Recipe, files: CheckpointFiles, tied: dict, used_tied: dict) -> _Resolved | None:
    """Check a recipe against the file headers (nothing is read): names, shapes, slices. None
    when an optional recipe's tensor is not in the file."""
    target = recipe.name
    out, rows_total, cols, nbytes = [], 0, None, 0
    for src in recipe.sources:
        if src.name is None:
            out.append((src, None, None))
            continue
        name = src.name
        if name not in files:
            alias = tied.get(name)
            if alias is not None and alias in files:
                used_tied[name] = alias
                name = alias
            elif recipe.optional:
                return None
            else:
                raise CheckpointError(_missing_message(name, target, files))
        stored = files.shape(name)
        want = src.stored_shape()
        file = files.file_of(name)
        if want is not None and (len(want) != len(stored) or any(w is not None and w != s for w, s in zip(want, stored))):
            raise CheckpointError(
                f"tensor '{name}' in {file} has shape {list(stored)}; graph attribute '{target}' needs "
                f"{_fmt_shape(want)}{' (stored transposed, [in, out])' if src.transpose else ''}")
        index = None
        piece = list(reversed(stored)) if src.transpose else list(stored)
        if src.slice is not None:
            sl = src.slice
            if not (0 <= sl.dim < len(piece)) or not (0 <= sl.start < sl.end <= piece[sl.dim]):
                raise CheckpointError(f"slice {sl} of tensor '{name}' in {file} (shape {list(stored)}) is out of range "
                                      f"for graph attribute '{target}'")
            index = src.stored_index(stored)
            piece[sl.dim] = sl.end - sl.start
        want_rows = (src.rows[1] - src.rows[0]) if src.rows else recipe.shape[0]
        if want_rows is not None and piece and piece[0] != want_rows:
            raise CheckpointError(f"tensor '{name}' in {file} gives {piece[0]} rows{' after slicing' if index else ''}; "
                                  f"graph attribute '{target}' needs {want_rows} from it")
        tail = tuple(piece[1:])
        if cols is not None and tail != cols:
            raise CheckpointError(f"tensor '{name}' in {file} has shape {list(stored)}, which does not concatenate with "
                                  f"the other sources of graph attribute '{target}' (trailing dims {list(cols)})")
        cols = tail
        rows_total += piece[0] if piece else 0
        nbytes += files.nbytes(name) if index is None else _piece_bytes(files, name, piece)
        out.append((src, name, index))
    shape = list(recipe.shape)
    if cols is not None:
        for i, c in enumerate(cols, start=1):
            if i < len(shape) and shape[i] is not None and shape[i] != c:
                raise CheckpointError(f"the sources of graph attribute '{target}' ({', '.join(recipe.checkpoint_names)}) "
                                      f"have trailing dims {list(cols)}; it needs {_fmt_shape(shape)}")
        shape = [shape[0], *cols] if shape else shape
    if any(d is None for d in shape):
        raise CheckpointError(f"cannot tell the shape of graph attribute '{target}' from its sources")
    return _Resolved(recipe, out, tuple(shape), nbytes)


def _piece_bytes(files: CheckpointFiles, name: str, piece: list) -> int:
    full = files.shape(name)
    total = 1
    for d in full:
        total *= d
    part = 1
    for d in piece:
        part *= d
    return files.nbytes(name) * part // max(total, 1)


def _where(target: Target, device, dtype) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else (
        target.device if target.device.type != "meta" else torch.device("cpu"))
    dt = dtype if dtype is not None and target.dtype.is_floating_point else target.dtype
    return dev, dt


def _build(res: _Resolved, files: CheckpointFiles, device, dtype, bar) -> dict[str, torch.Tensor]:
    """Run one recipe: read each source, copy it (transposed, cast) into its rows of the result,
    free it, then quantize. Returns {target name: tensor}."""
    recipe = res.recipe
    first = recipe.targets[0]
    dev, _ = _where(first, device, dtype)
    if recipe.quant is None:
        float_dtype = _where(first, device, dtype)[1]
    else:  # the activation dtype (that of the scales), in which the float weight is quantized
        float_dtype = dtype if dtype is not None else recipe.dtype
    out = torch.empty(res.shape, dtype=float_dtype, device=dev)
    for src, name, index in res.sources:
        dst = out if src.rows is None else out[src.rows[0]:src.rows[1]]
        if name is None:
            dst.zero_()
            continue
        piece = files.read(name, index)
        bar.update(piece.numel() * piece.element_size())
        dst.copy_(piece.t() if src.transpose else piece)  # transpose, concat and cast in one copy
        del piece
    if recipe.quant is None:
        return {t.name: out for t in recipe.targets}
    from .kernels.quant import quantize_weight
    qweight, scales = quantize_weight(out, recipe.quant.group_size, recipe.quant.bits)
    del out
    made = {"qweight": qweight, "scales": scales}
    result = {}
    for t in recipe.targets:
        value = made.get(t.role)
        if value is None:
            raise CheckpointError(f"quantized buffer '{t.name}' has role '{t.role}'; expected 'qweight' or 'scales'")
        result[t.name] = value
    return result


def load_checkpoint(gm_or_compiled, path, *, device=None, dtype=None, progress: bool = True,
                    plan: LoadPlan | None = None) -> LoadStats:
    """Fill the weights of a compiled graph from a safetensors checkpoint; returns :class:`LoadStats`.

    ``path``: a model directory (``model.safetensors`` or ``model.safetensors.index.json`` +
    shards), a file, or an open :class:`CheckpointFiles`. Every recipe is checked against the file
    headers first (missing tensors, shapes, slices: :class:`CheckpointError` naming the tensor and
    the file) so a bad checkpoint fails before anything on ``gm`` changes. Then, one recipe at a
    time: read → transpose → copy into its rows (cast) → quantize → assign, replacing meta
    placeholders. ``device``: where the weights go (default: where each attribute is, the CPU for
    meta ones). ``dtype``: load floating-point weights in this dtype instead of the attributes'
    (the graph's own casts were fixed at capture: normally leave it None). The KV cache buffers are
    (re)allocated as zeros on the device (:func:`allocate_runtime_buffers`); attributes no node
    reads that are still on the meta device are dropped.
    """
    gm = _graph_module(gm_or_compiled)
    t0 = time.perf_counter()
    plan = plan if plan is not None else load_plan(gm)
    tied = tied_weights(gm)
    own = not isinstance(path, CheckpointFiles)
    files = CheckpointFiles(path) if own else path
    base_bytes, base_tensors, files.peak_bytes = files.bytes_read, files.tensors_read, files.alive_bytes
    try:
        stats = LoadStats(files=[str(f) for f in files.files])
        for name in plan.kept:
            _check_has_value(gm, name, "no node meta says where in a checkpoint it comes from (meta['param'])")
        resolved = []
        for recipe in plan.recipes:
            res = _resolve(recipe, files, tied, stats.tied)
            if res is None:
                for t in recipe.targets:
                    _check_has_value(gm, t.name, f"it is not in the checkpoint {files.path}")
                stats.kept.extend(t.name for t in recipe.targets)
            else:
                resolved.append(res)
        for res in resolved:  # the shapes the recipes make must be the attributes' shapes
            if res.recipe.quant is None:
                for t in res.recipe.targets:
                    if tuple(res.shape) != t.shape:
                        raise CheckpointError(f"graph attribute '{t.name}' has shape {list(t.shape)} but its sources "
                                              f"({', '.join(res.recipe.checkpoint_names)}) in {files.path} make "
                                              f"{list(res.shape)}")
        files.close()
        stats.checkpoint_bytes = sum(f.stat().st_size for f in files.files)
        stats.largest_recipe_bytes = max((r.nbytes for r in resolved), default=0)
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(r.nbytes for r in resolved), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"loading {files.path.parent.name or files.path.name}", file=sys.stderr,
                   disable=not progress, leave=False)
        with bar:
            for res in resolved:
                bar.set_postfix_str(res.recipe.name[-48:], refresh=False)
                made = _build(res, files, device, dtype, bar)
                params: dict[int, torch.nn.Parameter] = {}
                for t in res.recipe.targets:
                    value = made[t.name]
                    if t.shape != tuple(value.shape):
                        raise CheckpointError(
                            f"{res.recipe.describe()} from {files.path} made {list(value.shape)} for graph attribute "
                            f"'{t.name}' ({t.role}), which holds {list(t.shape)}")
                    if t.parameter:  # aliases stay one tensor
                        value = params.setdefault(id(value), torch.nn.Parameter(value, requires_grad=False))
                    set_attribute(gm, t.name, value, parameter=t.parameter)
                del made
                files.close()  # unmap: the file pages this recipe touched leave the resident set
                stats.recipes += 1
        stats.tensors_read, stats.bytes_read = files.tensors_read - base_tensors, files.bytes_read - base_bytes
        stats.peak_source_bytes = files.peak_bytes
    finally:
        if own:
            files.close()
    _finish(gm, plan, device, dtype)
    stats.seconds = time.perf_counter() - t0
    info = gm.meta.get("fxopt")
    if info is not None and hasattr(info, "state"):
        info.state["checkpoint"] = stats
    if hasattr(gm_or_compiled, "_runner"):
        gm_or_compiled._runner = None  # CUDA graphs captured over the old weights are stale
    return stats


def _check_has_value(gm: fx.GraphModule, name: str, why: str) -> None:
    value = _fetch(gm, name)
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise CheckpointError(
            f"graph attribute '{name}' is on the meta device and cannot be loaded: {why}. A buffer the model "
            "computes (rotary inv_freq) needs its real value: build the model with fxopt.checkpoint.empty_model "
            "(parameters on meta, buffers real) or use compile_from_checkpoint")


def _finish(gm: fx.GraphModule, plan: LoadPlan, device, dtype) -> None:
    """After the recipes: kept attributes moved to ``device``, runtime buffers allocated, unused
    meta attributes dropped, and nothing the graph reads left on the meta device."""
    for name in [*plan.kept, *(t.name for r in plan.recipes if r.optional for t in r.targets)]:
        value = _fetch(gm, name)
        if isinstance(value, torch.Tensor) and value.device.type != "meta" and device is not None \
                and value.device != torch.device(device):
            set_attribute(gm, name, value.to(device))
    allocate_runtime_buffers(gm, device, dtype=dtype)
    used = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used and t.device.type == "meta":
            owner, leaf = _owner(gm, name)
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)
    for name in used:
        value = _fetch(gm, name)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise CheckpointError(
                f"graph attribute '{name}' is still on the meta device after loading: it is not in the checkpoint and "
                "has no value of its own (a buffer the model computes? build the model with fxopt.checkpoint.empty_model, "
                "which keeps buffers real, or use compile_from_checkpoint)")


def allocate_runtime_buffers(gm, device=None, *, dtype=None) -> list[str]:
    """(Re)allocate the KV cache buffers of ``gm`` as zeros on ``device`` (default: where they
    are, the CPU for meta ones), keeping shape and dtype (``dtype``: floating caches in this dtype
    instead). Returns the names allocated. Needed after compiling on the meta device, and to
    move a compiled graph's cache."""
    gm = _graph_module(gm)
    done = []
    for name in runtime_buffers(gm):
        value = _fetch(gm, name)
        if not isinstance(value, torch.Tensor):
            continue
        dev = torch.device(device) if device is not None else (
            value.device if value.device.type != "meta" else torch.device("cpu"))
        dt = dtype if dtype is not None and value.dtype.is_floating_point else value.dtype
        if value.device == dev and value.dtype == dt:
            continue
        owner, leaf = _owner(gm, name)
        owner._buffers[leaf] = torch.zeros(value.shape, dtype=dt, device=dev)
        done.append(name)
    return done


# ---------------------------------------------------------------------------------------------
# Compiling from a checkpoint
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter a module registers goes to the meta device; buffers stay real (they are
    computed by the model, e.g. rotary ``inv_freq``, and often not in the checkpoint)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to(_META), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(config, dtype: torch.dtype = torch.bfloat16):
    """A transformers causal LM for ``config`` with its parameters on the meta device (no
    memory, no initialization) and its buffers real, computed as the model computes them."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _model_dir(path) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        p = p.parent
    if not (p / "config.json").is_file():
        raise CheckpointError(f"'{path}' is not a model directory: it has no config.json")
    return p


def retarget_device(gm: fx.GraphModule, device) -> int:
    """Point a graph captured on the meta device at ``device``: device constants in node
    arguments (``arange(..., device=meta)``, ``.to(meta)``) and the recorded input specs.
    Returns how many node arguments changed."""
    device = torch.device(device)

    from torch.fx.node import map_aggregate

    changed = 0
    for node in gm.graph.nodes:
        hits = []

        def swap(a):
            if isinstance(a, torch.device) and a.type == "meta":
                hits.append(a)
                return device
            return a

        args, kwargs = map_aggregate(node.args, swap), map_aggregate(node.kwargs, swap)
        if hits:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
    from .ir import TensorSpec

    def fix(spec):
        on_meta = isinstance(spec, TensorSpec) and spec.device.type == "meta"
        return dataclasses.replace(spec, device=device) if on_meta else spec

    if "fxopt_inputs" in gm.meta:
        gm.meta["fxopt_inputs"] = [fix(s) for s in gm.meta["fxopt_inputs"]]
    info = gm.meta.get("fxopt")
    if info is not None:
        sig = info.signature
        sig.placeholders = [(name, fix(s)) for name, s in sig.placeholders]
        info.example_inputs = {k: torch.zeros(v.shape, dtype=v.dtype, device=device)
                               if isinstance(v, torch.Tensor) and v.device.type == "meta" else v
                               for k, v in info.example_inputs.items()}
    return changed


def _split_pipeline(passes: list) -> tuple[list, list]:
    from .passes import resolve
    resolved = [resolve(p) for p in passes]
    for i, p in enumerate(resolved):
        if p.name in POST_LOAD_PASSES:
            return resolved[:i], resolved[i:]
    return resolved, []


def compile_on_meta(path, passes=None, *, dtype: torch.dtype = torch.bfloat16, progress: bool = False, **options):
    """Build a transformers model from its ``config.json`` on the meta device and compile it;
    nothing is loaded (the first half of :func:`compile_from_checkpoint`).

    The parameters are meta placeholders, the buffers the model computes (rotary ``inv_freq``)
    real: the capture sees them on the meta device too, and passes that evaluate them at compile
    time (``position_tables``) get their real values as the option ``buffer_values``.
    ``load_plan(compiled)`` already says what every weight will be made of, for a model of any
    size. Passes that need the real weights (:data:`POST_LOAD_PASSES`) and those after them
    are not run: they wait in ``compiled.info.state['post_load']`` for :func:`finish_loading`.
    """
    from . import compiler

    if options.pop("verify", False):
        raise CheckpointError("compile_from_checkpoint / compile_on_meta cannot verify: the model is compiled on the meta "
                              "device, with no weights to compare against; compile the eagerly loaded model with "
                              "verify=True instead")
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(_model_dir(path)), local_files_only=True)
    model = empty_model(config, dtype)
    real_buffers = dict(model.named_buffers(remove_duplicate=False))
    tied = tied_names(model)
    model.to(_META)  # capture sees one device: the computed buffers go back after compiling
    tp = int(options.get("tp", 1) or 1)
    pipeline = compiler.default_passes(model, tp) if passes is None else list(passes)
    compiler.check_tp(pipeline, tp)
    before, after = _split_pipeline(pipeline)
    disable = set(options.pop("disable", None) or ())
    stop_after = options.pop("stop_after", None)
    names_before = {p.name for p in before}
    # buffer_values: the computed buffers' real values, for passes that evaluate constants at
    # compile time (position_tables)
    compiled = compiler.compile(model, passes=before, disable=sorted(disable & names_before) or None,
                                stop_after=stop_after if stop_after in names_before else None,
                                progress=progress, buffer_values=real_buffers, **options)
    gm = compiled.graph_module
    gm.meta["fxopt_tied"] = tied
    for node in gm.graph.find_nodes(op="get_attr"):  # buffers the model computed: their real values
        real = real_buffers.get(node.meta.get("param"))
        value = _fetch(gm, node.target)
        if real is not None and isinstance(value, torch.Tensor) and value.device.type == "meta" \
                and value.shape == real.shape and value.dtype == real.dtype and _is_buffer(gm, node.target):
            owner, leaf = _owner(gm, node.target)
            owner._buffers[leaf] = real
    if after and stop_after not in names_before:
        compiled.info.state["post_load"] = {"passes": after, "disable": sorted(disable - names_before) or None,
                                            "stop_after": stop_after, "progress": progress}
    return compiled


def finish_loading(compiled):
    """Run the passes :func:`compile_on_meta` left for after loading (``cuda_graph``); the
    compile report gets their rows. A no-op when none wait."""
    from .passes import PassManager

    pending = compiled.info.state.pop("post_load", None)
    if pending:
        manager = PassManager(pending["passes"], disable=pending["disable"], stop_after=pending["stop_after"],
                              progress=pending["progress"])
        compiled.graph_module = manager.run(compiled.graph_module, compiled.ctx)
        compiled._report.extend(manager.report)
    return compiled


def compile_from_checkpoint(path, passes=None, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                            progress: bool = True, **options):
    """Compile a transformers checkpoint without ever building the full-precision model.

    Reads ``config.json`` (local files only), builds the model with :func:`empty_model` (weights
    on the meta device, buffers the model computes real), captures and compiles it on the meta
    device with ``fxopt.compile`` (``passes``, ``options`` as there: ``max_batch_size``,
    ``max_seq_len``, ``quant_bits``, ``dump_dir``, ``disable``, ...; :func:`compile_on_meta`),
    points the graph at ``device`` (:func:`retarget_device`), then loads each weight in its final
    form (concatenated, quantized, ...) onto ``device`` with :func:`load_checkpoint`, which also
    allocates the KV cache there. Passes that need the real weights (:data:`POST_LOAD_PASSES`:
    ``cuda_graph``) and those after them run after loading (:func:`finish_loading`); the report
    has them all.

    ``verify=True`` is refused: there is no eager model with weights to compare with (verify the
    eagerly loaded model's compilation instead). The nodes' ``meta['val']`` stay the fake values
    of the compilation, on the meta device (``fxopt.ir.propagate_meta(gm)`` recomputes them on
    the device if a later pass needs that). Returns a ``CompiledModel``;
    ``compiled.info.state['checkpoint']`` holds the :class:`LoadStats`.
    """
    if options.get("verify"):
        compile_on_meta(path, verify=True)  # refused, with the reason
    with CheckpointFiles(path) as files:  # a missing or unreadable checkpoint fails before compiling
        compiled = compile_on_meta(path, passes, dtype=dtype, progress=progress, **options)
        retarget_device(compiled.graph_module, device)
        load_checkpoint(compiled, files, device=device, progress=progress)
    return finish_loading(compiled)


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """``{name: other name}`` for every pair of names under which ``model`` holds one parameter
    (tied weights), plus transformers' ``all_tied_weights_keys`` when present."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = {a: b for names in groups.values() for a in names for b in names if a != b}
    for a, b in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.setdefault(a, b)
        tied.setdefault(b, a)
    return tied
